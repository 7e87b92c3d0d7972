"""A value in OVSDB that no Kubernetes object could have (issue 18, finding 6): a Port's
`external_ids:pod-name` of 70,000 bytes, which ovsdb-server stores and sends, once made every
poll of the node fail. It must cost that one field: `ovsflow run` on kernel conntrack in a
network namespace with traffic, the Pod map on a real ovsdb-server, the records decoded by the
PyPI `ipfix` package; and in the store, a name that reaches the encoder anyway."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import ipfix.message
import pytest

from helpers import (
    OVSFLOW, agent_config, flow_records, ipfix_package_records, use_antrea_information_model,
)
from lab.netns import LAB, PYTHON, Netns, veth_pair
from lab.ovs_lab import OvsLab, pod_external_ids
from ovsflow.connection import Connection, identity
from ovsflow.enrich import INTRA_NODE, Enricher, PodNetworks
from ovsflow.exporter import Exporter
from ovsflow.ipfix import codec
from ovsflow.pods import POD_PORT, PodMap, PodRef
from ovsflow.store import ConnectionStore
from ovsflow.transport import UdpTransport

CLIENT, SERVER = "10.78.0.1", "10.78.0.2"
NODE = "node-9"
HUGE = 70_000

# Decodes what the agent sends with the PyPI `ipfix` package, in the node's namespace (the
# agent exports to its loopback): one JSON line per record, as it arrives.
RECEIVER = """
import json, socket, ipfix.message
from helpers import ipfix_package_records, use_antrea_information_model
use_antrea_information_model()
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
buffer = ipfix.message.MessageBuffer()
while True:
    buffer.from_bytes(sock.recv(65535))
    for record in ipfix_package_records(buffer):
        print(json.dumps(record, default=str), flush=True)
