"""A flow database users can query: two simulated nodes, each a network namespace with kernel
conntrack (zone 65520), routed Pods in namespaces of their own and an `ovsflow run` agent,
export to pmacct's nfacctd, which writes into PostgreSQL with deploy/pmacct's configuration,
primitives and schema as shipped. Traffic within and between the nodes; then the SQL view
"bytes by source Pod and destination Pod" must give conntrack's own counters
(`conntrack -L`), exactly, and each node's rows Antrea's fields: Pods, nodes, flowType and
the NetworkPolicy rule ids the node's conntrack labels carry.

    collector netns: nfacctd :4739 --(unix socket)--> PostgreSQL (a temporary directory)
      |  172.31.N.0/30
    node1 netns (10.10.1.0/24) ==== 192.168.77.0/24 ==== node2 netns (10.10.2.0/24)
      | veth, /32 routes, proxy ARP                          |
    web 10.10.1.2, cache 10.10.1.3                         db 10.10.2.2, api 10.10.2.3

Each node's Pods are also Port rows (Antrea's external_ids) of its own Open vSwitch
(lab/ovs_lab.py), from which its agent learns their names; the packets go through the kernel.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import zlib
import xml.etree.ElementTree as ElementTree
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import OVSFLOW, agent_config
from test_antrea_records import wait_for
from lab.netns import PYTHON, Netns, sh
from lab.ovs_lab import OvsLab, pod_external_ids, set_external_ids
from ovsflow.deny.totals import TotalsRecord
from ovsflow.enrich import INTER_NODE, INTRA_NODE
from ovsflow.ipfix.messages import MessageEncoder
from ovsflow.ipfix.templates import ALL_TEMPLATES, DENY_TOTALS, OPTIONS_TEMPLATES, template_for
from ovsflow.record import DENY, RULE_ALLOW, RULE_DROP, FlowRecord

ROOT = Path(__file__).resolve().parent.parent
PMACCT = ROOT / "deploy/pmacct"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
ZONE = 65520
NODE_LINK = "192.168.77.{}/24"
COLLECTOR_PORT = 4739


class Postgres:
    """A PostgreSQL cluster of its own in a temporary directory, reachable only through its
    unix socket there; stopped by the postmaster's PID. The directory is outside pytest's
    (root-only) tmp_path: the server runs as the postgres user."""

    def __init__(self):
        self.directory = Path(tempfile.mkdtemp(prefix="ovsflow-pg-"))
        self.data = self.directory / "data"
        self.port = 5432  # the socket file's name, in a directory of its own: no TCP
        self.pid = None
        postgres = pwd.getpwnam("postgres")
        os.chown(self.directory, postgres.pw_uid, postgres.pw_gid)
        try:
            self._as_postgres(PG_BIN / "initdb", "-D", self.data, "-U", "postgres",
                              "--auth=trust", "--no-sync")
            self._as_postgres(PG_BIN / "pg_ctl", "start", "-w", "-D", self.data, "-l",
                              self.directory / "server.log", "-o",
                              f"-c listen_addresses='' -k {self.directory} -p {self.port}")
            self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except BaseException:
            self.stop()
            raise

    def _as_postgres(self, *args) -> None:
        sh("runuser", "-u", "postgres", "--", *map(str, args))

    def psql(self, *args: str, database: str = "pmacct") -> str:
        """As the superuser: nfacctd's role may only write the table."""
        return sh("psql", "-h", str(self.directory), "-p", str(self.port), "-U", "postgres",
                  "-d", database, "-v", "ON_ERROR_STOP=1", "-X", "-q", *args).stdout

    def query(self, sql: str) -> list[list[str]]:
        """Rows as lists of column texts."""
        out = self.psql("-A", "-t", "-F", "\t", "-c", sql)
        return [line.split("\t") for line in out.splitlines()]

    def stop(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGINT)  # "fast" shutdown
                wait_for(lambda: not Path(f"/proc/{self.pid}").exists(), "postgres stopping",
                         timeout=30)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.directory, ignore_errors=True)


