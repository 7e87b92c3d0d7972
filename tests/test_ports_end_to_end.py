"""Service ports at both layers, against the real things (issue 32): `[web, dns]` over kernel
conntrack (a node and a peer joined by veth) with the records read by the PyPI `ipfix`
package and summed against `conntrack -L`; the deny table on a real Open vSwitch, its
flows' counters against the records; the OVS userspace source; Antrea's packet-ins; and a
reload from web to DNS at both layers at once.

web is tcp/80, tcp/443 and udp/443; dns is udp/53 and tcp/53. The port is the service port,
the original direction's destination port: traffic *from* port 53 is not DNS here."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from helpers import OVSFLOW, agent_config
from ipfix_sink import DatagramSink
from lab.antrea import AntreaStandIn
from lab.netns import LAB, PYTHON, Netns
from lab.ovs_lab import CONNTRACK_PIPELINE, OvsLab
from test_antrea_records import utc
from test_conntrack_kernel import conntrack_list
from test_deny import lab, wait_for  # noqa: F401 - lab: pod1 > pod2 denied (IPv4), a fixture
# node: a namespace whose conntrack puts all but loopback in zone 65520, its peer beside it
from test_ovsdb_bad_values import CLIENT as NODE, SERVER as PEER, node  # noqa: F401
WEB_AND_DNS = {(6, 80), (6, 443), (17, 443), (17, 53), (6, 53)}
DENY_TABLE = 250
COOKIE = "0x6f7673666c6f7700"
UDP6 = ("import socket, sys\n"
        "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        "for _ in range(int(sys.argv[3])): s.sendto(b'u' * 50, (sys.argv[1], int(sys.argv[2])))\n")


def start_server(ns: Netns, kind: str, port: int, reply: str = "3000") -> None:
    server = ns.popen(PYTHON, "-u", str(LAB / "traffic.py"), kind, str(port), reply,
                      stdout=subprocess.PIPE, text=True)
    assert "listening" in server.stdout.readline()


def tcp_exchange(node: Netns, port: int, chunk: int, count: int, pause: float) -> int:
    """A TCP connection to the peer's `port`, its reply read to the end; its source port."""
    start_server(node.peer, "tcp-server", port)
    client = json.loads(node.traffic("tcp-client", PEER, str(port), str(chunk), str(count),
                                     str(pause)).stdout)
    assert client["received"] == 3000
    return client["sport"]


def mixed_traffic(node: Netns) -> None:
    """Web and DNS (several TCP chunks to port 80 span active timeouts), and what is neither:
    TCP to 8080, UDP to 5353 and 54, UDP *from* port 53, SCTP to port 80 (the port of web,
    not its protocol), ICMP and GRE."""
    tcp_exchange(node, 80, 20_000, 4, 1.2)
    tcp_exchange(node, 443, 5000, 1, 0)
    tcp_exchange(node, 53, 300, 1, 0)
    tcp_exchange(node, 8080, 5000, 1, 0)
    node.traffic("udp", PEER, "443", "3", "200")
    node.traffic("udp", PEER, "53", "2", "60")
    node.traffic("udp", PEER, "5353", "2", "60")
    node.traffic("udp", PEER, "54", "1", "60")
    node.traffic("udp", PEER, "7777", "2", "60", "53")
    node.run("ping", "-c", "2", "-i", "0.2", "-W", "1", PEER)
    node.traffic("sctp-init", NODE, PEER, "5000", "80")
    node.traffic("gre", NODE, PEER)


NAMES = {"tcp": 6, "udp": 17}


def is_deny(record: dict) -> bool:
    """A deny record (templates 260/261: only they carry samplingProbability)."""
    return "samplingProbability" in record


def is_deny_total(record: dict) -> bool:
    """A deny totals record (template 270), not a connection's (test_deny_totals.py)."""
    return "layer2OctetDeltaCount" in record


def conntrack_totals(ns: Netns) -> dict[tuple[int, int, int], dict[str, int]]:
    """`conntrack -L` of the TCP and UDP entries of zone 65520 (not the export over
    loopback): (protocol, sport, dport) -> counters."""
    return {(NAMES[e["protocol"]], int(e["sport"]), int(e["dport"])): {
        "packetDeltaCount": int(e["packets"]), "octetDeltaCount": int(e["bytes"]),
        "reversePacketDeltaCount": int(e["reply_packets"]),
        "reverseOctetDeltaCount": int(e["reply_bytes"])}
        for e in conntrack_list(ns, "-w", "65520") if e["protocol"] in NAMES}


