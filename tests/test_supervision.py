"""Long-lived tasks survive what they did not expect, and /healthz and /readyz tell the truth
about each layer: the supervisor on a real event loop, the agent in a namespace with kernel
conntrack, collectors that are absent or that the host's firewall keeps out."""

import asyncio
import logging
import re
import signal
import subprocess
import time

import pytest

from collecting import Output
from helpers import OVSFLOW, Collector, agent_config, filled_namespace, free_port
from ipfix_sink import DatagramSink
from lab.netns import PYTHON
from ovsflow.supervisor import Supervisor
from test_conntrack_kernel import http_get

HEALTH_GRACE = 5.0  # the agent's minimum (3 polls of 500 ms are less)


def test_a_failing_task_is_logged_counted_and_restarted_with_growing_backoff(caplog):
    starts = []

    async def flaky():
        starts.append(time.monotonic())
        if len(starts) <= 3:
            raise KeyError(f"bug {len(starts)}")

    async def scenario():
        supervisor = Supervisor(initial_backoff=0.1, max_backoff=0.25)
        await supervisor.spawn("flaky", flaky)  # returns once a run ends normally
        return supervisor

    with caplog.at_level(logging.ERROR):
        supervisor = asyncio.run(scenario())
    assert len(starts) == 4 and supervisor.restarts == {"flaky": 3}
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert 0.1 <= gaps[0] < 0.2 and 0.2 <= gaps[1] < 0.3 and 0.25 <= gaps[2] < 0.35  # capped
    assert caplog.text.count("Traceback") == 3 and "KeyError: 'bug 3'" in caplog.text
    since, failures, error = supervisor.problems()["flaky"]
    assert failures == 3 and error == "KeyError: 'bug 3'"


def test_no_restart_once_stopping():
    runs = []

    async def failing():
        runs.append(1)
        raise RuntimeError("down")

    async def scenario():
        stopping = asyncio.Event()
        supervisor = Supervisor(stopping, initial_backoff=0.2)
        task = supervisor.spawn("failing", failing)
        await asyncio.sleep(0.05)
        stopping.set()
        await asyncio.wait_for(task, 1)  # ends during its backoff, without a restart

    asyncio.run(scenario())
    assert len(runs) == 1


@pytest.fixture
def node():
    with filled_namespace("health", 20) as ns:
        yield ns


def start_agent(node, tmp_path, address):
    config = agent_config(tmp_path, 0, ["udp"], metrics={"bindAddress": "127.0.0.1:9495"},
                          flowExporter={"flowCollectorAddr": address,
                                        "idleFlowExportTimeout": "10m"})
    return node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.PIPE, text=True)


def stop_agent(agent):
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0


def metric(text, name):
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def test_healthz_names_an_exporter_that_cannot_reach_its_collector(node, tmp_path):
    port = free_port()
    agent = start_agent(node, tmp_path, f"127.0.0.1:{port}:tcp")
    collector = None
    try:
        time.sleep(1.5)
        early = http_get(node, "/healthz")
        time.sleep(HEALTH_GRACE + 1)
        down, down_ready = http_get(node, "/healthz"), http_get(node, "/readyz")
        metrics = http_get(node, "/metrics")
        collector = Collector(f"tcp://127.0.0.1:{port}", timeout=60, prefix=node.prefix())
        output = Output(collector)
        deadline = time.monotonic() + 20  # the next attempt of the connection backoff
        while (up := http_get(node, "/healthz")) != "200 ok" and time.monotonic() < deadline:
            time.sleep(0.5)
        up_ready = http_get(node, "/readyz")
        stop_agent(agent)
        received = output.until_disconnected()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if collector is not None:
            collector.stop()
    assert early == "200 ok"  # within the grace period
    assert re.match(r"503 exporter 127\.0\.0\.1:\d+:\w+: ", down) and (
        "records waiting, none sent" in down), down
    assert "Connect call failed" in down
    assert down_ready == "503 nothing has reached the collector yet"
    assert metric(metrics, 'ovsflow_healthy{layer="exporter"}') == 0
    assert metric(metrics, 'ovsflow_healthy{layer="poll"}') == 1
    assert metric(metrics, f'ovsflow_collector_reachable{{collector="127.0.0.1:{port}:tcp"}}') == 0
    assert (up, up_ready) == ("200 ok", "200 ready")
    assert len(received) >= 40  # queued while it was away, then the final records


