"""Nothing lost while a collector is away (issue 29), end to end: real kernel conntrack in a
network namespace, `ovsflow run` as processes, collectors whose bytes the PyPI `ipfix`
package decodes (tests/ipfix_sink.py: UDP, and a TCP one that goes away and comes back),
each connection's delta sums compared with `conntrack -L`'s totals in both directions:

- a TCP collector away across a SIGTERM and a restart of the agent;
- two collectors, one away across the restart: each gets every byte once;
- an outage much longer than the queue's bound: live connections lose nothing, and only
  end records over the bound are dropped, counted;
- the configured protocols narrowed and widened, across restarts and by SIGHUP;
- a state directory that cannot be written: /healthz says so, the next agent says so;
- one state directory shared by agents of two network namespaces;
- connections quiet at SIGTERM get no record.
The deny path through the same: test_deny_delivery.py.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import yaml

from helpers import OVSFLOW, agent_config, free_port
from ipfix_sink import StreamSink
from lab.netns import PYTHON
from ovsflow.record import END_OF_FLOW, IDLE_TIMEOUT
from test_antrea_records import utc
from test_restart import (
    conntrack_node, conntrack_totals, node, per_connection, steady_traffic, stop, sums,
)

__all__ = ["node"]  # the fixture, from test_restart

EXPORT_CLOSED = re.compile(r"export to \S+ closed: (\d+) records submitted, (\d+) exported, "
                           r"(\d+) dropped, \d+ rejected, (\d+) folded into newer ones, "
                           r"(\d+) left for the next agent")


def start(node, directory: Path, collectors: list, protocols=("tcp",), state="state",
          idle="60s", metrics_port: int | None = None, read_only: Path | None = None,
          state_directory: Path | None = None) -> subprocess.Popen:
    """`ovsflow run` in `node`: 200 ms polls, 1 s active timeout, exporting to
    `collectors` (ipfix.collectors), its export state in `state_directory` (default
    directory/state). `read_only`: a directory the agent sees read-only."""
    config = agent_config(
        directory, 0, list(protocols),
        flowExporter={"flowPollInterval": "200ms", "activeFlowExportTimeout": "1s",
                      "idleFlowExportTimeout": idle},
        ipfix={"collectors": collectors},
        metrics={"bindAddress": f"127.0.0.1:{metrics_port}" if metrics_port else ""},
        state={"directory": str(state_directory or directory / state)})
    settings = yaml.safe_load(Path(config).read_text())
    del settings["flowExporter"]["flowCollectorAddr"]  # the list takes its place
    Path(config).write_text(yaml.safe_dump(settings))
    prefix = []
    if read_only is not None:
        read_only.mkdir(exist_ok=True)
        prefix = ["unshare", "-m", "sh", "-c", f"mount --bind {read_only} {read_only} && "
                  f"mount -o remount,bind,ro {read_only} && exec \"$@\"", "sh"]
    return handling_signals(node.popen(*prefix, OVSFLOW, "run", "--config", config,
                                       stderr=subprocess.PIPE, text=True))


def handling_signals(agent: subprocess.Popen, timeout: float = 60.0) -> subprocess.Popen:
    """Once the agent (its process: `ip netns exec`, `unshare` and `sh` exec it) handles
    SIGTERM and SIGHUP: before, either would end it (a loaded machine takes seconds to
    start it)."""
    wanted = 1 << (signal.SIGTERM - 1) | 1 << (signal.SIGHUP - 1)
    deadline = time.monotonic() + timeout
    while True:
        assert agent.poll() is None, agent.stderr.read()
        status = Path(f"/proc/{agent.pid}/status").read_text()
        caught = int(re.search(r"SigCgt:\s*([0-9a-f]+)", status).group(1), 16)
        if caught & wanted == wanted:
            return agent
        assert time.monotonic() < deadline, "the agent never handled SIGTERM"
        time.sleep(0.05)


def reconfigure(directory: Path, protocols) -> None:
    """A new protocol list in the agent's file, for a SIGHUP."""
    path = directory / "ovsflow.yaml"
    settings = yaml.safe_load(path.read_text())
    settings["flowExporter"]["protocols"] = list(protocols)
    path.write_text(yaml.safe_dump(settings))