def sums(records: list[dict]) -> dict[tuple[int, int, int], dict[str, int]]:
    """Each connection's deltas summed, as the collector received them."""
    summed: dict = defaultdict(lambda: defaultdict(int))
    for r in records:
        key = (r["protocolIdentifier"], r["sourceTransportPort"], r["destinationTransportPort"])
        for name in ("packetDeltaCount", "octetDeltaCount", "reversePacketDeltaCount",
                     "reverseOctetDeltaCount"):
            summed[key][name] += r[name]
    return {key: dict(values) for key, values in summed.items()}


@contextmanager
def exporting(tmp_path: Path, config: Callable[[int], str], ns: Netns | None = None):
    """`ovsflow run` (in `ns`, if given) for the block, with the configuration `config`
    writes for a collector port, exporting to a `DatagramSink` beside it. Yields a namespace
    with the `agent`, its `config` path and its `log_path`; afterwards the agent has been
    stopped with SIGTERM (and must have exited 0; by PID with SIGKILL if the block failed),
    `log` holds its stderr and `records` what the sink received."""
    prefix = ns.prefix() if ns is not None else []
    sink = DatagramSink(tmp_path / "datagrams", prefix=prefix)
    path, config_path = tmp_path / "agent.log", Path(config(sink.port))
    with open(path, "w") as stream:
        agent = subprocess.Popen([*prefix, OVSFLOW, "run", "--config", str(config_path)],
                                 stderr=stream)
    run = SimpleNamespace(agent=agent, config=config_path, log_path=path, log="", records=[])
    try:
        yield run
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, path.read_text()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        sink.stop()
        run.log, run.records = path.read_text(), sink.records()


def test_web_and_dns_export_exactly_their_connections_with_conntrack_totals(node, tmp_path):
    with exporting(tmp_path, lambda port: agent_config(tmp_path, port, ["web", "dns"]),
                   node) as run:
        time.sleep(1.5)  # the agent switches conntrack accounting on before traffic starts
        mixed_traffic(node)
        time.sleep(1.5)  # a few polls after the last packet: the counters are final
        totals = conntrack_totals(node)
        count = node.run(OVSFLOW, "conntrack", "--config", str(run.config), "--count").stdout
    records = run.records
    summed = sums(records)
    assert {(protocol, dport) for protocol, _, dport in summed} == WEB_AND_DNS, summed
    expected = {key: counters for key, counters in totals.items() if key[::2] in WEB_AND_DNS}
    assert len(expected) == 5 and count.strip() == "5"  # `ovsflow conntrack --count` too
    assert {key[::2] for key in totals} - WEB_AND_DNS == {  # the others were in conntrack too
        (6, 8080), (17, 5353), (17, 54), (17, 7777)}
    assert summed == expected
    port_80 = [r for r in records if r["destinationTransportPort"] == 80]
    assert len(port_80) >= 2 and port_80[-1]["flowEndReason"] == 3  # deltas over records
    assert {r["protocolIdentifier"] for r in records} == {6, 17}  # no SCTP to port 80, no ICMP


# --- the deny table on a real Open vSwitch

