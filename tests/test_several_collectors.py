"""Several collectors at once (`ipfix.collectors`): each gets every record, and one that is
away holds back no other. Kernel conntrack in a namespace (lab/ctfill.py), `ovsflow run`,
a UDP collector decoded by the PyPI `ipfix` package and `ovsflow collect` over TCP."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections import Counter

import yaml

from collecting import Output
from helpers import OVSFLOW, Collector, agent_config, filled_namespace, free_port
from ipfix_sink import DatagramSink
from lab.netns import PYTHON
from ovsflow.record import ACTIVE_TIMEOUT, FORCED_END

ENTRIES = 3000
# ctfill's entries never move: the heartbeat gives each a record every second anyway
# (docs/ipfix.md § When a record is sent), the stream these tests deliver
EVERY_SECOND = {"activeFlowExportTimeout": "1s", "idleFlowExportTimeout": "10m",
                "heartbeatFlowExportTimeout": "1s"}


def run_agent(node, tmp_path, collectors, seconds, metrics_port=None):
    config = agent_config(
        tmp_path, 0, ["udp"], flowExporter=EVERY_SECOND, ipfix={"collectors": collectors},
        metrics={"bindAddress": f"127.0.0.1:{metrics_port}" if metrics_port else ""})
    # agent_config sets flowCollectorAddr; the list takes its place
    with open(config) as file:
        settings = yaml.safe_load(file)
    del settings["flowExporter"]["flowCollectorAddr"]
    with open(config, "w") as file:
        yaml.safe_dump(settings, file)
    agent = node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.PIPE, text=True)
    time.sleep(seconds)
    metrics = None
    if metrics_port:
        metrics = node.run(PYTHON, "-c", "import urllib.request; print(urllib.request.urlopen("
                           f"'http://127.0.0.1:{metrics_port}/metrics').read().decode())").stdout
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=120) == 0
    return agent.stderr.read(), metrics


def by_reason(records, address_key):
    return Counter((r[address_key], r["flowEndReason"]) for r in records)


def test_each_collector_gets_every_record(tmp_path):
    with filled_namespace("twocollectors", ENTRIES) as node:
        sink = DatagramSink(tmp_path / "datagrams", node.prefix())
        stream = Collector("tcp://127.0.0.1:0", timeout=120, prefix=node.prefix())
        output = Output(stream)
        try:
            log, _ = run_agent(node, tmp_path, [f"127.0.0.1:{sink.port}:udp",
                                                {"address": f"127.0.0.1:{stream.port}:tcp"}], 4)
            streamed = output.until_disconnected()
            time.sleep(0.5)
            datagrams = sink.records()
        finally:
            stream.stop()
            sink.stop()
    finals = [r for r in streamed if r["flowEndReason"] == FORCED_END]
    assert len(finals) == ENTRIES, log
    # the same records at both: each connection's records, by reason
    assert by_reason(streamed, "sourceIPv4Address") == Counter(
        (str(r["sourceIPv4Address"]), r["flowEndReason"]) for r in datagrams)
    assert Counter(r["flowEndReason"] for r in streamed)[ACTIVE_TIMEOUT] >= 2 * ENTRIES


def test_a_collector_that_is_away_holds_back_no_other(tmp_path):
    metrics_port = free_port()
    with filled_namespace("onedown", ENTRIES) as node:
        stream = Collector("tcp://127.0.0.1:0", timeout=120, prefix=node.prefix())
        output = Output(stream)
        away = f"127.0.0.1:{free_port()}:tcp"  # nothing listens there
        try:
            log, metrics = run_agent(node, tmp_path, [
                {"address": away, "maxBufferedRecords": 1000},
                f"127.0.0.1:{stream.port}:tcp"], 5, metrics_port)
            streamed = output.until_disconnected()
        finally:
            stream.stop()
    reasons = Counter(r["flowEndReason"] for r in streamed)
    assert reasons[FORCED_END] == ENTRIES, log
    assert reasons[ACTIVE_TIMEOUT] >= 3 * ENTRIES  # one per second, not held back
    lines = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                 if line.startswith("ovsflow_") and "{" in line)
    up = f"127.0.0.1:{stream.port}:tcp"
    assert float(lines[f'ovsflow_collector_reachable{{collector="{away}"}}']) == 0
    assert float(lines[f'ovsflow_collector_reachable{{collector="{up}"}}']) == 1
    # the away collector's queue: one record per connection, each taking in the deltas of
    # the one before it; nothing dropped however many polls the outage lasts
    assert float(lines[f'ovsflow_export_queue_records{{collector="{away}"}}']) == ENTRIES
    assert float(lines[f'ovsflow_records_folded_total{{collector="{away}"}}']) >= 2 * ENTRIES
    assert float(lines[f'ovsflow_records_dropped_total{{collector="{away}"}}']) == 0
    assert float(lines[f'ovsflow_records_dropped_total{{collector="{up}"}}']) == 0
    # At the scrape, the records counted as exported had all been sent; polls went on after
    # it (the last one at shutdown), so the exact count is the one the agent logs at exit.
    assert float(lines[f'ovsflow_records_exported_total{{collector="{up}"}}']) <= len(streamed)
    closed = dict(re.findall(r"export to (\S+) closed: \d+ records submitted, (\d+) exported",
                             log))
    assert int(closed[f"127.0.0.1:{stream.port}"]) == len(streamed), log
    assert int(closed[away.rsplit(":", 1)[0]]) == 0, log


def test_a_reload_adds_and_removes_collectors(tmp_path):
    with filled_namespace("reloadcollectors", 50) as node:
        first = Collector("tcp://127.0.0.1:0", timeout=120, prefix=node.prefix())
        second = Collector("tcp://127.0.0.1:0", timeout=120, prefix=node.prefix())
        first_output, second_output = Output(first), Output(second)
        a, b = f"127.0.0.1:{first.port}:tcp", f"127.0.0.1:{second.port}:tcp"
        config = agent_config(tmp_path, 0, ["udp"], flowExporter=EVERY_SECOND,
                              ipfix={"collectors": [a]})
        with open(config) as file:
            settings = yaml.safe_load(file)
        del settings["flowExporter"]["flowCollectorAddr"]

        def configure(collectors):
            settings["ipfix"]["collectors"] = collectors
            with open(config, "w") as file:
                yaml.safe_dump(settings, file)

        configure([a])
        agent = node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.PIPE,
                           text=True)
        try:
            time.sleep(2.5)
            configure([a, b])
            agent.send_signal(signal.SIGHUP)
            time.sleep(2.5)
            only_first_then_both = (len(first_output.records()), len(second_output.records()))
            configure([b])
            agent.send_signal(signal.SIGHUP)
            time.sleep(1)  # a's exporter sends what it has queued and ends its session
            at_removal = len(first_output.records())
            time.sleep(2)
            after_removal = len(first_output.records())
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=60) == 0
            log = agent.stderr.read()
        finally:
            first_output.stop()
            first.stop()
            second_output.stop()
            second.stop()
    assert "reload: collector " + b + " added" in log
    assert "reload: collector " + a + " removed" in log
    assert only_first_then_both[0] >= 100 and only_first_then_both[1] >= 50, (
        only_first_then_both, log)
    assert after_removal == at_removal  # nothing more for a removed collector
    assert Counter(r["flowEndReason"] for r in second_output.records())[FORCED_END] == 50