def fetch(node, port: int, path: str) -> tuple[int, str]:
    script = ("import sys, urllib.request, urllib.error\n"
              f"try:\n    r = urllib.request.urlopen('http://127.0.0.1:{port}{path}')\n"
              "except urllib.error.HTTPError as e:\n    r = e\n"
              "print(r.status); sys.stdout.write(r.read().decode())")
    out = node.run(PYTHON, "-c", script).stdout
    status, _, body = out.partition("\n")
    return int(status), body


def metric(text: str, name: str) -> float:
    [value] = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.split(" ")[0] == name]
    return value


def ending(node, control) -> dict:
    """The traffic stops, the polls see the final counters: conntrack's totals."""
    (control / "stop").touch()
    time.sleep(1.5)
    return conntrack_totals(node)


def back_then_end(node, sink: StreamSink, control: Path, agent) -> tuple[dict, str]:
    """The collector comes back; once it receives again, the traffic stops, the polls see
    the final counters, the agent stops: conntrack's totals and the agent's log."""
    before = len(sink.records())
    sink.start()
    until_received(sink, before)
    totals = ending(node, control)
    log = stop(agent)
    (control / "close").touch()
    sink.stop()
    return totals, log


def assert_exact(found: dict, totals: dict, ports: list) -> None:
    """Every connection: its delta sums are conntrack's totals, in both directions; one
    start (no connection counted as two); never ended (they all go on)."""
    assert sorted(found) == sorted(ports) == sorted(totals)
    wrong = {port: (sums(found[port]), totals[port]) for port in ports
             if sums(found[port]) != totals[port]}
    assert not wrong, wrong
    for port in ports:
        assert len({r["flowStartMilliseconds"] for r in found[port]}) == 1
        assert END_OF_FLOW not in {r["flowEndReason"] for r in found[port]}


def test_a_tcp_collector_away_across_a_restart_gets_every_byte_once(node, tmp_path):
    """The collector goes away while the agent runs and is still away at SIGTERM; a new
    agent starts; the collector comes back. Before issue 29 the queued deltas were dropped
    at the flush and the next agent continued past them: 14.6 % of octets missing."""
    sink = StreamSink(tmp_path / "collector", node.prefix())
    try:
        control, ports = steady_traffic(node, tmp_path)
        collectors = [f"127.0.0.1:{sink.port}:tcp"]
        agent = start(node, tmp_path, collectors)
        time.sleep(3)
        sink.stop()  # away while the agent runs...
        time.sleep(3)
        first = stop(agent)  # ...and at its SIGTERM
        agent = start(node, tmp_path, collectors)
        time.sleep(2)
        totals, second = back_then_end(node, sink, control, agent)  # back meanwhile
        found = per_connection(sink.records(), ports)
    finally:
        sink.stop()
    assert re.search(r"shutting down with \d+ records unsent .* kept for the next agent",
                     first), first
    [(_, _, dropped, _, left)] = EXPORT_CLOSED.findall(first)
    assert int(left) >= 20 and dropped == "0"  # at least one per connection
    assert f"records the previous agent could not deliver to 127.0.0.1:{sink.port}:tcp are " \
           "queued again" in second, second
    assert_exact(found, totals, ports)


def test_two_collectors_one_away_across_the_restart_each_get_every_byte_once(node, tmp_path):
    """A UDP collector takes everything; a TCP one is away across the restart. The state
    is per collector: before issue 29 the one away missed 15.5 %."""
    sink = StreamSink(tmp_path / "collector", node.prefix())
    try:
        control, ports = steady_traffic(node, tmp_path)
        collectors = [f"127.0.0.1:{node.sink.port}:udp", f"127.0.0.1:{sink.port}:tcp"]
        agent = start(node, tmp_path, collectors)
        time.sleep(2)
        sink.stop()
        time.sleep(2)
        stop(agent)
        agent = start(node, tmp_path, collectors)
        time.sleep(2)
        totals, log = back_then_end(node, sink, control, agent)
        time.sleep(0.5)
        away = per_connection(sink.records(), ports)
        up = per_connection(node.sink.records(), ports)
    finally:
        sink.stop()
    assert_exact(up, totals, ports)
    assert_exact(away, totals, ports)
    assert f"could not deliver to 127.0.0.1:{sink.port}:tcp" in log
    assert f"could not deliver to 127.0.0.1:{node.sink.port}:udp" not in log