def test_readyz_over_udp_means_a_datagram_went_out(node, tmp_path):
    """A firewall drops what the agent sends (sendto fails with EPERM): the socket exists,
    nothing is sent, and neither /readyz nor /healthz pretend otherwise."""
    sink = DatagramSink(tmp_path / "datagrams", node.prefix())
    port = sink.port
    node.run("iptables", "-A", "OUTPUT", "-p", "udp", "--dport", str(port), "-j", "DROP")
    agent = start_agent(node, tmp_path, f"127.0.0.1:{port}:udp")
    try:
        time.sleep(HEALTH_GRACE + 2)
        health, ready = http_get(node, "/healthz"), http_get(node, "/readyz")
        node.run("iptables", "-D", "OUTPUT", "-p", "udp", "--dport", str(port), "-j", "DROP")
        # the next probe (every 2 s while sends fail) goes out, and the records after it
        deadline = time.monotonic() + 5
        while http_get(node, "/healthz") != "200 ok" and time.monotonic() < deadline:
            time.sleep(0.2)
        health_after, ready_after = http_get(node, "/healthz"), http_get(node, "/readyz")
        stop_agent(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        sink.stop()
    assert ready == "503 nothing has reached the collector yet"
    assert health.startswith(f"503 exporter 127.0.0.1:{port}:udp: sends to 127.0.0.1:") and (
        "not permitted" in health), health
    assert (health_after, ready_after) == ("200 ok", "200 ready")


def test_healthz_names_a_deny_path_without_its_switch(node, tmp_path):
    """ovs.bridge set, but no ovs-vswitchd answers at its service socket (the collector is
    there: the exporter is fine)."""
    sink = DatagramSink(tmp_path / "datagrams", node.prefix())
    config = agent_config(tmp_path, sink.port, ["udp"],
                          metrics={"bindAddress": "127.0.0.1:9495"},
                          ovs={"runDir": str(tmp_path / "no-ovs"), "bridge": "br0"})
    agent = node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(HEALTH_GRACE + 1.5)
        health = http_get(node, "/healthz")
        metrics = http_get(node, "/metrics")
        stop_agent(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        sink.stop()
    assert health.startswith("503 deny: flows not in place for "), health
    assert "br0.mgmt" in health and "exporter" not in health and "poll" not in health
    assert metric(metrics, 'ovsflow_healthy{layer="deny"}') == 0


SENDER = """
import socket, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 40123))
for _ in range(100):
    sock.sendto(b"x" * 100, ("127.0.0.1", 9))
    time.sleep(0.1)
"""


def test_counters_zeroed_under_a_running_agent(tmp_path):
    """An operator's `conntrack -L -z` while the agent runs: records go on, the deltas after
    the reset are the new totals (never negative, nothing rejected), /healthz stays 200,
    and SIGTERM still ends with status 0."""
    with filled_namespace("zeroed", 0) as node:
        node.run("iptables", "-t", "raw", "-A", "OUTPUT", "-j", "CT", "--zone", "65520")
        collector = Collector("udp://127.0.0.1:0", timeout=60, prefix=node.prefix())
        agent = start_agent(node, tmp_path, f"127.0.0.1:{collector.port}:udp")
        try:
            time.sleep(1.5)  # accounting is on before the flow starts
            sender = node.popen(PYTHON, "-c", SENDER)
            time.sleep(4)
            zeroed_at = time.time()
            node.run("conntrack", "-L", "-z")
            time.sleep(4)
            health, metrics = http_get(node, "/healthz"), http_get(node, "/metrics")
            stop_agent(agent)
            sender.wait(timeout=30)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        records = [r for r in collector.stop_and_read()
                   if r.get("sourceTransportPort") == 40123]
    assert health == "200 ok"
    assert "ovsflow_records_rejected_total{" not in metrics
    assert metric(metrics, "ovsflow_connections_malformed_total") == 0
    assert sum(r["flowEndMilliseconds"] < zeroed_at * 1000 for r in records) >= 2, records
    # The first record whose total is below its predecessor's counts from the reset: its
    # delta is its total. Every other record's delta is the growth of the total.
    resets = [index for index in range(1, len(records))
              if records[index]["octetTotalCount"] < records[index - 1]["octetTotalCount"]]
    assert len(resets) == 1 and len(records) - resets[0] >= 2, records
    reset = records[resets[0]]
    assert reset["flowEndMilliseconds"] > zeroed_at * 1000
    assert reset["octetDeltaCount"] == reset["octetTotalCount"] > 0
    assert reset["packetDeltaCount"] == reset["packetTotalCount"] > 0
    for previous, record in zip(records, records[1:]):
        if record is not reset:
            assert record["octetDeltaCount"] == (record["octetTotalCount"]
                                                 - previous["octetTotalCount"])
