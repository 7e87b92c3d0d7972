"""Kernel conntrack in network namespaces, real traffic of five protocols, and `ovsflow run`
and `ovsflow conntrack` reading it; `conntrack -L` is the reference. Also the dump filter
probe and an entry-by-entry comparison over zones, protocols and both address families
(tests/conntrack_compare.py, which tests/test_kernel_61.py runs on Debian 12's kernel)."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import conntrack_compare
from helpers import OVSFLOW, Collector, agent_config
from lab.netns import LAB, PYTHON, Netns, veth_pair

NODE, PEER = "10.77.0.1", "10.77.0.2"


@pytest.fixture
def node():
    """`node` holds the conntrack table: its raw table puts TCP to port 9999 in zone 100 and
    everything else in zone 65520. `peer` is the other end of a veth."""
    node, peer = Netns("node"), Netns("peer")
    try:
        veth_pair(node, peer, f"{NODE}/24", f"{PEER}/24")
        # Loopback stays out: the agent exports to a collector there.
        for rule in (["OUTPUT", "-p", "tcp", "--dport", "9999", "-j", "CT", "--zone", "100"],
                     ["OUTPUT", "!", "-o", "lo", "-j", "CT", "--zone", "65520"],
                     ["PREROUTING", "!", "-i", "lo", "-j", "CT", "--zone", "65520"]):
            node.run("iptables", "-t", "raw", "-A", *rule)
        node.peer = peer
        yield node
    finally:
        peer.delete()
        node.delete()


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


def http_get(ns, path) -> str:
    """From inside the namespace: '<status> <body>' of the agent's metrics/health server."""
    code = ("import urllib.request, urllib.error\n"
            "try:\n"
            f"    r = urllib.request.urlopen('http://127.0.0.1:9495{path}', timeout=5)\n"
            "    print(r.status, r.read().decode().strip())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code, e.read().decode().strip())\n")
    return ns.run(PYTHON, "-c", code).stdout.strip()


def make_traffic(node, tcp_chunks=4):
    """TCP (several chunks, spanning active timeouts), UDP, ICMP, SCTP, GRE, and a TCP
    attempt in zone 100. Returns the TCP client's report."""
    peer = node.peer
    server = peer.popen(PYTHON, "-u", str(LAB / "traffic.py"), "tcp-server", "8080", "5000",
                        stdout=subprocess.PIPE, text=True)
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
    config = agent_config(tmp_path, collector.port, ["tcp", "ICMP", 132],
                          metrics={"bindAddress": "127.0.0.1:9495"})
    agent = node.popen(OVSFLOW, "run", "--config", config, "--log-level", "debug",
                       stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # the agent switches conntrack accounting on before traffic starts
        client = make_traffic(node)
        time.sleep(1.5)  # a few more polls
        reference = conntrack_list(node, "-p", "tcp", "--dport", "8080")
        metrics = http_get(node, "/metrics")
        health, ready = http_get(node, "/healthz"), http_get(node, "/readyz")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, agent.stderr.read()
    finally:
        records = collector.stop_and_read()

    protocols = {r["protocolIdentifier"] for r in records}
    assert protocols == {6, 1, 132}, records
    assert (health, ready) == ("200 ok", "200 ready")
    polls = float(re.search(r"^ovsflow_polls_total (\S+)$", metrics, re.M).group(1))
    assert polls >= 5
    assert re.search(r'^ovsflow_records_exported_total\{collector="[^"]+"\} [1-9]', metrics,
                     re.M)
    assert re.search(r'^ovsflow_records_by_protocol_total{layer="conntrack",protocol="tcp"} '
                     r"[1-9]", metrics, re.M)
    histogram_count = float(re.search(r"^ovsflow_poll_duration_seconds_count (\S+)$", metrics,
                                      re.M).group(1))
    assert histogram_count == polls
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
    config = agent_config(tmp_path, 4739, [], conntrack={"zones": []})
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
                     agent_config(tmp_path, 4739, ["tcp"], conntrack={"zones": [100]}),
                     "--count")
    assert count.stdout.strip() == "1"  # the port-9999 attempt alone


@pytest.mark.parametrize("trigger", ["SIGHUP", "file change"])
def test_a_reload_changes_the_poller_filter_live(node, tmp_path, trigger):
    collector = Collector("udp://127.0.0.1:0", timeout=120, prefix=node.prefix())
    config = agent_config(tmp_path, collector.port, ["tcp"])
    agent = node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        node.traffic("udp", PEER, "7001", "2", "10")
        time.sleep(1.5)
        agent_config(tmp_path, collector.port, ["udp"])
        if trigger == "SIGHUP":
            agent.send_signal(signal.SIGHUP)
        reloaded_ms = time.time() * 1000
        time.sleep(1)
        node.traffic("udp", PEER, "7002", "2", "10")
        node.traffic("tcp-syn", PEER, "7003")
        time.sleep(1.5)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
    finally:
        records = collector.stop_and_read()
    udp = [r for r in records if r["protocolIdentifier"] == 17]
    assert {r["destinationTransportPort"] for r in udp} == {7001, 7002}
    # 7001 existed before the reload but only became exportable with it
    assert all(r["flowEndMilliseconds"] >= reloaded_ms - 1000 for r in udp)
    assert not [r for r in records if r.get("destinationTransportPort") == 7003]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """tests/conntrack_compare.py in a namespace of its own on the host's kernel (the same
    script runs on Debian 12's kernel in tests/test_kernel_61.py)."""
    report = tmp_path_factory.mktemp("compare") / "report.json"
    ns = Netns("compare")
    try:
        ns.run(PYTHON, str(Path(__file__).with_name("conntrack_compare.py")), str(report))
    finally:
        ns.delete()
    return json.loads(report.read_text())


def test_the_probe_finds_the_filters_this_kernel_applies(compared):
    release = tuple(map(int, re.match(r"(\d+)\.(\d+)", compared["kernel"]).groups()))
    # zone-filtered dumps since Linux 6.8; the family and CTA_FILTER's protocol long before,
    # and its destination port of TCP and UDP (not of SCTP, DCCP, UDP-Lite)
    assert compared["probe"] == {"family": True, "protocol": True, "zone": release >= (6, 8),
                                 "ports": [6, 17]}


def test_a_few_tcp_and_udp_ports_are_dumped_one_port_at_a_time(compared):
    """tcp/2520, udp/2007, udp/2100, sctp/2510 and icmp, every zone: a dump per family and
    TCP or UDP port (6), one per family for SCTP, whose ports the kernel does not filter
    (2), one for ICMP: 9, where a dump per protocol would be 7."""
    case = compared["cases"][6]
    assert case["protocols"][:4] == ["tcp/2520", "udp/2007", "udp/2100", "sctp/2510"]
    assert case["dumps"] == 9


@pytest.mark.parametrize("case", range(len(conntrack_compare.CASES)),
                         ids=[f"zones={z}-protocols={p}" for z, p in conntrack_compare.CASES])
def test_conntrack_command_lists_every_family_as_conntrack_tools_do(compared, case):
    conntrack_compare.check(compared, case)


def test_the_probe_entry_is_gone_and_nothing_else(compared):
    assert compared["created"] == len(compared["conntrack"]) == 80
    assert [e for e in compared["conntrack"] if e[2] == "192.0.2.1"] == []


def test_conntrack_command_writes_no_sysctl(compared):
    assert compared["sysctls"] == {"nf_conntrack_acct": "0", "nf_conntrack_timestamp": "0"}