SHORT_CONNECTIONS = """
import socket, struct, sys, time
for _ in range(int(sys.argv[1])):
    with socket.create_connection(("127.0.0.1", int(sys.argv[2]))) as client:
        client.sendall(b"x" * 700)
        client.recv(65536)
        # closed with a reset: the entry ends (CLOSE) with no packet after it
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    time.sleep(0.1)
"""


def until_received(sink: StreamSink, before: int, timeout: float = 30.0) -> None:
    """Until the collector has received more than `before` records, then a little more."""
    deadline = time.monotonic() + timeout
    while len(sink.records()) <= before:
        assert time.monotonic() < deadline, "the collector received nothing"
        time.sleep(0.5)
    time.sleep(3)


def test_an_outage_longer_than_the_queue_bound_loses_no_byte_of_a_live_connection(node,
                                                                                  tmp_path):
    """maxBufferedRecords 5, 20 live connections with a record each per poll, and 12 short
    connections that end during the outage: the live connections' records fold into one
    each, whatever the outage's length; of the end records, which fold into nothing, the 7
    oldest over the bound are dropped, counted and logged, and the 5 others arrive."""
    sink = StreamSink(tmp_path / "collector", node.prefix())
    try:
        control, ports = steady_traffic(node, tmp_path)
        # tcp/7070 only: the agent's own connection to the collector ends too when the
        # collector goes away, and its end record would count
        agent = start(node, tmp_path, [{"address": f"127.0.0.1:{sink.port}:tcp",
                                        "maxBufferedRecords": 5}], protocols=("tcp/7070",))
        time.sleep(3)
        sink.stop()
        time.sleep(1)
        node.run(PYTHON, "-c", SHORT_CONNECTIONS, "12", "7070")  # each from its own port
        ended = conntrack_totals(node)  # before their entries go (10 s after the reset)
        time.sleep(4)  # the outage goes on: many polls, 20 records each
        totals, log = back_then_end(node, sink, control, agent)
        records = sink.records()
    finally:
        sink.stop()
    short = {port: counters for port, counters in ended.items() if port not in ports}
    assert len(short) == 12
    found = per_connection(records, [*ports, *short])
    assert_exact({port: found[port] for port in ports}, {port: totals[port] for port in ports},
                 ports)
    [(_, _, dropped, folded, _)] = EXPORT_CLOSED.findall(log)
    assert dropped == "7" and int(folded) > 20 * 5, log
    assert "maxBufferedRecords): dropped the " in log
    arrived = {port: sums(found[port]) for port in short if port in found}
    assert len(arrived) == 5 and all(arrived[port] == short[port] for port in arrived), (
        arrived, short)
    assert all(found[port][-1]["flowEndReason"] == END_OF_FLOW for port in arrived)


def test_protocols_narrowed_and_widened_count_every_byte_once(node, tmp_path):
    """TCP left out and taken again, across restarts and by SIGHUP: no false end for the
    connections left out, and when taken again each continues from its last record (its
    bytes while left out included): the sums are conntrack's totals. Before issue 29:
    +38.2 % across a restart, +30.0 % by SIGHUP."""
    control, ports = steady_traffic(node, tmp_path, count=10)
    collectors = [f"127.0.0.1:{node.sink.port}:udp"]
    agent = start(node, tmp_path, collectors, protocols=("tcp",))
    time.sleep(2.5)
    logs = [stop(agent)]
    agent = start(node, tmp_path, collectors, protocols=("udp",))  # narrowed, restarted
    time.sleep(2)
    reconfigure(tmp_path, ["tcp", "udp"])
    agent.send_signal(signal.SIGHUP)  # widened by SIGHUP
    time.sleep(2)
    reconfigure(tmp_path, ["udp"])
    agent.send_signal(signal.SIGHUP)  # narrowed by SIGHUP
    time.sleep(2)
    logs.append(stop(agent))
    agent = start(node, tmp_path, collectors, protocols=("tcp",))  # widened, restarted
    time.sleep(2)
    totals = ending(node, control)
    logs.append(stop(agent))
    (control / "close").touch()
    time.sleep(0.5)
    found = per_connection(node.sink.records(), ports)
    assert "10 tracked connections no longer followed" in logs[1], logs[1]
    assert_exact(found, totals, ports)
    assert all(len(found[port]) >= 6 for port in ports)


