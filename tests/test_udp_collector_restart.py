"""A UDP collector (`ovsflow collect`) that goes away and comes back while an agent exports
to it: the agent sees the outage from what the kernel tells it (ICMP port unreachable),
shows it (/healthz, `ovsflow_collector_reachable`), keeps the records, and the collector
that comes back decodes within seconds and gets every byte once; and a collector that
lost records reads so in the ledger, in the same numbers as the agent's metrics.

    node netns (kernel conntrack, zone 65520, the agent) --veth-- collector netns
    172.31.9.1                                                     172.31.9.2:4739

Across a veth, unlike loopback, the collector's kernel rate-limits its ICMP errors (one a
second, a burst of six), as a remote collector host does.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import zlib
from collections import defaultdict
from urllib.parse import urlencode

import pytest

from collecting import Output
from helpers import OVSFLOW, Collector, agent_config
from lab.netns import PYTHON, CommandFailed, Netns
from test_conntrack_kernel import http_get
from test_prometheus import PROMETHEUS, fetch, prometheus_config
from test_restart import COUNTERS, LAB, SERVER_PORT, conntrack_totals, steady_traffic

COLLECTOR = "172.31.9.2"
ADDRESS = f"{COLLECTOR}:4739:udp"
HEALTH_GRACE = 5.0  # the agent's minimum
PROBE_INTERVAL = 2.0


@pytest.fixture
def site():
    node, collector = Netns("restartnode"), Netns("restartcollector")
    try:
        node.run("ip", "link", "add", "collector", "type", "veth", "peer", "name", "node",
                 "netns", collector.name)
        node.run("ip", "addr", "add", "172.31.9.1/30", "dev", "collector")
        node.run("ip", "link", "set", "collector", "up")
        collector.run("ip", "addr", "add", f"{COLLECTOR}/30", "dev", "node")
        collector.run("ip", "link", "set", "node", "up")
        node.run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1",
                 "net.netfilter.nf_conntrack_timestamp=1")
        # the test's connections (to and from the steady server) in zone 65520; not the
        # export, nor the scrapes of /metrics
        for chain in ("PREROUTING", "OUTPUT"):
            for match in ("--dport", "--sport"):
                node.run("iptables", "-t", "raw", "-A", chain, "-p", "tcp", match,
                         str(SERVER_PORT), "-j", "CT", "--zone", "65520")
        yield node, collector
    finally:
        collector.delete()
        node.delete()


def start_collector(collector: Netns) -> Output:
    return Output(Collector(f"udp://{COLLECTOR}:4739", timeout=300,
                            prefix=collector.prefix()))


def start_agent(node: Netns, tmp_path, **ipfix):
    config = agent_config(
        tmp_path, 4739, ["tcp"],
        flowExporter={"flowCollectorAddr": ADDRESS, "flowPollInterval": "200ms",
                      "activeFlowExportTimeout": "1s", "idleFlowExportTimeout": "60s"},
        metrics={"bindAddress": "127.0.0.1:9495"}, ipfix=ipfix)
    return node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.PIPE, text=True)


def stop_agent(agent) -> str:
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0
    return agent.stderr.read()


def metrics(node: Netns) -> dict[str, float]:
    text = http_get(node, "/metrics")
    return {name: float(value) for name, value in
            re.findall(r"^(ovsflow_\S+) (\S+)$", text, re.M)}


def of_collector(name: str) -> str:
    return f'{name}{{collector="{ADDRESS}"}}'


def sums_by_port(records) -> dict[int, tuple[int, ...]]:
    found = defaultdict(lambda: (0, 0, 0, 0))
    for r in records:
        if r.get("destinationTransportPort") == SERVER_PORT:
            found[r["sourceTransportPort"]] = tuple(
                a + r[name] for a, name in zip(found[r["sourceTransportPort"]], COUNTERS))
    return dict(found)


def test_a_restarted_udp_collector_decodes_within_seconds_and_every_byte_arrives_once(
        site, tmp_path):
    node, collector_ns = site
    first = start_collector(collector_ns)
    agent = start_agent(node, tmp_path)
    second = None
    try:
        control, _ = steady_traffic(node, tmp_path, count=5)
        wait_for_polls(node)
        before = client_port(node)  # a short connection while the first collector runs
        wait_until(lambda: before in sums_by_port(first.records()), "its records")
        first.stop()  # SIGTERM: it prints what it received and its port closes
        stopped_at = time.monotonic()

        during = client_port(node)  # starts and ends while no collector listens
        samples = []
        while time.monotonic() - stopped_at < HEALTH_GRACE + 3:
            samples.append((time.monotonic() - stopped_at, metrics(node)))
            time.sleep(0.5)
        health_away = http_get(node, "/healthz")

        second = start_collector(collector_ns)
        restarted_at = time.monotonic()
        while not second.records() and time.monotonic() - restarted_at < 15:
            time.sleep(0.05)
        first_decoded = time.monotonic() - restarted_at
        time.sleep(1)
        health_back = http_get(node, "/healthz")
        reachable_back = metrics(node)[of_collector("ovsflow_collector_reachable")]
        after = client_port(node)  # starts and ends after it came back

        (control / "stop").touch()
        time.sleep(1.5)
        totals = conntrack_totals(node)
        log = stop_agent(agent)
        time.sleep(0.5)
        (control / "close").touch()
    finally:
        if agent.poll() is None:
            agent.kill()
        first.stop()
        if second is not None:
            second.stop()
    print(f"first record decoded {first_decoded:.2f}s after the collector restarted")

    # The outage, as the agent shows it: unreachable from the first refused datagram on,
    # nothing counted as exported, /healthz 503 naming the collector after the grace.
    exported = of_collector("ovsflow_records_exported_total")
    reachable = of_collector("ovsflow_collector_reachable")
    away = [(at, m) for at, m in samples if at > 1.5]  # a poll has sent and been refused
    assert {m[reachable] for _, m in away} == {0.0}
    assert len({m[exported] for _, m in away}) == 1, [m[exported] for _, m in away]
    assert away[-1][1][of_collector("ovsflow_collector_refusals_total")] >= 2
    assert away[-1][1][of_collector("ovsflow_export_queue_records")] > 0
    assert health_away.startswith(f"503 exporter {ADDRESS}: sends to {COLLECTOR}:4739 "
                                  "failing for "), health_away
    assert "Connection refused" in health_away
    assert (health_back, reachable_back) == ("200 ok", 1.0)
    assert first_decoded < PROBE_INTERVAL + 1.5, first_decoded
    assert "refuses UDP" in log and "takes records again" in log

    # Every byte once: each connection's deltas over both collectors are conntrack's totals;
    # the connections of the outage and after it, at the second collector alone.
    at_first, at_second = sums_by_port(first.records()), sums_by_port(second.records())
    assert sorted(totals) == sorted(set(at_first) | set(at_second))
    for port, total in totals.items():
        both = tuple(map(sum, zip(at_first.get(port, (0,) * 4), at_second.get(port, (0,) * 4))))
        assert both == total, port
    assert before in at_first
    for port in (during, after):
        assert port not in at_first and at_second[port] == totals[port]
    # the ledger went to the second collector, right after the templates it probed with
    ledgers = second.records(options=True)
    assert ledgers[0]["_templateId"] == 280 and ledgers[0]["_options"] is True
    assert ledgers[0]["exportingProcessId"] == zlib.crc32(ADDRESS.encode())


def wait_until(condition, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        time.sleep(0.1)


def wait_for_polls(node: Netns) -> None:
    """The agent runs: a poll has completed (the kernel source's start takes seconds)."""
    def polled() -> bool:
        try:
            return metrics(node).get("ovsflow_polls_total", 0) > 0
        except CommandFailed:  # not listening yet
            return False
    wait_until(polled, "the agent's first poll")


def settled(node: Netns, name: str, quiet: float = 2.0) -> dict[str, float]:
    """The metrics once `name` has not moved for `quiet` seconds."""
    last, since = metrics(node), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.25)
        now = metrics(node)
        if now[name] != last[name]:
            since = time.monotonic()
        last = now
        assert time.monotonic() - since < 30, f"{name} never settled"
    return last


