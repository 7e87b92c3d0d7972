"""Nothing is lost while the collector is reachable: polls whose due records outnumber
ipfix.maxBufferedRecords, and the final records at SIGTERM. Kernel conntrack in a network
namespace, filled with lab/ctfill.py; `ovsflow run` and `ovsflow collect` (TCP) in it."""

import signal
import socket
import subprocess
import time
from collections import Counter

import pytest

from collecting import Output
from helpers import OVSFLOW, Collector, agent_config
from lab.netns import PYTHON, Netns
from ovsflow.record import ACTIVE_TIMEOUT, FORCED_END


@pytest.fixture
def node():
    ns = Netns("shutdown")
    try:
        yield ns
    finally:
        ns.delete()


def run_agent(node, tmp_path, port, active, max_buffered, settle):
    """The agent exporting over TCP to `port` for `settle` seconds, then SIGTERM; its log."""
    config = agent_config(tmp_path, port, ["udp"],
                          flowExporter={"flowCollectorAddr": f"127.0.0.1:{port}:tcp",
                                        "activeFlowExportTimeout": active,
                                        "idleFlowExportTimeout": "10m",
                                        # waves of records from a table that does not move
                                        "heartbeatFlowExportTimeout": active},
                          ipfix={"maxBufferedRecords": max_buffered})
    agent = node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.PIPE, text=True)
    time.sleep(settle)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=120) == 0
    return agent.stderr.read()


def sources(records, reason):
    return Counter(r["sourceIPv4Address"] for r in records if r["flowEndReason"] == reason)


def test_polls_larger_than_the_bound_lose_nothing_with_a_reachable_collector(node, tmp_path):
    """3000 connections due at every 1 s active timeout, a bound of 100 records."""
    node.run(PYTHON, "-m", "lab.ctfill", "udp", "3000")
    collector = Collector("tcp://127.0.0.1:0", timeout=120, prefix=node.prefix())
    output = Output(collector)
    try:
        log = run_agent(node, tmp_path, collector.port, "1s", 100, settle=4.5)
        records = output.until_disconnected()
    finally:
        collector.stop()
    addresses = {socket.inet_ntoa((0x0A000000 + i).to_bytes(4, "big")) for i in range(3000)}
    active = sources(records, ACTIVE_TIMEOUT)
    assert set(active) == addresses and min(active.values()) >= 2  # two waves at least
    assert sources(records, FORCED_END) == Counter(addresses)
    assert "oldest records" not in log and " exported, 0 dropped," in log, log


def test_sigterm_with_more_live_connections_than_the_bound_delivers_every_final_record(
        node, tmp_path):
    """The issue's case: 110k live connections, the default bound of 100k records."""
    node.run(PYTHON, "-m", "lab.ctfill", "udp", "110000")
    collector = Collector("tcp://127.0.0.1:0", timeout=300, prefix=node.prefix())
    output = Output(collector)
    try:
        log = run_agent(node, tmp_path, collector.port, "10m", 100_000, settle=6)
        records = output.until_disconnected()
    finally:
        collector.stop()
    final = sources(records, FORCED_END)
    assert len(final) == 110_000 and set(final.values()) == {1}
    assert "stopping: 110000 final records" in log
    assert "oldest records" not in log and "unsent" not in log, log
    assert " exported, 0 dropped," in log, log