@pytest.fixture
def lab6(lab):  # noqa: F811 - test_deny's lab, imported above
    """test_deny's lab (pod1 > pod2 denied, rule 42, into the deny table), IPv6 too."""
    for pod, address in ((lab.pod1, "fd55::1"), (lab.pod2, "fd55::2")):
        pod.run("ip", "-6", "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
    mac = lab.pod2.run("cat", "/sys/class/net/eth0/address").stdout.strip()
    lab.pod1.run("ip", "-6", "neigh", "add", "fd55::2", "lladdr", mac, "dev", "eth0")
    lab.ofctl("add-flow", f"table=0,priority=100,in_port={lab.ofport(lab.pod1)},ipv6,"
                          "ipv6_dst=fd55::2,actions=load:42->NXM_NX_REG3[],"
                          f"resubmit(,{DENY_TABLE})")
    return lab


def deny_flows(lab) -> dict[str, int]:
    """Our flows in the deny table, as their match (`tcp,tp_dst=80`; '' for the drop) ->
    n_packets, once the datapath has handed its counters over."""
    lab.appctl("revalidator/wait")
    flows = {}
    for line in lab.ofctl("dump-flows", f"table={DENY_TABLE}").splitlines():
        if COOKIE in line:
            match = re.search(r"priority=\d+,?(\S*) actions", line).group(1)
            flows[match] = int(re.search(r"n_packets=(\d+)", line).group(1))
    return flows


def web_and_dns_flows(v6: str = "") -> set[str]:
    return {f"{protocol}{v6},tp_dst={port}" for protocol, port in (
        ("tcp", 80), ("tcp", 443), ("udp", 443), ("udp", 53), ("tcp", 53))}


def denied_mix(lab) -> None:
    """pod1 > pod2, all denied: web and DNS, and what is neither, IPv4 and IPv6."""
    pod1, pod2 = lab.pod1, lab.pod2.address
    pod1.traffic("udp", pod2, "53", "3", "100")
    pod1.traffic("udp", pod2, "443", "2", "100")
    pod1.traffic("udp", pod2, "5353", "2", "100")
    pod1.traffic("udp", pod2, "7777", "1", "100", "53")  # from port 53: not DNS
    for port in ("80", "443", "8080"):
        pod1.traffic("tcp-syn", pod2, port)
    pod1.run("ping", "-c", "2", "-i", "0.2", "-W", "1", pod2, check=False)
    pod1.traffic("sctp-init", lab.pod1.address, pod2, "5000", "80")
    pod1.run(PYTHON, "-c", UDP6, "fd55::2", "53", "2")
    pod1.run(PYTHON, "-c", UDP6, "fd55::2", "5353", "1")


def deny_config(tmp_path, lab, port, protocols, **flow_exporter) -> str:
    return agent_config(tmp_path, port, protocols,
                        flowExporter={"idleFlowExportTimeout": "2s", **flow_exporter},
                        ovs={"runDir": lab.run_dir, "bridge": lab.bridge,
                             "denyTable": DENY_TABLE})


def test_only_denied_packets_to_web_and_dns_ports_reach_ovsflow(lab6, tmp_path):
    lab = lab6
    with exporting(tmp_path, lambda port: deny_config(tmp_path, lab, port,
                                                      ["web", "dns"])) as run:
        installed = wait_for(lambda: len(deny_flows(lab)) == 11 and deny_flows(lab),
                             what="ovsflow's deny flows")
        assert set(installed) == {""} | web_and_dns_flows() | web_and_dns_flows("6")
        denied_mix(lab)
        time.sleep(1.5)
        counters = deny_flows(lab)
    deny = [r for r in run.records if is_deny(r)]
    packets: dict = defaultdict(int)
    for r in deny:
        family = "6" if "destinationIPv6Address" in r else ""
        protocol = {6: "tcp", 17: "udp"}[r["protocolIdentifier"]]
        packets[f"{protocol}{family},tp_dst={r['destinationTransportPort']}"] += \
            r["packetDeltaCount"]
    # every packet a flow sent to the controller is in the records, and nothing else
    assert dict(packets) == {match: n for match, n in counters.items() if match and n}
    assert (counters["udp,tp_dst=53"], counters["udp6,tp_dst=53"],
            counters["udp,tp_dst=443"]) == (3, 2, 2)
    assert counters["tcp,tp_dst=80"] >= 1 and counters["tcp,tp_dst=443"] >= 1
    # dropped in the datapath: 5353 (2), from port 53 (1), SYNs to 8080 (1 or more), pings
    # (2), SCTP to port 80 (1), IPv6 to 5353 (1)
    assert counters[""] >= 8
    taken = int(re.search(r"deny path: (\d+) packet-ins taken", run.log).group(1))
    assert taken == sum(packets.values())
    assert ", 0 of unwanted" in run.log  # the userspace filter had nothing left to drop


def test_the_ovs_userspace_source_keeps_only_web_and_dns(tmp_path):
    """`ovsflow conntrack` over ovs-vswitchd's conntrack, against its own dump."""
    lab = OvsLab(tmp_path / "ovs")
    try:
        client, server = lab.add_pod("10.67.0.1/24"), lab.add_pod("10.67.0.2/24")
        for flow in CONNTRACK_PIPELINE:
            lab.ofctl("add-flow", flow)
        for port in (80, 8080, 53):
            start_server(server, "tcp-server", port)
            client.traffic("tcp-client", server.address, str(port), "500", "1", "0")
        for port, sport in (("53", "0"), ("5353", "0"), ("443", "0"), ("9999", "53")):
            client.traffic("udp", server.address, port, "2", "50", sport)
        client.run("ping", "-c", "1", "-W", "1", server.address)
        config = agent_config(tmp_path, 4739, ["web", "dns"], conntrack={"source": "ovs"},
                              ovs={"runDir": lab.run_dir, "bridge": lab.bridge})
        listed = subprocess.run([OVSFLOW, "conntrack", "--config", config],
                                capture_output=True, text=True, timeout=60)
        count = subprocess.run([OVSFLOW, "conntrack", "--config", config, "--count"],
                               capture_output=True, text=True, timeout=60)
        dump = lab.appctl("dpctl/dump-conntrack", "zone=65520")
    finally:
        lab.stop()
    assert listed.returncode == 0, listed.stderr
    ours = sorted((e["protocol"], e["sourcePort"], e["destinationPort"])
                  for e in map(json.loads, listed.stdout.splitlines()))
    theirs = sorted((NAMES[protocol], int(sport), int(dport)) for protocol, sport, dport in
                    re.findall(r"^(tcp|udp),orig=\(src=[^,]+,dst=[^,]+,sport=(\d+),"
                               r"dport=(\d+)\)", dump, re.M)
                    if (NAMES[protocol], int(dport)) in WEB_AND_DNS)
    assert ours == theirs and {(p, d) for p, _, d in ours} == {(6, 80), (6, 53), (17, 53),
                                                               (17, 443)}
    assert count.stdout.strip() == str(len(theirs))


def test_antrea_mode_filters_antreas_packet_ins_by_port_in_userspace(tmp_path):
    """`denySource: antrea`: ovsflow installs nothing, so every denied packet Antrea sends
    to its controller comes to ovsflow too; the userspace filter keeps UDP to 53 and TCP to
    80 only (the lab's stand-in denies client > server by an Antrea-native rule, and
    client > isolated by a K8s NetworkPolicy's default drop)."""
    lab = OvsLab(tmp_path / "ovs")
    antrea = None
    try:
        client = lab.add_pod("10.59.0.1/24", name="client", namespace="shop")
        server = lab.add_pod("10.59.0.2/24", name="server", namespace="shop")
        isolated = lab.add_pod("10.59.0.3/24", name="isolated", namespace="vault")
        antrea = AntreaStandIn(lab.run_dir, lab.bridge, tmp_path / "antrea.json", {
            "rules": [{"id": 5, "direction": "egress", "action": "drop", "from": ["client"],
                       "to": ["server"], "logging": True}],
            "isolated": [{"pod": "isolated", "direction": "ingress", "logging": True}]})
        config = lambda port: agent_config(  # noqa: E731
            tmp_path, port, ["dns", "tcp/80"],
            ovs={"runDir": lab.run_dir, "bridge": lab.bridge, "denySource": "antrea"})
        with exporting(tmp_path, config) as run:
            wait_for(lambda: "Antrea's controller id is" in run.log_path.read_text(),
                     timeout=15, what="ovsflow beside Antrea")
            client.traffic("udp", server.address, "5353", "3", "100")
            client.traffic("tcp-syn", server.address, "80")
            client.traffic("udp", isolated.address, "53", "2", "100")
            client.traffic("tcp-syn", isolated.address, "8080")
            time.sleep(1.0)
    finally:
        if antrea is not None:
            antrea.stop()
        lab.stop()
    packets: dict = defaultdict(int)
    for r in run.records:
        if is_deny(r):
            packets[r["protocolIdentifier"], r["destinationTransportPort"]] += \
                r["packetDeltaCount"]
    assert set(packets) == {(17, 53), (6, 80)} and packets[17, 53] == 2, packets
    taken, unwanted = map(int, re.search(
        r"deny path: (\d+) packet-ins taken, \d+ of other flows ignored, (\d+) of unwanted",
        run.log).groups())
    assert unwanted >= 3 + 1  # UDP to 5353, SYNs to 8080: dropped by the userspace filter
    assert taken >= sum(packets.values()) + unwanted


# --- a reload at both layers

def test_a_reload_from_web_to_dns_changes_both_layers_and_loses_nothing(
        node, lab, tmp_path):  # noqa: F811 - test_deny's lab
    """[web, keep] -> [dns, keep], keep being a group of the user's (tcp/9000), after a
    file with errors that changes nothing. The agent polls the node's kernel conntrack and
    owns the lab switch's deny table. A connection to
    port 9000 lives across the reload: its deltas still sum to conntrack's totals. One to
    port 80 lives across it too: after the reload it is no longer followed (no record, and
    no end record). DNS from before the reload is exported from its conntrack totals. The
    deny table's flows follow: TCP to 80 reaches ovsflow before, DNS after."""
    control = tmp_path / "clients"
    control.mkdir()
    for port in (9000, 80):
        start_server(node.peer, "steady-server", port, "700")
    with exporting(tmp_path, lambda port: deny_config(
            tmp_path, lab, port, ["web", "keep"], protocolGroups={"keep": ["tcp/9000"]}),
            node) as run:
        wait_for(lambda: "tcp,tp_dst=80" in deny_flows(lab), what="web's deny flows")
        time.sleep(0.5)  # conntrack accounting is on
        clients = {port: node.popen(PYTHON, "-u", str(LAB / "traffic.py"), "steady-clients",
                                    PEER, str(port), "1", "1000", "0.3", str(control),
                                    stdout=subprocess.PIPE, text=True) for port in (9000, 80)}
        sport = {port: json.loads(c.stdout.readline())["ports"][0]
                 for port, c in clients.items()}
        node.traffic("udp", PEER, "53", "3", "60", "40053")
        lab.pod1.traffic("udp", lab.pod2.address, "53", "2", "100")  # dropped: not web
        lab.pod1.traffic("tcp-syn", lab.pod2.address, "80")
        time.sleep(2)
        before = deny_flows(lab)

        # a file with a wrong port and a cycle first: refused whole, nothing changes
        config = yaml.safe_load(run.config.read_text())
        config["flowExporter"]["protocols"] = ["dns", "keep", "udp/0"]
        config["flowExporter"]["protocolGroups"]["keep"].append("keep")
        run.config.write_text(yaml.safe_dump(config))
        run.agent.send_signal(signal.SIGHUP)
        refused = wait_for(lambda: [line for line in run.log_path.read_text().splitlines()
                                    if "keeping the running configuration" in line],
                           what="the refused reload")
        assert "flowExporter.protocols[2]: 'udp/0'" in refused[0]
        assert "flowExporter.protocolGroups.keep[1]: 'keep' names its own group" in refused[0]
        assert set(deny_flows(lab)) == set(before)

        config["flowExporter"]["protocols"] = ["dns", "keep"]
        config["flowExporter"]["protocolGroups"]["keep"] = ["tcp/9000"]
        run.config.write_text(yaml.safe_dump(config))
        run.agent.send_signal(signal.SIGHUP)
        after = wait_for(lambda: (f := deny_flows(lab)) and "udp,tp_dst=53" in f
                         and "tcp,tp_dst=80" not in f and f, what="dns's deny flows")
        reloaded = time.time()

        node.traffic("udp", PEER, "53", "2", "60", "40053")
        lab.pod1.traffic("udp", lab.pod2.address, "53", "3", "100")
        lab.pod1.traffic("tcp-syn", lab.pod2.address, "80")  # dropped: not DNS
        time.sleep(2)
        (control / "stop").touch()
        (control / "close").touch()
        for client in clients.values():
            client.wait(timeout=30)
        time.sleep(1.5)  # the connections' ends polled
        totals = conntrack_totals(node)
        counters = deny_flows(lab)
    records = run.records
    conntrack_records = [r for r in records if not is_deny(r) and not is_deny_total(r)]
    deny = [r for r in records if is_deny(r)]
    summed = sums(conntrack_records)

    kept = (6, sport[9000], 9000)
    assert summed[kept] == totals[kept]  # across the reload, nothing lost or counted twice
    kept_ends = [utc(r["flowEndMilliseconds"]) for r in conntrack_records
                 if r["destinationTransportPort"] == 9000]
    assert min(kept_ends) < reloaded < max(kept_ends)
    web = [r for r in conntrack_records if r["destinationTransportPort"] == 80]
    assert web and max(utc(r["flowEndMilliseconds"]) for r in web) < reloaded + 1
    assert all(r["flowEndReason"] == 2 for r in web)  # not reported as ended
    dns = (17, 40053, 53)
    assert summed[dns] == totals[dns] and totals[dns]["packetDeltaCount"] == 5
    assert {key[2] for key in summed} == {9000, 80, 53}

    assert set(before) == {""} | {f"{protocol}{v6},tp_dst={port}" for v6 in ("", "6")
                                  for protocol, port in (("tcp", 80), ("tcp", 443),
                                                         ("udp", 443), ("tcp", 9000))}
    assert set(after) == {""} | {f"{protocol}{v6},tp_dst={port}" for v6 in ("", "6")
                                 for protocol, port in (("tcp", 53), ("udp", 53),
                                                        ("tcp", 9000))}
    deny_packets: dict = defaultdict(int)
    for r in deny:
        deny_packets[r["protocolIdentifier"], r["destinationTransportPort"]] += \
            r["packetDeltaCount"]
    assert dict(deny_packets) == {(6, 80): before["tcp,tp_dst=80"],
                                  (17, 53): counters["udp,tp_dst=53"]}
    assert counters["udp,tp_dst=53"] == 3
    assert "reload: exporting protocols tcp (6) ports 53,9000, udp (17) ports 53" in run.log
