"""Kernel conntrack in network namespaces, real traffic of five protocols, and `ovsflow run`
and `ovsflow conntrack` reading it; `conntrack -L` is the reference."""

import json
import re
import signal
import socket
import subprocess
import time

import pytest

from helpers import OVSFLOW, Collector
from netns import Netns, veth_pair

NODE, PEER = "10.77.0.1", "10.77.0.2"


@pytest.fixture
def node():
    """`node` holds the conntrack table: its raw table puts TCP to port 9999 in zone 100 and
    everything else in zone 65520. `peer` is the other end of a veth."""
    node, peer = Netns("node"), Netns("peer")
    try:
        veth_pair(node, peer, f"{NODE}/24", f"{PEER}/24")
        for rule in (["OUTPUT", "-p", "tcp", "--dport", "9999", "-j", "CT", "--zone", "100"],
                     ["OUTPUT", "-j", "CT", "--zone", "65520"],
                     ["PREROUTING", "-j", "CT", "--zone", "65520"]):
            node.run("iptables", "-t", "raw", "-A", *rule)
        node.peer = peer
        yield node
    finally:
        peer.delete()
        node.delete()


def write_config(tmp_path, port, protocols, zones="[65520]"):
    path = tmp_path / "ovsflow.yaml"
    path.write_text(f"""
flowExporter:
  flowCollectorAddr: "127.0.0.1:{port}:udp"
  flowPollInterval: 500ms
  activeFlowExportTimeout: 1s
  idleFlowExportTimeout: 30s
  protocols: {protocols}
conntrack:
  source: kernel
  zones: {zones}
""")
    return str(path)


def conntrack_list(ns, *args) -> list[dict]:
    """`conntrack -L` parsed: one dict per entry, orig/reply counters separated."""
    result = ns.run("conntrack", "-L", *args, check=False)
    entries = []
    for line in result.stdout.splitlines():
        fields = re.findall(r"(\w+)=(\S+)", line)
        entry, seen = {"protocol": line.split()[0]}, set()
        for key, value in fields:
            name = key if key not in seen else "reply_" + key
            seen.add(key)
            entry[name] = value
        entries.append(entry)
    return entries


def make_traffic(node, tcp_chunks=4):
    """TCP (several chunks, spanning active timeouts), UDP, ICMP, SCTP, GRE, and a TCP
    attempt in zone 100. Returns the TCP client's report."""
    peer = node.peer
    server = peer.popen(OVSFLOW.replace("ovsflow", "python"), "-u",
                        str(__import__("netns").TESTS / "traffic.py"), "tcp-server", "8080",
                        "5000", stdout=subprocess.PIPE, text=True)
    assert "listening" in server.stdout.readline()
    client = json.loads(node.traffic("tcp-client", PEER, "8080", "20000", str(tcp_chunks),
                                     "1.2").stdout)
    server.wait(timeout=30)
    node.traffic("udp", PEER, "5353", "3", "100")
    node.run("ping", "-c", "2", "-i", "0.2", "-W", "1", PEER)
    node.traffic("sctp-init", NODE, PEER, "5000", "6000")
    node.traffic("gre", NODE, PEER)
    node.traffic("tcp-syn", PEER, "9999")
    return client


def test_run_exports_exactly_the_configured_protocols_and_zones(node, tmp_path):
    collector = Collector("udp://127.0.0.1:0", timeout=120, prefix=node.prefix())
    config = write_config(tmp_path, collector.port, '[tcp, "ICMP", 132]')
    agent = node.popen(OVSFLOW, "run", "--config", config, "--log-level", "debug",
                       stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # the agent switches conntrack accounting on before traffic starts
        client = make_traffic(node)
        time.sleep(1.5)  # a few more polls
        reference = conntrack_list(node, "-p", "tcp", "--dport", "8080")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, agent.stderr.read()
    finally:
        records = collector.stop_and_read()

    protocols = {r["protocolIdentifier"] for r in records}
    assert protocols == {6, 1, 132}, records
    assert not [r for r in records if r.get("destinationTransportPort") == 9999]  # zone 100

    tcp = [r for r in records if r["protocolIdentifier"] == 6]
    assert {r["sourceTransportPort"] for r in tcp} == {client["sport"]}
    assert len(reference) == 1, reference
    [entry] = reference
    # It lived over 3.6 s: with a 1 s active timeout, at least two active-timeout records
    # came before the end-of-flow one.
    assert len(tcp) >= 3, tcp
    assert tcp[-1]["octetTotalCount"] == int(entry["bytes"])
    assert tcp[-1]["reverseOctetTotalCount"] == int(entry["reply_bytes"])
    assert tcp[-1]["packetTotalCount"] == int(entry["packets"])
    assert sum(r["octetDeltaCount"] for r in tcp) == int(entry["bytes"])
    assert sum(r["reverseOctetDeltaCount"] for r in tcp) == int(entry["reply_bytes"])
    assert tcp[-1]["flowEndReason"] == 3 and tcp[-1]["tcpState"] == "TIME_WAIT"
    assert all(r["flowEndReason"] == 2 for r in tcp[:-1])
    assert tcp[0]["flowStartMilliseconds"] <= tcp[0]["flowEndMilliseconds"]
    assert tcp[0]["flowStartSeconds"] == tcp[0]["flowStartMilliseconds"] // 1000

    icmp = [r for r in records if r["protocolIdentifier"] == 1]
    assert {(r["icmpTypeIPv4"], r["icmpCodeIPv4"]) for r in icmp} == {(8, 0)}
    assert (icmp[-1]["packetTotalCount"], icmp[-1]["reversePacketTotalCount"]) == (2, 2)
    assert sum(r["packetDeltaCount"] for r in icmp) == 2
    assert icmp[-1]["flowEndReason"] == 4  # still in conntrack when the agent stopped

    sctp = [r for r in records if r["protocolIdentifier"] == 132]
    assert {(r["sourceTransportPort"], r["destinationTransportPort"]) for r in sctp} == {
        (5000, 6000)}
    assert {r["_templateId"] for r in records} == {256}


def test_conntrack_command_agrees_with_conntrack_tools(node, tmp_path):
    make_traffic(node, tcp_chunks=1)
    config = write_config(tmp_path, 4739, "[]", zones="[]")
    result = node.run(OVSFLOW, "conntrack", "--config", config)
    ours = [json.loads(line) for line in result.stdout.splitlines()]
    theirs = conntrack_list(node)
    assert len(ours) == len(theirs) >= 6

    def key(protocol, src, dst, sport, dport, zone):
        return (int(protocol), src, dst, int(sport or 0), int(dport or 0), int(zone or 0))

    names = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132, "gre": 47}
    reference = {key(names.get(e["protocol"], e["protocol"]), e["src"], e["dst"],
                     e.get("sport"), e.get("dport"), e.get("zone")):
                 (int(e.get("packets", 0)), int(e.get("bytes", 0))) for e in theirs}
    decoded = {key(c["protocol"], c["source"], c["destination"], c["sourcePort"],
                   c["destinationPort"], c["zone"]): (c["packets"], c["octets"]) for c in ours}
    assert decoded == reference
    zones = {c["zone"] for c in ours}
    assert zones == {100, 65520}

    count = node.run(OVSFLOW, "conntrack", "--config",
                     write_config(tmp_path, 4739, "[tcp]", zones="[100]"), "--count")
    assert count.stdout.strip() == "1"  # the port-9999 attempt alone