def client_port(node: Netns) -> int:
    result = node.run(PYTHON, str(LAB / "traffic.py"), "tcp-client", "127.0.0.1",
                      str(SERVER_PORT), "3000", "3", "0.3")
    return int(re.search(r'"sport": (\d+)', result.stdout).group(1))


def test_a_collector_that_lost_records_reads_it_in_the_ledger_as_the_metrics_count_it(
        site, tmp_path):
    """The collector starts late, after the queue's bound made the agent drop records and
    the store's bound left connections untracked: its first options records say so, in
    the numbers /metrics gives at that moment (nothing moves any more)."""
    node, collector_ns = site
    (tmp_path / "agent").mkdir()
    config = agent_config(
        tmp_path / "agent", 4739, ["tcp"],
        flowExporter={"flowCollectorAddr": ADDRESS, "flowPollInterval": "200ms",
                      "activeFlowExportTimeout": "1s", "idleFlowExportTimeout": "2s"},
        conntrack={"source": "kernel", "zones": [65520], "maxConnections": 6},
        metrics={"bindAddress": "127.0.0.1:9495"}, ipfix={"maxBufferedRecords": 4})
    agent = node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.PIPE, text=True)
    collector = None
    try:
        control, _ = steady_traffic(node, tmp_path, count=8)
        wait_for_polls(node)
        # records every second, folded into one waiting record per live connection (none
        # lost); then the connections end: 6 end records, where the bound holds 4
        time.sleep(4)
        (control / "stop").touch()
        (control / "close").touch()
        submitted = of_collector("ovsflow_records_submitted_total")
        settled(node, submitted)  # idle: no more records, drops or connections
        collector = start_collector(collector_ns)
        wait_until(lambda: metrics(node)[of_collector("ovsflow_export_queue_records")] == 0,
                   "the queue sent")
        now = settled(node, of_collector("ovsflow_records_exported_total"))
        time.sleep(0.5)  # printed
        flows, ledgers = collector.records(), collector.records(options=True)
        stop_agent(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
        if collector is not None:
            collector.stop()
    exporting = [r for r in ledgers if r["_templateId"] == 280]
    conntrack = [r for r in ledgers if r["_templateId"] == 281]
    assert exporting and conntrack and len(flows) >= 4
    ledger, metering = exporting[0], conntrack[0]
    dropped = now[of_collector("ovsflow_records_dropped_total")]
    rejected = sum(value for name, value in now.items()
                   if name.startswith("ovsflow_records_rejected_total"))
    assert dropped > 0
    assert ledger["notSentFlowTotalCount"] == dropped + rejected
    assert ledger["exportedFlowRecordTotalCount"] + len(flows) == now[
        of_collector("ovsflow_records_exported_total")]
    assert metering["meteringProcessId"] == 1
    assert metering["ignoredDataRecordTotalCount"] == now[
        "ovsflow_connections_rejected_total"] + now["ovsflow_connections_malformed_total"] == 2
    assert ledger["observationDomainId"] == ledger["_observationDomainId"]
    assert ledger["systemInitTimeMilliseconds"] <= ledger["observationTimeMilliseconds"]


def test_a_udp_collector_outage_raises_the_unreachable_alert_in_a_real_prometheus(
        site, tmp_path):
    """Debian's Prometheus, with the shipped rules, scraping the agent every second: while
    the UDP collector is away `OvsflowCollectorUnreachable` is pending for it (its `for: 2m`
    is promtool's to check, deploy/prometheus/ovsflow-alerts.test.yaml), and it is gone
    once the collector is back. Before the agent read ICMP refusals the expression could
    never be true for a UDP collector."""
    assert PROMETHEUS, "prometheus comes with Debian's prometheus package (scripts/setup)"
    node, collector_ns = site
    (tmp_path / "agent").mkdir()
    first = start_collector(collector_ns)
    agent = start_agent(node, tmp_path / "agent")
    prometheus = node.popen(
        PROMETHEUS, f"--config.file={prometheus_config(tmp_path, '127.0.0.1:9495')}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--web.listen-address=127.0.0.1:9496",
        "--log.level=warn", stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"))
    api, second = "http://127.0.0.1:9496/api/v1", None

    def query(promql: str) -> list[dict]:
        try:
            answer = json.loads(fetch(node, f"{api}/query?" + urlencode({"query": promql})))
        except CommandFailed:  # not listening yet
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
            return []
        return answer["data"]["result"]

    def alert() -> list[tuple[str, str]]:
        return [(s["metric"]["alertstate"], s["metric"]["collector"]) for s in query(
            'ALERTS{alertname="OvsflowCollectorUnreachable"}')]

    try:
        control, _ = steady_traffic(node, tmp_path, count=3)
        wait_for_polls(node)
        wait_until(lambda: query(f'{of_collector("ovsflow_collector_reachable")} == 1'),
                   "Prometheus scraping a reachable collector", 60)
        assert alert() == []
        first.stop()
        stopped_at = time.monotonic()
        client_port(node)  # records to send, refused
        wait_until(lambda: alert() == [("pending", ADDRESS)], "the alert pending", 30)
        pending_after = time.monotonic() - stopped_at
        [refusals] = query(of_collector("ovsflow_collector_refusals_total"))
        second = start_collector(collector_ns)
        wait_until(lambda: alert() == [] and query(
            f'{of_collector("ovsflow_collector_reachable")} == 1'), "the alert gone", 30)
        (control / "stop").touch()
        (control / "close").touch()
        stop_agent(agent)
    finally:
        for process in (agent, prometheus):
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
        first.stop()
        if second is not None:
            second.stop()
    print(f"alert pending {pending_after:.1f}s after the collector stopped")
    assert float(refusals["value"][1]) >= 1