def test_a_state_directory_that_cannot_be_written_is_said(node, tmp_path):
    """An agent whose state directory is read-only: /healthz answers 503 naming the error
    and how long, the metrics count it, and the next agent, which continues from the older
    file, says so (before issue 29: all 200, silence, +63.4 %)."""
    control, ports = steady_traffic(node, tmp_path, count=5)
    collectors = [f"127.0.0.1:{node.sink.port}:udp"]
    port = free_port()
    state = tmp_path / "state"
    agent = start(node, tmp_path, collectors, metrics_port=port)
    time.sleep(2)
    stop(agent)
    agent = start(node, tmp_path, collectors, metrics_port=port, read_only=state)
    try:
        time.sleep(21)  # a save is due every 10 s; the next agent's file gets old
        status, health = fetch(node, port, "/healthz")
        metrics = fetch(node, port, "/metrics")[1]
    finally:
        log = stop(agent)
    agent = start(node, tmp_path, collectors, metrics_port=port)
    time.sleep(2)
    after = fetch(node, port, "/metrics")[1]
    next_log = stop(agent)
    (control / "close").touch()
    assert status == 503, health
    assert re.search(r"state: export state not kept: cannot write \S+ for \d+s \(not written "
                     r"since the agent started \d+s ago\): .*Read-only file system", health), \
        health
    assert metric(metrics, "ovsflow_export_state_save_errors_total") >= 1
    assert metric(metrics, "ovsflow_export_state_last_save_timestamp_seconds") == 0
    assert metric(metrics, 'ovsflow_healthy{layer="state"}') == 0
    assert "Read-only file system" in log
    assert re.search(r"export state \S+ was written \d+\.\ds ago, more than 20s", next_log), \
        next_log
    assert metric(after, "ovsflow_export_state_stale_restores_total") == 1
    assert metric(after, "ovsflow_export_state_restored_age_seconds") > 20


def test_agents_of_two_namespaces_sharing_a_state_directory_each_continue_their_own(
        node, tmp_path):
    """The file is per network namespace (its cookie): with one name for both, each agent
    would continue from the other's connections and count its own again."""
    shared = tmp_path / "shared"
    with conntrack_node("restart2", tmp_path / "other") as other:
        nodes = {"a": node, "b": other}
        for name in nodes:
            (tmp_path / name).mkdir()
        traffic = {name: steady_traffic(ns, tmp_path / name, count=5)
                   for name, ns in nodes.items()}

        def run(name: str, seconds: float) -> subprocess.Popen:
            ns = nodes[name]
            agent = start(ns, tmp_path / name, [f"127.0.0.1:{ns.sink.port}:udp"],
                          state_directory=shared)
            time.sleep(seconds)
            return agent

        stop(run("a", 2.5))
        stop(run("b", 2.5))
        agents = {"a": run("a", 2), "b": run("b", 2)}
        for name, ns in nodes.items():
            control, ports = traffic[name]
            totals = ending(ns, control)
            log = stop(agents[name])
            (control / "close").touch()
            time.sleep(0.5)
            assert "continuing 5 conntrack entries" in log, log
            assert_exact(per_connection(ns.sink.records(), ports), totals, ports)
    assert len(list(shared.glob("export-state-*[0-9]"))) == 2


def test_connections_quiet_at_sigterm_get_no_record(node, tmp_path):
    """Connections idle for their idle timeout (their idle record sent) when the agent
    stops, and still when the next one runs: no record at all, not one with zero deltas."""
    control, ports = steady_traffic(node, tmp_path, count=5)
    collectors = [f"127.0.0.1:{node.sink.port}:udp"]
    agent = start(node, tmp_path, collectors, idle="2s")
    time.sleep(2)
    totals = ending(node, control)  # the clients stop sending, their connections stay open
    time.sleep(3.5)  # idle records
    stopped_at = time.time()
    stop(agent)
    agent = start(node, tmp_path, collectors, idle="2s")
    time.sleep(2)
    stop(agent)
    (control / "close").touch()
    time.sleep(0.5)
    found = per_connection(node.sink.records(), ports)
    for port in ports:  # the idle record is the last: none at either agent's stop
        records = found[port]
        assert records[-1]["flowEndReason"] == IDLE_TIMEOUT, records[-1]
        assert utc(records[-1]["flowEndMilliseconds"]) < stopped_at
    assert_exact(found, totals, ports)
