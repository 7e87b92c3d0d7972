"""SIGTERM while a large batch is on its way over TCP or TLS (issue 18, finding 3): no record
reaches the collector twice, and the agent's `records_exported` is what the collector
decoded, also when the collector stops reading and the agent gives up on the rest (counted
as dropped, never as exported). Kernel conntrack in a network namespace holding 60k
entries, `ovsflow run` and `ovsflow collect` as processes in it; the collector prints every
record as JSON, which makes it slower than the agent: the agent's sends wait on it, batch
after batch."""

import re
import signal
import socket
import subprocess
import time
from collections import Counter

import pytest
import trustme

from collecting import Output
from helpers import OVSFLOW, Collector, agent_config, filled_namespace

CONNECTIONS = 60_000
IDENTITY = ("sourceIPv4Address", "sourceTransportPort", "destinationIPv4Address",
            "destinationTransportPort", "protocolIdentifier", "flowId", "flowEndReason",
            "flowEndMilliseconds")
EXPORT_CLOSED = re.compile(r"export to \S+ closed: (\d+) records submitted, (\d+) exported, "
                           r"(\d+) dropped, \d+ rejected, (\d+) folded")


@pytest.fixture
def node():
    with filled_namespace("inflight", CONNECTIONS) as ns:
        yield ns


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("collector.test")
    files = {"ca": directory / "ca.pem", "cert": directory / "cert.pem",
             "key": directory / "key.pem"}
    ca.cert_pem.write_to_path(files["ca"])
    server.cert_chain_pems[0].write_to_path(files["cert"])
    server.private_key_pem.write_to_path(files["key"])
    return {name: str(path) for name, path in files.items()}


def sigterm_in_flight(node, tmp_path, tls_files, scheme, *, collector_stalls: bool):
    """The agent exporting 60k connections (2 s active timeout) to a collector; SIGTERM once
    the collector has printed part of the first wave, so that the agent is sending the rest.
    With `collector_stalls`, the collector is stopped (SIGSTOP) at that moment and continued
    once the agent has given up and exited. Returns the records the collector decoded, and
    (submitted, exported, dropped) from the agent's last words."""
    extra, ipfix = (), {}
    if scheme == "tls":
        extra = ("--cert", tls_files["cert"], "--key", tls_files["key"])
        ipfix = {"tls": {"caFile": tls_files["ca"], "serverName": "collector.test"}}
    collector = Collector(f"{scheme}://127.0.0.1:0", timeout=300, extra=extra,
                          prefix=node.prefix())  # `ip netns exec` execs: the collector's PID
    output = Output(collector)
    try:
        config = agent_config(tmp_path, collector.port, ["udp"], ipfix=ipfix,
                              flowExporter={"flowCollectorAddr":
                                            f"127.0.0.1:{collector.port}:{scheme}",
                                            "activeFlowExportTimeout": "2s",
                                            "idleFlowExportTimeout": "10m"})
        agent = node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.PIPE,
                           text=True)
        deadline = time.monotonic() + 60
        while len(output.lines) < 15_000:
            assert agent.poll() is None and time.monotonic() < deadline, agent.stderr.read()
            time.sleep(0.05)
        if collector_stalls:
            collector.process.send_signal(signal.SIGSTOP)
        agent.send_signal(signal.SIGTERM)
        try:
            assert agent.wait(timeout=120) == 0
        finally:
            if collector_stalls:
                collector.process.send_signal(signal.SIGCONT)
        log = agent.stderr.read()
        records = output.until_disconnected()
    finally:
        collector.stop()
    [counts] = [tuple(map(int, m)) for m in EXPORT_CLOSED.findall(log)]
    return records, counts, log


def received_twice(records) -> dict:
    return {key: n for key, n in Counter(tuple(r[k] for k in IDENTITY) for r in records).items()
            if n > 1}


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
def test_sigterm_with_a_batch_in_flight_sends_no_record_twice(node, tmp_path, tls_files,
                                                               scheme):
    records, (submitted, exported, dropped, folded), _ = sigterm_in_flight(
        node, tmp_path, tls_files, scheme, collector_stalls=False)
    twice = received_twice(records)
    assert not twice, f"{len(twice)} records received twice, e.g. {next(iter(twice))}"
    assert exported == len(records) and dropped == 0 and submitted == exported + folded
    addresses = {socket.inet_ntoa((0x0A000000 + i).to_bytes(4, "big"))
                 for i in range(CONNECTIONS)}
    seen = Counter(r["sourceIPv4Address"] for r in records)
    # every connection's final record (forced end, no export state) arrives once: after its
    # wave record, or folded into it where that still waited at SIGTERM (issue 29)
    ends = Counter(r["sourceIPv4Address"] for r in records if r["flowEndReason"] == 4)
    assert set(seen) == addresses and ends == Counter(addresses)


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
def test_sigterm_with_a_stalled_collector_counts_what_it_gave_up_as_dropped(
        node, tmp_path, tls_files, scheme):
    """The collector stops reading as SIGTERM comes: the agent gives up after its flush
    timeout and exits; the collector, continued, reads what the kernel still held."""
    records, (submitted, exported, dropped, folded), log = sigterm_in_flight(
        node, tmp_path, tls_files, scheme, collector_stalls=True)
    assert not received_twice(records)
    assert "records unsent" in log and dropped > 0
    assert exported == len(records) and submitted == exported + dropped + folded