class Node:
    """A simulated node: a network namespace that routes for its Pods (a namespace each, a
    veth with a /32 route and proxy ARP) and tracks their traffic in kernel conntrack zone
    65520, with NetworkPolicy rule ids in the conntrack labels where Antrea's pipeline puts
    them; its own OVSDB holds the Pods' Port rows, as Antrea's CNI writes them."""

    def __init__(self, index: int, run_dir: Path):
        self.index, self.name = index, f"node-{index}"
        self.subnet = f"10.10.{index}."
        self.netns = Netns(f"node{index}")
        self.pods: dict[str, Netns] = {}
        self.ovs = None
        self.agent = None
        try:
            self.netns.run("sysctl", "-qw", "net.ipv4.ip_forward=1",
                           "net.netfilter.nf_conntrack_acct=1",
                           "net.netfilter.nf_conntrack_timestamp=1")
            # Every packet but the collector link's (the agent's own export) in zone 65520.
            self.netns.run("iptables", "-t", "raw", "-A", "PREROUTING", "!", "-i",
                           "collector", "-j", "CT", "--zone", str(ZONE))
            self.ovs = OvsLab(run_dir)
        except BaseException:
            self.stop()
            raise

    def add_pod(self, name: str, namespace: str, ingress_rule: int, egress_rule: int) -> Netns:
        """A Pod at the node's next address. New connections to it get `ingress_rule` in
        ct_label bits 0-31, new ones from it `egress_rule` in bits 32-63 (each rule a policy
        of the Pod's own node, as in Antrea)."""
        index = len(self.pods)
        pod = self.pods[name] = Netns("pod")
        pod.address = f"{self.subnet}{index + 2}"
        device = f"pod{index}"
        self.netns.run("ip", "link", "add", device, "type", "veth", "peer", "name", "eth0",
                       "netns", pod.name)
        pod.run("ip", "addr", "add", f"{pod.address}/32", "dev", "eth0")
        pod.run("ip", "link", "set", "eth0", "up")
        pod.run("ip", "route", "add", "default", "dev", "eth0")
        self.netns.run("ip", "link", "set", device, "up")
        self.netns.run("sysctl", "-qw", f"net.ipv4.conf.{device}.proxy_arp=1")
        self.netns.run("ip", "route", "add", f"{pod.address}/32", "dev", device)
        for match, rule, shift in (("-d", ingress_rule, 0), ("-s", egress_rule, 32)):
            for bit in range(32):
                if rule >> bit & 1:
                    self.netns.run("iptables", "-t", "mangle", "-A", "FORWARD", match,
                                   pod.address, "-m", "conntrack", "--ctstate", "NEW", "-m",
                                   "connlabel", "--label", str(bit + shift), "--set")
        mac = pod.run("cat", "/sys/class/net/eth0/address").stdout.strip()
        port = f"{name}-port"
        self.ovs.vsctl("add-port", self.ovs.bridge, port, "--", "set", "Interface", port,
                       "type=internal", *set_external_ids("Port", port, pod_external_ids(
                           name, namespace, [pod.address], mac, f"/var/run/netns/{pod.name}")))
        pod.pod_name, pod.pod_namespace, pod.node = name, namespace, self
        pod.ingress_rule, pod.egress_rule = ingress_rule, egress_rule
        return pod

    def start_agent(self, directory: Path, collector: str) -> None:
        directory.mkdir()
        path = agent_config(
            directory, COLLECTOR_PORT, ["tcp", "udp"],
            flowExporter={"flowCollectorAddr": f"{collector}:{COLLECTOR_PORT}:udp"},
            ovs={"runDir": self.ovs.run_dir, "bridge": self.ovs.bridge},
            ipfix={"nodeName": self.name, "clusterPodCIDRs": ["10.10.0.0/16"]},
            state={"directory": str(directory / "state")})
        self.log = directory / "agent.log"
        with open(self.log, "w") as log:
            self.agent = self.netns.popen(OVSFLOW, "run", "--config", path, stderr=log)
        wait_for(lambda: re.search(rf"Pod map loaded: {len(self.pods)} Pod addresses",
                                   self.log.read_text()), f"{self.name}'s agent knowing its Pods")

    def conntrack(self) -> dict[tuple, tuple[int, int]]:
        """`conntrack -L` of zone 65520: (protocol, source, destination, source port,
        destination port) of the original direction -> its (packets, bytes)."""
        out = self.netns.run("conntrack", "-L", "-w", str(ZONE), "-o", "xml").stdout
        found = {}
        for flow in ElementTree.fromstring(out).iter("flow"):
            original = next(m for m in flow.iter("meta") if m.get("direction") == "original")
            layer4 = original.find("layer4")
            key = (int(layer4.get("protonum")), original.findtext("layer3/src"),
                   original.findtext("layer3/dst"), int(layer4.findtext("sport")),
                   int(layer4.findtext("dport")))
            found[key] = (int(original.findtext("counters/packets")),
                          int(original.findtext("counters/bytes")))
        return found

    def stop(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        for pod in self.pods.values():
            pod.delete()
        if self.ovs is not None:
            self.ovs.stop()
        self.netns.delete()


def nfacctd_config(directory: Path, postgres: Postgres) -> Path:
    """deploy/pmacct/nfacctd-pgsql.conf with this test's paths, database socket and a 1 s
    refresh instead of 60 s; every other key as shipped."""
    overrides = {"aggregate_primitives": str(PMACCT / "primitives.lst"),
                 "pre_tag_map": str(PMACCT / "pretag.map"),
                 "sql_host": str(postgres.directory), "sql_refresh_time": "1"}
    lines = []
    for line in (PMACCT / "nfacctd-pgsql.conf").read_text().splitlines():
        key = line.split(":", 1)[0]
        if not line.startswith("!") and key in overrides:
            line = f"{key}: {overrides.pop(key)}"
        lines.append(line)
    assert not overrides, f"not in the shipped configuration: {overrides}"
    path = directory / "nfacctd.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def postgres():
    server = Postgres()
    try:
        server.psql("-c", "CREATE ROLE pmacct LOGIN PASSWORD 'arealsmartpwd'",
                    database="postgres")
        server.psql("-c", "CREATE DATABASE pmacct", database="postgres")
        server.psql("-f", str(PMACCT / "schema.sql"))
        yield server
    finally:
        server.stop()


class Nfacctd:
    """nfacctd in the collector's namespace, with deploy/pmacct's configuration: started,
    stopped (SIGINT: it writes what it holds first; it ignores SIGTERM), started again."""

    def __init__(self, netns: Netns, config: Path, log: Path):
        self.netns, self.config, self.log = netns, config, log
        self.process = None

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.process = self.netns.popen("nfacctd", "-f", str(self.config), stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_for(lambda: f":{COLLECTOR_PORT} " in self.netns.run("ss", "-uln").stdout,
                 "nfacctd listening")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass  # Netns.delete kills it


@contextmanager
def running_nfacctd(tmp_path: Path, postgres: Postgres) -> Iterator[Nfacctd]:
    """nfacctd with the shipped configuration in a namespace of its own, the collector's;
    stopped at the end, its log then printed (shown when a test fails)."""
    nfacctd = Nfacctd(Netns("collector"), nfacctd_config(tmp_path, postgres),
                      tmp_path / "nfacctd.log")
    try:
        nfacctd.start()
        yield nfacctd
    finally:
        nfacctd.stop()
        nfacctd.netns.delete()
        print(nfacctd.log.read_text()[-3000:])


class Cluster(list):
    """The nodes (a list), and the nfacctd they export to."""

    def __init__(self, nodes: list[Node], nfacctd: Nfacctd):
        super().__init__(nodes)
        self.nfacctd = nfacctd


@pytest.fixture
def cluster(tmp_path, postgres):
    """nfacctd in the collector's namespace, and two nodes linked to each other and to it."""
    nodes: list[Node] = []
    with running_nfacctd(tmp_path, postgres) as nfacctd:
        collector = nfacctd.netns
        try:
            for index in (1, 2):
                node = Node(index, tmp_path / f"ovs{index}")
                nodes.append(node)
                node.netns.run("ip", "link", "add", "collector", "type", "veth", "peer",
                               "name", node.name, "netns", collector.name)
                node.netns.run("ip", "addr", "add", f"172.31.{index}.1/30", "dev",
                               "collector")
                node.netns.run("ip", "link", "set", "collector", "up")
                collector.run("ip", "addr", "add", f"172.31.{index}.2/30", "dev", node.name)
                collector.run("ip", "link", "set", node.name, "up")
            first, second = nodes
            first.netns.run("ip", "link", "add", "nodes", "type", "veth", "peer", "name",
                            "nodes", "netns", second.netns.name)
            for node, peer in ((first, second), (second, first)):
                node.netns.run("ip", "addr", "add", NODE_LINK.format(node.index), "dev",
                               "nodes")
                node.netns.run("ip", "link", "set", "nodes", "up")
                node.netns.run("ip", "route", "add", f"{peer.subnet}0/24", "via",
                               NODE_LINK.format(peer.index).split("/")[0])
            yield Cluster(nodes, nfacctd)
        finally:
            for node in nodes:
                node.stop()  # the agents first: nfacctd takes their last records


def tcp(client: Netns, server: Netns, port: int, chunks: int, chunk: int, reply: int) -> None:
    listener = server.popen(PYTHON, str(ROOT / "lab/traffic.py"), "tcp-server", str(port),
                            str(reply), stdout=subprocess.PIPE, text=True)
    assert "listening" in listener.stdout.readline()
    client.traffic("tcp-client", server.address, str(port), str(chunk), str(chunks), "0.2")
    assert listener.wait(timeout=30) == 0


def udp(client: Netns, server: Netns, port: int, count: int, size: int) -> None:
    client.traffic("udp", server.address, str(port), str(count), str(size))


def test_sql_bytes_by_pod_pair_equal_conntrack(cluster, postgres, tmp_path):
    first, second = cluster
    web = first.add_pod("web", "shop", ingress_rule=12, egress_rule=11)
    cache = first.add_pod("cache", "shop", ingress_rule=21, egress_rule=22)
    db = second.add_pod("db", "shop", ingress_rule=31, egress_rule=32)
    api = second.add_pod("api", "backend", ingress_rule=41, egress_rule=42)
    pods = {pod.address: pod for pod in (web, cache, db, api)}
    for index, node in enumerate(cluster, start=1):
        node.start_agent(tmp_path / f"agent{index}", f"172.31.{index}.2")

    tcp(web, cache, 8080, chunks=4, chunk=3000, reply=20_000)  # within node-1
    udp(web, cache, 5353, count=5, size=200)
    tcp(web, db, 5432, chunks=6, chunk=1500, reply=50_000)  # node-1 to node-2, twice
    tcp(web, db, 5433, chunks=2, chunk=700, reply=100)
    udp(api, web, 53, count=7, size=300)  # node-2 to node-1
    tcp(api, db, 9000, chunks=3, chunk=4000, reply=10)  # within node-2
    time.sleep(1)  # the last FIN and ACK through the veths
    # Read now: unanswered UDP leaves conntrack after 30 s.
    counted = {node: node.conntrack() for node in cluster}
    assert [len(counted[node]) for node in cluster] == [5, 4]  # inter-node: on both

    # The view: each connection once, as the source Pod's node counted it.
    expected: dict[tuple, Counter] = defaultdict(Counter)
    for node, entries in counted.items():
        for (_, source, destination, *_), (packets, octets) in entries.items():
            source_pod, destination_pod = pods[source], pods[destination]
            if source_pod.node is node:
                pair = (source_pod.pod_namespace, source_pod.pod_name,
                        destination_pod.pod_namespace, destination_pod.pod_name)
                expected[pair].update(bytes=octets, packets=packets, connections=1)
    assert sum(c["connections"] for c in expected.values()) == 6

    def view() -> dict:
        return {tuple(row[:4]): Counter(bytes=int(row[4]), packets=int(row[5]),
                                        connections=int(row[6]))
                for row in postgres.query("SELECT * FROM pod_bytes")}

    try:
        wait_for(lambda: view() == expected, "the view equal to conntrack's counters")
    except AssertionError:
        assert view() == expected  # pytest shows the difference

    # Each node's rows: its own Pods named, the other node's not; Antrea's flowType; the
    # rules of its own Pods (from its conntrack labels), action allow; its bytes.
    total = sum(octets for entries in counted.values() for _, octets in entries.values())
    try:
        wait_for(lambda: postgres.query("SELECT sum(bytes) FROM antrea_flows") == [[str(total)]],
                 "every node's bytes")
    except AssertionError:
        pass  # the checks below say what differs
    rows = postgres.query(
        "SELECT ip_src, ip_dst, port_dst, ip_proto, source_pod_namespace, "
        "source_pod_name, destination_pod_namespace, destination_pod_name, source_node_name, "
        "destination_node_name, flow_type, ingress_rule_name, ingress_rule_action, "
        "egress_rule_name, egress_rule_action, sum(bytes) FROM antrea_flows "
        "GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15")
    by_connection = Counter((row[0], row[1], int(row[2]), row[8] or row[9]) for row in rows)
    assert max(by_connection.values()) == 1  # one set of fields per connection and node
    found = {(row[0], row[1], int(row[2]), row[8] or row[9]): row[3:] for row in rows}
    for node, entries in counted.items():
        for (protocol, source, destination, _, port), (_, octets) in entries.items():
            source_pod, destination_pod = pods[source], pods[destination]
            here = (source_pod.node is node, destination_pod.node is node)
            assert found.pop((source, destination, port, node.name)) == [
                str(protocol),
                *((source_pod.pod_namespace, source_pod.pod_name) if here[0] else ("", "")),
                *((destination_pod.pod_namespace, destination_pod.pod_name) if here[1]
                  else ("", "")),
                node.name if here[0] else "", node.name if here[1] else "",
                str(INTRA_NODE if all(here) else INTER_NODE),
                *((str(destination_pod.ingress_rule), str(RULE_ALLOW)) if here[1]
                  else ("", "0")),
                *((str(source_pod.egress_rule), str(RULE_ALLOW)) if here[0] else ("", "0")),
                str(octets)], (node.name, source, destination, port)
    assert not found, f"rows of no conntrack entry: {found}"

    # docs/collectors.md's queries run as written, and find these rows.
    queries = re.findall(r"```sql\n(.*?)```", (ROOT / "docs/collectors.md").read_text(), re.S)
    assert len(queries) == 4  # two of the flows, two of the ledger
    for sql in queries:
        assert postgres.query(sql), sql


def test_nfacctd_restarted_mid_run_decodes_at_once_and_every_byte_reaches_the_table(
        cluster, postgres, tmp_path):
    """nfacctd stopped (SIGINT, as its unit should) and started again while the agents
    export: connections made before, during and after the outage reach the table, each
    node's bytes equal to its conntrack's, exactly; the records of the outage arrive within
    seconds of nfacctd's return; each agent's ledger is in ovsflow_ledger."""
    first, second = cluster
    web = first.add_pod("web", "shop", ingress_rule=12, egress_rule=11)
    cache = first.add_pod("cache", "shop", ingress_rule=21, egress_rule=22)
    db = second.add_pod("db", "shop", ingress_rule=31, egress_rule=32)
    api = second.add_pod("api", "backend", ingress_rule=41, egress_rule=42)
    for index, node in enumerate(cluster, start=1):
        node.start_agent(tmp_path / f"agent{index}", f"172.31.{index}.2")

    def table() -> dict[tuple, int]:
        """(source, destination, destination port, node) -> bytes, over every minute."""
        return {(row[0], row[1], int(row[2]), row[3]): int(row[4]) for row in postgres.query(
            "SELECT ip_src, ip_dst, port_dst, CASE WHEN source_node_name <> '' "
            "THEN source_node_name ELSE destination_node_name END, sum(bytes) "
            "FROM antrea_flows GROUP BY 1, 2, 3, 4")}

    def conntrack() -> dict[tuple, int]:
        return {(source, destination, port, node.name): octets
                for node in cluster for (_, source, destination, _, port), (_, octets)
                in node.conntrack().items()}

    tcp(web, cache, 8080, chunks=3, chunk=2000, reply=5000)  # before: within node-1
    tcp(web, db, 5432, chunks=2, chunk=1500, reply=9000)  # and node-1 to node-2
    counted = conntrack()
    wait_for(lambda: table() == counted, "the first connections in the table")
    cluster.nfacctd.stop()

    tcp(api, web, 8443, chunks=2, chunk=2500, reply=700)  # during the outage
    udp(cache, web, 5353, count=4, size=300)
    time.sleep(3)  # the agents keep their records: the kernel refuses them
    cluster.nfacctd.start()
    restarted = time.monotonic()
    wait_for(lambda: (api.address, web.address, 8443, "node-2") in table(),
             "the outage's records in the table")
    first_seen = time.monotonic() - restarted
    tcp(cache, db, 9000, chunks=2, chunk=1000, reply=100)  # after it came back
    time.sleep(1)
    counted = conntrack()
    assert len(counted) == 8  # 3 between the nodes (each on both), 2 within node-1
    try:
        wait_for(lambda: table() == counted, "every node's bytes equal to conntrack's")
    except AssertionError:
        assert table() == counted  # pytest shows the difference
    print(f"nfacctd: the outage's records in PostgreSQL {first_seen:.2f}s after its restart "
          "(sql_refresh_time 1 s)")
    assert first_seen < 6, first_seen  # a probe within 2 s, its answer 0.5 s, the refresh 1 s

    # Each agent's ledger, read where docs/collectors.md says
    for index, node in enumerate(cluster, start=1):
        address = f"172.31.{index}.2:{COLLECTOR_PORT}:udp"
        rows = postgres.query(
            "SELECT exporting_process_id, max(exported_flow_records), "
            "max(not_sent_flow_records), count(*) FROM ovsflow_ledger WHERE "
            f"peer_ip_src = '172.31.{index}.1' AND metering_process_id = 0 GROUP BY 1")
        [(process, exported, not_sent, ledgers)] = rows
        assert int(process) == zlib.crc32(address.encode())
        assert int(exported) > 0 and int(not_sent) == 0 and int(ledgers) >= 2
        [(tracked,)] = postgres.query(
            "SELECT max(ignored_data_records) FROM ovsflow_ledger WHERE "
            f"peer_ip_src = '172.31.{index}.1' AND metering_process_id = 1")
        assert tracked == "0"
    completeness = postgres.query("SELECT exporter, not_sent_flow_records, "
                                  "connections_not_tracked FROM ovsflow_completeness")
    assert sorted(completeness) == [["172.31.1.1", "0", "0"], ["172.31.2.1", "0", "0"]]


SEND = """import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for line in open(sys.argv[1]).read().split():
    s.sendto(bytes.fromhex(line), ("127.0.0.1", int(sys.argv[2])))
"""


def test_deny_totals_rows_beside_the_connections_rows(postgres, tmp_path):
    """Template 270's records (docs/ipfix.md) have no addresses: nfacctd writes '' for them,
    which an inet column refused, and with it every row of the same write (the deny
    record's below). The records are ovsflow's encoder's bytes, in one message with a deny
    record, as the deny path sends them."""
    now = int(time.time() * 1000)
    deny = FlowRecord(DENY, bytes([10, 10, 1, 2]), bytes([10, 10, 2, 2]), 17, 40000, 5353,
                      start_ms=now - 3000, end_ms=now, end_reason=2, packets=7, octets=700,
                      packet_delta=7, octet_delta=700, egress_rule_name="5",
                      egress_rule_action=RULE_DROP, source_pod_name="web",
                      source_pod_namespace="shop")
    frame = 142  # a 100-byte UDP payload's Ethernet frame: what OVS counts
    totals = [  # an egress default drop of web (IPv4), table mode's IPv4 UDP flow, an
        # Antrea rule's metric flow (both families: ipVersion 0)
        TotalsRecord(now - 3000, now, 2, 4, 0, 0, 65535, 40, 40 * frame, 40, 40 * frame, 0,
                     source_pod_name="web", source_pod_namespace="shop",
                     egress_rule_action=RULE_DROP),
        TotalsRecord(now - 3000, now, 2, 4, 17, 0, 65535, 3000, 3000 * frame, 3000,
                     3000 * frame, 0, ingress_rule_action=RULE_DROP,
                     egress_rule_action=RULE_DROP),
        TotalsRecord(now - 3000, now, 2, 0, 0, 0, 65535, 900, 900 * frame, 900, 900 * frame,
                     0, egress_rule_name="9", egress_rule_action=RULE_DROP)]
    encoder = MessageEncoder(1)
    template = template_for(deny)
    messages = encoder.template_messages(ALL_TEMPLATES, now // 1000) + encoder.data_messages(
        [(template.template, template.encode_many([deny])),
         (DENY_TOTALS.template, DENY_TOTALS.encode_many(totals))], now // 1000)
    (tmp_path / "messages").write_text("\n".join(m.hex() for m in messages))
    with running_nfacctd(tmp_path, postgres) as nfacctd:
        nfacctd.netns.run(PYTHON, "-c", SEND, str(tmp_path / "messages"), str(COLLECTOR_PORT))

        def rows() -> list[list[str]]:
            return postgres.query(
                "SELECT ip_src, ip_dst, ip_proto, source_pod_namespace, source_pod_name, "
                "ingress_rule_action, egress_rule_name, egress_rule_action, packets, bytes "
                "FROM antrea_flows ORDER BY packets")

        expected = [["10.10.1.2", "10.10.2.2", "17", "shop", "web", "0", "5", "2", "7", "700"],
                    ["", "", "0", "shop", "web", "0", "", "2", "40", str(40 * frame)],
                    ["", "", "17", "", "", "2", "", "2", "3000", str(3000 * frame)]]
        try:  # pmacct 1.7.7 leaves out the record of ipVersion 0 (docs/collectors.md)
            wait_for(lambda: rows() == expected, "the rows")
        except AssertionError:
            assert rows() == expected
        assert postgres.query("SELECT * FROM pod_bytes") == [
            ["shop", "web", "", "", "700", "7", "1"]]  # the connection alone


def config_keys(path: Path) -> dict[str, str]:
    """A pmacct configuration's `key: value` lines."""
    return dict(line.split(": ", 1) for line in path.read_text().splitlines()
                if line and not line.startswith("!"))


def test_every_pmacct_profile_aggregates_every_antrea_primitive():
    """PostgreSQL, Kafka and the compose lab's JSON print the same fields: all of
    primitives.lst's (Antrea's elements by their PEN 56506 ids, as go-ipfix registers them)
    after the 5-tuple."""
    primitives, ledger = {}, {}
    for line in (PMACCT / "primitives.lst").read_text().splitlines():
        if line and not line.startswith("!"):
            fields = dict(item.split("=", 1) for item in line.split())
            if fields["field_type"].startswith("56506:"):
                primitives[fields["name"]] = fields["field_type"]
            else:
                ledger[fields["name"]] = int(fields["field_type"])
    # the ledger's primitives: every element of ovsflow's options templates (IANA), once
    assert sorted(ledger.values()) == sorted({f.element.element_id for t in OPTIONS_TEMPLATES
                                              for f in t.fields})
    assert "aggregate[ledger]" in config_keys(PMACCT / "nfacctd-pgsql.conf")
    assert config_keys(PMACCT / "nfacctd-pgsql.conf")["aggregate[ledger]"].split(", ") == [
        "peer_src_ip", *ledger]
    registry = {f"{pen}:{number}": name for pen, number, name, _ in (
        line.split(",") for line in (ROOT / "tests/data/go_ipfix_registry.csv").read_text()
        .splitlines() if line.startswith("56506,"))}
    assert {name: registry[field] for name, field in primitives.items()} == {
        "source_pod_namespace": "sourcePodNamespace", "source_pod_name": "sourcePodName",
        "destination_pod_namespace": "destinationPodNamespace",
        "destination_pod_name": "destinationPodName", "source_node_name": "sourceNodeName",
        "destination_node_name": "destinationNodeName", "flow_type": "flowType",
        "ingress_rule_name": "ingressNetworkPolicyRuleName",
        "ingress_rule_action": "ingressNetworkPolicyRuleAction",
        "egress_rule_name": "egressNetworkPolicyRuleName",
        "egress_rule_action": "egressNetworkPolicyRuleAction"}
    for profile in (PMACCT / "nfacctd-pgsql.conf", PMACCT / "nfacctd-kafka.conf",
                    ROOT / "deploy/compose/nfacctd.conf"):
        keys = config_keys(profile)
        assert keys["aggregate"].split(", ") == [
            "src_host", "dst_host", "src_port", "dst_port", "proto", *primitives], profile
        assert keys["aggregate_primitives"] == "/etc/pmacct/primitives.lst", profile
        assert keys["nfacctd_time_new"] == "true", profile  # deltas binned as they arrive