"""


class Receiver:
    def __init__(self, ns: Netns):
        code = f"import sys; sys.path[:0] = {sys.path!r}\n" + RECEIVER
        self.process = ns.popen(PYTHON, "-u", "-c", code, stdout=subprocess.PIPE, text=True)
        self.port = int(self.process.stdout.readline())
        self.records: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.records.append(json.loads(line))

    def stop(self) -> list[dict]:
        self.process.kill()  # by its PID; Netns.delete reaps it
        self._reader.join(timeout=10)
        return self.records


def add_pod_port(lab: OvsLab, port: str, external_ids: dict[str, str]) -> None:
    """A Port row with a Pod's external_ids, as Antrea's CNI writes them, in one transaction
    (ovs-vsctl's command line would do for 70,000 bytes too; this says it is OVSDB's)."""
    lab.transact(
        {"op": "insert", "table": "Interface", "row": {"name": port, "type": "internal"},
         "uuid-name": "i"},
        {"op": "insert", "table": "Port", "uuid-name": "p",
         "row": {"name": port, "interfaces": ["named-uuid", "i"],
                 "external_ids": ["map", sorted(external_ids.items())]}},
        {"op": "mutate", "table": "Bridge", "where": [["name", "==", lab.bridge]],
         "mutations": [["ports", "insert", ["set", [["named-uuid", "p"]]]]]})


@pytest.fixture
def node():
    """`node` holds the conntrack table (zone 65520, loopback left out: the agent exports
    there); `peer` is the other end of a veth."""
    node, peer = Netns("node"), Netns("peer")
    try:
        veth_pair(node, peer, f"{CLIENT}/24", f"{SERVER}/24")
        for rule in (["OUTPUT", "!", "-o", "lo", "-j", "CT", "--zone", "65520"],
                     ["PREROUTING", "!", "-i", "lo", "-j", "CT", "--zone", "65520"]):
            node.run("iptables", "-t", "raw", "-A", *rule)
        node.peer = peer
        yield node
    finally:
        peer.delete()
        node.delete()


@pytest.fixture
def lab(tmp_path):
    lab = OvsLab(tmp_path / "ovs")
    yield lab
    lab.stop()


def test_a_70000_byte_pod_name_costs_that_field_and_export_goes_on(node, lab, tmp_path):
    add_pod_port(lab, "client-port", pod_external_ids("c" * HUGE, "shop", [CLIENT],
                                                      "02:00:00:00:00:01", "/x"))
    # a long value the map does not read: stored, and no concern of the map's
    add_pod_port(lab, "server-port", {**pod_external_ids("server", "shop", [SERVER],
                                                         "02:00:00:00:00:02", "/y"),
                                      "container-id": "s" * HUGE})
    receiver = Receiver(node)
    config = agent_config(tmp_path, receiver.port, ["tcp", "udp"],
                          ovs={"runDir": lab.run_dir, "bridge": lab.bridge},
                          ipfix={"nodeName": NODE, "clusterPodCIDRs": ["10.78.0.0/24"]},
                          # a record a second of the quiet UDP connection too
                          flowExporter={"heartbeatFlowExportTimeout": "1s"})
    log_path = tmp_path / "agent.log"
    with open(log_path, "w") as log_file:
        agent = node.popen(OVSFLOW, "run", "--config", config, stderr=log_file)
    try:
        time.sleep(2)  # the Pod map's first load; conntrack accounting switched on
        node.traffic("udp", SERVER, "5353", "3", "100")
        server = node.peer.popen(PYTHON, "-u", str(LAB / "traffic.py"), "tcp-server", "8080",
                                 "5000", stdout=subprocess.PIPE, text=True)
        assert "listening" in server.stdout.readline()
        client = json.loads(node.traffic("tcp-client", SERVER, "8080", "20000", "4",
                                         "1.2").stdout)  # 3.6 s
        server.wait(timeout=30)
        time.sleep(1.5)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, log_path.read_text()[-3000:]
        time.sleep(0.5)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        records = receiver.stop()
    log = log_path.read_text()

    def connection(protocol, port):
        return [r for r in records if r["protocolIdentifier"] == protocol
                and r["destinationTransportPort"] == port
                and r["sourceIPv4Address"] == CLIENT]

    tcp, udp = connection(6, 8080), connection(17, 5353)
    assert {r["sourceTransportPort"] for r in tcp} == {client["sport"]}
    for records_of_one in (tcp, udp):
        # a record at every active timeout (1 s) while the connection lived (TCP 3.6 s, UDP
        # ~5 s until the agent stopped), then its last one: the polls went on
        assert len(records_of_one) >= 3, records_of_one
        ends = sorted(r["flowEndMilliseconds"] for r in records_of_one)
        assert ends[-1] > ends[0], ends
        for r in records_of_one:
            # the name over its bound is left out; the rest of the Pod and the peer stay
            assert (r["sourcePodNamespace"], r["sourcePodName"], r["sourceNodeName"]) == (
                "shop", "", NODE)
            assert (r["destinationPodNamespace"], r["destinationPodName"]) == ("shop",
                                                                                 "server")
            assert r["flowType"] == INTRA_NODE
    assert sum(r["octetDeltaCount"] for r in tcp) >= client["sent"]
    assert log.count(f"external_ids:pod-name has {HUGE} bytes, over 253") == 1, log
    assert "container-id" not in log
    assert "Traceback" not in log and "poll failed" not in log, log[-3000:]


def test_a_name_too_long_for_its_field_costs_its_records_alone():
    """Behind the map's bound, the encoder's: a Pod name that reaches the store over 65535
    bytes (a source without the map's bound) is cut in its field instead of failing the
    poll; its records, too long for any IPFIX message, are rejected alone by the exporter;
    the other connections' records go out, at this poll and the next."""
    pods = PodMap("unix:/nonexistent")  # never started: filled by hand, past its bound
    pods._pods[ipaddress.ip_address("10.79.0.1").packed] = PodRef("shop", "w" * HUGE)
    pods._learn("uuid-db", "db-port", {"antrea-type": POD_PORT, "pod-name": "db",
                                       "pod-namespace": "shop", "ip-address": "10.79.0.2"})
    store = ConnectionStore(1.0, 100.0, enricher=Enricher(pods, NODE, PodNetworks()),
                            heartbeat=1.0)  # records of connections that do not move

    def udp(source: str, port: int) -> Connection:
        src, dst = ipaddress.ip_address(source).packed, ipaddress.ip_address("10.79.0.2").packed
        return Connection(17, src, dst, port, 53, dst, src, 53, port, 0, 0, 0, 65520, 0, b"", 8,
                          "", 1, 100, 1, 100, True, 0, port, 30, False,
                          identity(17, src, dst, port, 53, 0, 0, 0, 65520))

    polled = [udp("10.79.0.1", 1000), udp("10.79.0.3", 1001), udp("10.79.0.1", 1002)]
    cut_before = codec.strings_cut
    store.update(polled, 0.0)
    batches = store.update(polled, 1.0) + store.update(polled, 2.0)  # active timeouts
    assert codec.strings_cut == cut_before + 1  # one distinct string, encoded once
    assert sorted(r.source_port for r in flow_records(batches)) == [1000, 1000, 1001, 1001,
                                                                    1002, 1002]

    use_antrea_information_model()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as collector:
        collector.bind(("127.0.0.1", 0))
        collector.settimeout(0.5)

        async def export() -> Exporter:
            exporter = Exporter(UdpTransport("127.0.0.1", collector.getsockname()[1]), 1)
            exporter.start()
            exporter.submit_encoded(batches)
            await exporter.close(5)
            return exporter

        exporter = asyncio.run(export())
        buffer, received = ipfix.message.MessageBuffer(), []
        with contextlib.suppress(TimeoutError):
            while True:
                buffer.from_bytes(collector.recv(65535))
                received += ipfix_package_records(buffer)
    # both polls queued at once: each connection's second record takes in its first
    assert [(r["sourceTransportPort"], r["destinationPodName"], r["sourcePodName"])
            for r in received] == [(1001, "db", "")]
    assert exporter.rejected == {"record length": 2}
    assert (exporter.stats.records_exported, exporter.stats.records_rejected,
            exporter.stats.records_folded) == (1, 2, 3)
