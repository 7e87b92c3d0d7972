"""`ovs.denySource: antrea` on a bridge as a real Antrea node has it: OpenFlow 1.0 and 1.5
only, beside the lab's stand-in for Antrea's agent (lab/antrea.py: OpenFlow 1.5, Antrea's
tables, registers, table names, Services, ct(commit) allows, logging and reject flows,
meters 256-258, and a controller with a random id). ovsflow installs nothing; Antrea's
controller keeps every packet-in. Records are read with the PyPI `ipfix` package, not with
ovsflow's own decoder."""

import re
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from helpers import OVSFLOW, Collector, agent_config, use_antrea_information_model
from lab.antrea import AntreaStandIn, route_services_via_gateway
from lab.antrea_pipeline import SCENARIO, SERVICE_IP, TABLE
from lab.netns import PYTHON
from lab.ovs_lab import OvsLab
from openflow import messages as m
from test_antrea_records import Datagrams
from test_deny import deny_flows, wait_for

DENY = 260  # the IPv4 deny template


@pytest.fixture(scope="module", autouse=True)
def information_model():
    use_antrea_information_model()


@pytest.fixture
def lab(tmp_path, request):
    """The node: its bridge at Antrea's protocols (or those the test asks for), its Pods;
    the stand-in is started by the test (`start_antrea`)."""
    with antrea_node(tmp_path, **getattr(request, "param", {})) as lab:
        yield lab


@contextmanager
def antrea_node(tmp_path, **bridge):
    """The lab of an Antrea node: `lab.client`, `lab.server`, ... (the Pods of SCENARIO);
    its stand-in, once a test started one (`lab.antrea`), stops with it."""
    lab = OvsLab(tmp_path / "ovs", **bridge)
    lab.antrea = None
    try:
        for address, name, namespace in (
                ("10.58.0.1/24", "client", "shop"), ("10.58.0.2/24", "server", "shop"),
                ("10.58.0.3/24", "web", "shop"), ("10.58.0.4/24", "dns", "kube-system"),
                ("10.58.0.5/24", "vault", "vault"),
                ("fd00:58::1/64", "client6", "shop"), ("fd00:58::2/64", "server6", "shop")):
            setattr(lab, name, lab.add_pod(address, name=name, namespace=namespace))
        route_services_via_gateway(lab.client)
        yield lab
    finally:
        if lab.antrea is not None:
            lab.antrea.stop()
        lab.stop()


def start_antrea(lab, tmp_path, **options) -> AntreaStandIn:
    lab.antrea = AntreaStandIn(lab.run_dir, lab.bridge, tmp_path / "antrea.json", SCENARIO,
                               **options)
    return lab.antrea


def metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def value(text: str, name: str, labels: str = "") -> float | None:
    found = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def metric(port: int, name: str, labels: str = "") -> float | None:
    try:
        return value(metrics(port), name, labels)
    except OSError:
        return None


@contextmanager
def agent(tmp_path, lab, metrics_port, deny_source="antrea", protocols=("udp", "tcp"),
          sink=None, **ovs):
    """`ovsflow run` exporting to `sink` (Datagrams: the `ipfix` package decodes) or to
    `ovsflow collect`; `session.records`, `session.log` after the block. `ovs`: more keys
    of the agent's `ovs` section."""
    collector = None if sink is not None else Collector("udp://127.0.0.1:0", timeout=300)
    path = agent_config(tmp_path, sink.port if sink else collector.port, list(protocols),
                        flowExporter={"idleFlowExportTimeout": "2s"},
                        ovs={"runDir": lab.run_dir, "bridge": lab.bridge,
                             "denySource": deny_source, **ovs},
                        metrics={"bindAddress": f"127.0.0.1:{metrics_port}"})
    process = subprocess.Popen([OVSFLOW, "run", "--config", path], stderr=subprocess.PIPE,
                               text=True)
    session = SimpleNamespace(process=process, records=[], log="")
    try:
        wait_for(lambda: metric(metrics_port, "ovsflow_openflow_connections_total") == 1,
                 what="ovsflow's first OpenFlow session")
        yield session
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        session.log = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if collector is not None:
            session.records = collector.stop_and_read()
        else:
            time.sleep(0.5)
            session.records = sink.records()


def attached(lab, port: int) -> int:
    """Waits until ovsflow shares the stand-in's current controller id; returns it."""
    wanted = lab.antrea.status()["controller_id"]
    wait_for(lambda: metric(port, "ovsflow_antrea_controller_id") == wanted, timeout=10,
             what=f"ovsflow on id {wanted}")
    return wanted


def bridge_state(lab) -> list[str]:
    """Flows (without counters), groups, meters and controllers: what ovsflow must not
    change."""
    flows = [re.sub(r"duration=[^,]*, |n_packets=\d+, |n_bytes=\d+, |idle_age=\d+, ", "",
                    line).strip()
             for line in lab.ofctl("dump-flows").splitlines() if "cookie=" in line]
    return sorted(flows) + [lab.ofctl("dump-groups"), lab.ofctl("dump-meters"),
                            lab.vsctl("get-controller", lab.bridge)]


def nothing_of_ovsflows(lab) -> None:
    """No flow of ovsflow's cookie, no meter but Antrea's, no controller, the protocols as
    Antrea set them."""
    assert "cookie=0x6f7673666c6f7700" not in lab.ofctl("dump-flows")
    assert sorted(map(int, re.findall(r"meter=(\d+)", lab.ofctl("dump-meters")))) == [
        256, 257, 258]
    assert lab.vsctl("get-controller", lab.bridge).strip() == ""
    assert lab.vsctl("get", "bridge", lab.bridge, "protocols").strip() == \
        "[OpenFlow10, OpenFlow15]"


def controller_packets(lab) -> int:
    """Packets the Output table's NetworkPolicy controller flows sent to the controller.
    The datapath hands its flows' counters to the OpenFlow flows in revalidation rounds:
    wait for one first."""
    lab.appctl("revalidator/wait")
    return sum(int(n) for n in re.findall(r"n_packets=(\d+),.*userdata=01\.",
                                          lab.ofctl("dump-flows", f"table={TABLE['Output']}")))


def udp6(pod, destination: str, port: int, count: int, sport: int) -> None:
    """IPv6 datagrams from the Pod (lab/traffic.py's udp is IPv4's)."""
    pod.run(PYTHON, "-c", "import socket; s = socket.socket(socket.AF_INET6, "
            f"socket.SOCK_DGRAM); s.bind(('::', {sport})); "
            f"[s.sendto(b'u' * 100, ('{destination}', {port})) for _ in range({count})]")


# (case, packets, source Pod, destination address in the record, its port, the Pods named,
#  (ingress rule, ingress action, egress rule, egress action))
CASES = [
    ("egress drop, logged", 3, "client", "10.58.0.2", 5353, ("shop/client", "shop/server"),
     ("", 0, "5", 2)),
    ("ingress drop after an egress ct(commit) allow", 2, "client", "10.58.0.3", 8080,
     ("shop/client", "shop/web"), ("4", 2, "", 0)),
    ("K8s default drop of a ClusterIP Service's packets", 4, "client", "10.58.0.4", 53,
     ("shop/client", "kube-system/dns"), ("", 0, "", 2)),
    ("reject without logging", 5, "client", "10.58.0.5", 5355, ("shop/client", "vault/vault"),
     ("", 0, "9", 3)),
    ("IPv6 egress drop, logged", 6, "client6", "fd00:58::2", 5356,
     ("shop/client6", "shop/server6"), ("", 0, "6", 2)),
]
SENT_PER_ROUND = sum(case[1] for case in CASES)


def denied_traffic(lab, sport: int) -> None:
    """One round of CASES from source port `sport` (its records tell the round)."""
    c = lab.client
    c.traffic("udp", lab.server.address, "5353", "3", "100", str(sport))
    c.traffic("udp", lab.web.address, "8080", "2", "100", str(sport))
    c.traffic("udp", SERVICE_IP, "53", "4", "100", str(sport))
    c.traffic("udp", lab.vault.address, "5355", "5", "100", str(sport))
    udp6(lab.client6, lab.server6.address, 5356, 6, sport)


def check_round(records, sport: int) -> None:
    """Every case of the round `sport` in the records: its packets summed over its records,
    its rule in the element of its direction only, its Pods."""
    for case, packets, _, destination, port, pods, rules in CASES:
        found = [r for r in records if r.get("sourceTransportPort") == sport
                 and r.get("destinationTransportPort") == port]
        assert found, f"{case}: no record (round {sport})"
        assert {str(r.get("destinationIPv4Address") or r.get("destinationIPv6Address"))
                for r in found} == {destination}, case
        assert sum(r["packetDeltaCount"] for r in found) == packets, (case, found)
        for r in found:
            assert (r["ingressNetworkPolicyRuleName"], r["ingressNetworkPolicyRuleAction"],
                    r["egressNetworkPolicyRuleName"], r["egressNetworkPolicyRuleAction"]) == \
                rules, (case, r)
            assert (f"{r['sourcePodNamespace']}/{r['sourcePodName']}",
                    f"{r['destinationPodNamespace']}/{r['destinationPodName']}") == pods, case


def test_a_real_antrea_node_ovsflow_first_names_late_through_restarts(lab, tmp_path):
    """A node boot: br-int at OpenFlow 1.0+1.5 before antrea-agent connects; ovsflow starts
    first; Antrea names its tables seconds after its flows are in. Then ovs-vswitchd
    restarts (Antrea reconnects with the same id, names late again) and Antrea restarts (a
    new id). Each round sends the five cases once."""
    sink = Datagrams()
    port = 9544
    with agent(tmp_path, lab, port, sink=sink) as session:
        antrea = start_antrea(lab, tmp_path, name_tables_after=6)
        first = attached(lab, port)
        assert not antrea.status()["named"]
        sent_before, got_before = controller_packets(lab), antrea.status()["packet_ins"]
        denied_traffic(lab, 41001)  # before the names: held until they are read
        assert not antrea.status()["named"]
        antrea.wait_until("named")
        denied_traffic(lab, 41002)
        time.sleep(1.5)
        # the stand-in kept every packet-in its flows sent, ovsflow took a copy of each
        sent = controller_packets(lab) - sent_before
        assert sent == 2 * SENT_PER_ROUND
        assert antrea.status()["packet_ins"] - got_before == sent
        assert metric(port, "ovsflow_packet_ins_total", '{outcome="taken"}') == sent
        assert antrea.status()["endpoint_in_reg3"] >= 1  # the Service's Endpoint in reg3
        assert metric(port, "ovsflow_openflow_connections_total") == 1  # never cut off
        nothing_of_ovsflows(lab)
        labels = lab.appctl("dpctl/dump-conntrack", "zone=65520")
        assert re.search(r"dst=10\.58\.0\.3.*labels=0x700000000", labels), labels

        lab.stop_daemon("ovs-vswitchd")  # flows, groups, meters and names go with it
        lab.start_vswitchd()
        lab.wait_for_bridge()
        antrea.wait_until(lambda s: s["connections"] == 2 and s["ready"])
        assert antrea.status()["controller_id"] == first
        wait_for(lambda: metric(port, "ovsflow_openflow_connections_total") == 2,
                 what="ovsflow's second session")
        attached(lab, port)
        antrea.wait_until(lambda s: s["connections"] == 2 and s["named"])
        denied_traffic(lab, 41003)

        second = antrea.restart()["controller_id"]  # names late again
        assert second != first
        attached(lab, port)
        antrea.wait_until("named")
        denied_traffic(lab, 41004)
        time.sleep(1.5)
        nothing_of_ovsflows(lab)
        directionless = metric(port, "ovsflow_deny_direction_unknown_total")
    assert directionless == 0
    for sport in (41001, 41002, 41003, 41004):
        check_round(session.records, sport)
    assert f"Antrea's controller id is {second} (was {first})" in session.log
    assert "OpenFlow 1.5" in session.log


@pytest.mark.parametrize("lab", [{"protocols": ("OpenFlow10", "OpenFlow13")}], indirect=True)
def test_antrea_setting_its_protocols_moves_ovsflow_to_openflow_15(lab, tmp_path):
    """A bridge an operator had opened to OpenFlow 1.3: ovsflow speaks 1.3 there; Antrea's
    start sets OpenFlow10,OpenFlow15, which closes the bridge's connections; ovsflow comes
    back speaking 1.5."""
    with agent(tmp_path, lab, 9545) as session:
        start_antrea(lab, tmp_path)
        wait_for(lambda: metric(9545, "ovsflow_openflow_connections_total") == 2,
                 what="ovsflow's session over 1.5")
        attached(lab, 9545)
        denied_traffic(lab, 42001)
        time.sleep(1.5)
    check_round(session.records, 42001)
    assert "OpenFlow 1.5" in session.log


def test_antrea_deny_packet_ins_become_records_and_antrea_keeps_every_one(lab, tmp_path):
    """Antrea first, as on a running node; ovsflow changes nothing of Antrea's."""
    start_antrea(lab, tmp_path)
    before = bridge_state(lab)
    # Antrea alone first: the stand-in counts what its controller flows send
    lab.client.traffic("udp", lab.server.address, "4000", "4", "10")
    time.sleep(0.3)
    assert lab.antrea.status()["packet_ins"] == controller_packets(lab) == 4
    with agent(tmp_path, lab, 9541, protocols=("udp",)) as session:
        controller_id = attached(lab, 9541)
        sent_before, got_before = controller_packets(lab), lab.antrea.status()["packet_ins"]
        denied_traffic(lab, 43001)
        lab.client.traffic("tcp-syn", lab.server.address, "8080")  # tcp: not exported
        time.sleep(1.0)
        sent = controller_packets(lab) - sent_before
        antrea_got = lab.antrea.status()["packet_ins"] - got_before
        text = metrics(9541)
        during = bridge_state(lab)
    # Antrea's controller received every packet-in with ovsflow attached
    assert antrea_got == sent and sent >= SENT_PER_ROUND + 1  # the SYN, maybe with retries
    assert value(text, "ovsflow_packet_ins_total", '{outcome="taken"}') == sent
    unwanted = value(text, "ovsflow_packet_ins_total", '{outcome="unwanted_protocol"}')
    assert unwanted == sent - SENT_PER_ROUND >= 1
    assert value(text, "ovsflow_deny_filtered_out_total", '{protocol="tcp"}') == unwanted
    assert before == during == bridge_state(lab)  # nothing of Antrea's changed
    assert f"Antrea's controller id is {controller_id}" in session.log
    check_round(session.records, 43001)


def test_default_mode_beside_antrea_gets_its_flows_back_after_antrea_restarts(lab, tmp_path):
    """Table mode on the same OpenFlow 1.0+1.5 bridge: Antrea's DeleteMeterAll at its
    connect deletes ovsflow's meter, and OVS the flows that use it: ovsflow puts them
    back."""
    start_antrea(lab, tmp_path)
    lab.ofctl("add-flow", f"table=0,priority=300,cookie=0x1234,udp,nw_dst={lab.server.address},"
                          "tp_dst=7000,actions=load:42->NXM_NX_REG3[],resubmit(,250)")
    with agent(tmp_path, lab, 9543, deny_source="table", protocols=["udp"]) as session:
        wait_for(lambda: len(deny_flows(lab)) == 3, what="ovsflow's deny flows")
        lab.client.traffic("udp", lab.server.address, "7000", "2", "10")
        lab.antrea.restart()  # ovsflow may have put them back before it returns
        wait_for(lambda: len(deny_flows(lab)) == 3
                 and "meter=28518" in lab.ofctl("dump-meters"), timeout=2.5,
                 what="ovsflow's flows and meter back")
        lab.client.traffic("udp", lab.server.address, "7000", "3", "10")
        time.sleep(1.0)
        restored = value(metrics(9543), "ovsflow_deny_flows_restored_total")
    assert restored == 1
    assert "meter 28518 gone; put back in table 250" in session.log
    assert "(OpenFlow 1.5)" in session.log
    packets = sum(r["packetDeltaCount"] for r in session.records
                  if r["_templateId"] == DENY and r["destinationTransportPort"] == 7000)
    assert packets == 5


def test_ovsflow_follows_antrea_to_its_new_controller_id(lab, tmp_path):
    start_antrea(lab, tmp_path)
    with agent(tmp_path, lab, 9542) as session:
        first = attached(lab, 9542)
        lab.client.traffic("udp", lab.server.address, "6001", "2", "10")
        restarted = time.monotonic()
        second = lab.antrea.restart()["controller_id"]
        assert second != first
        attached(lab, 9542)
        followed = time.monotonic() - restarted
        got_before = lab.antrea.status()["packet_ins"]
        lab.client.traffic("udp", lab.server.address, "6002", "3", "10")
        time.sleep(1.0)
        assert lab.antrea.status()["packet_ins"] - got_before == 3
        assert metric(9542, "ovsflow_antrea_controller_id") == second
    assert followed < 5.0, followed
    packets = {}
    for r in session.records:
        if r["_templateId"] != DENY:
            continue  # the deny totals: test_deny_totals.py
        packets[r["destinationTransportPort"]] = packets.get(
            r["destinationTransportPort"], 0) + r["packetDeltaCount"]
    assert packets == {6001: 2, 6002: 3}
    assert f"Antrea's controller id is {second} (was {first})" in session.log


def test_the_controller_id_metric_is_gone_with_the_session(lab, tmp_path):
    """ovs-vswitchd stops: ovsflow's session is gone, and so is the id it shared."""
    start_antrea(lab, tmp_path)
    with agent(tmp_path, lab, 9546):
        attached(lab, 9546)
        lab.stop_daemon("ovs-vswitchd")
        wait_for(lambda: metric(9546, "ovsflow_antrea_controller_id") is None
                 and metric(9546, "ovsflow_openflow_connections_total") == 1,
                 timeout=5, what="the controller id metric gone")
        lab.start_vswitchd()  # for the stop of the block: ovsflow is well
        lab.wait_for_bridge()


def test_a_listener_that_reads_nothing_costs_antrea_no_packet_in(lab, tmp_path):
    """A connection that shares Antrea's controller id and never reads (the worst ovsflow):
    OVS keeps a send queue per connection, so Antrea's controller still gets every
    packet-in its flows send. (At bursts the stand-in itself cannot keep up with, OVS drops
    from the stand-in's own queue, with or without a second listener: the load here is one
    it takes whole.)"""
    start_antrea(lab, tmp_path)
    stalled = socket.socket(socket.AF_UNIX)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(f"{lab.run_dir}/{lab.bridge}.mgmt")
    try:
        v = m.OFP15  # the bridge's (the HELLO offers only it)
        stalled.sendall(m.hello(1, (v,)) + m.set_config(2, miss_send_len=128, version=v)
                        + m.set_controller_id(3, lab.antrea.status()["controller_id"],
                                              version=v)
                        + m.set_packet_in_format(4, m.NXPIF_NXT_PACKET_IN2, version=v))
        time.sleep(0.5)
        got_before, sent_before = lab.antrea.status()["packet_ins"], controller_packets(lab)
        for _ in range(3):
            lab.client.traffic("udp", lab.server.address, "5353", "200", "400")
            time.sleep(0.3)
        time.sleep(1.0)
        sent = controller_packets(lab) - sent_before
        got = lab.antrea.status()["packet_ins"] - got_before
        queued = stalled.recv(1 << 20, socket.MSG_DONTWAIT)  # its copies did come
    finally:
        stalled.close()
    assert sent >= 150 and got == sent, (sent, got)
    assert len(queued) > 1000


def test_the_stand_ins_flows_are_antreas_and_cite_their_source():
    """Each flow the stand-in installs for a table of the dumps in Antrea's ovs-pipeline.md
    has that table's shape; a few are the dump's lines with this lab's values."""
    from lab.antrea_pipeline import Pipeline, Pod
    pods = {"client": Pod("client", "shop", ("10.58.0.1",), "02:00:00:00:00:01", 1),
            "server": Pod("server", "shop", ("10.58.0.2",), "02:00:00:00:00:02", 2),
            "web": Pod("web", "shop", ("10.58.0.3",), "02:00:00:00:00:03", 3),
            "dns": Pod("dns", "kube-system", ("10.58.0.4",), "02:00:00:00:00:04", 4),
            "vault": Pod("vault", "vault", ("10.58.0.5",), "02:00:00:00:00:05", 5),
            "client6": Pod("client6", "shop", ("fd00:58::1",), "02:00:00:00:00:07", 7),
            "server6": Pod("server6", "shop", ("fd00:58::2",), "02:00:00:00:00:08", 8)}
    pipeline = Pipeline(62373, 1, pods, SCENARIO).build()
    flows = [re.sub(r"^cookie=\S+?,", "", f) for f in pipeline.flows]
    t = TABLE
    # md:1196 (egress deny), with logging's loads (pipeline.go conjunctionActionDenyFlow)
    assert (f"table={t['AntreaPolicyEgressRule']},priority=14498,conj_id=5,actions=set_field:"
            f"0x5->reg3,set_field:0x400/0x400->reg0,set_field:0x800/0x1800->reg0,set_field:"
            f"0x2000000/0xfe000000->reg0,set_field:{t['AntreaPolicyEgressRule']:#x}/0xff->reg2,"
            "group:2") in flows
    # a Reject without logging: the deny mark, the reject operation, no disposition
    assert (f"table={t['AntreaPolicyEgressRule']},priority=14497,conj_id=9,actions=set_field:"
            f"0x9->reg3,set_field:0x400/0x400->reg0,set_field:0x4000000/0xfe000000->reg0,"
            f"set_field:{t['AntreaPolicyEgressRule']:#x}/0xff->reg2,group:2") in flows
    # md:1193: the allow commits the rule id into ct_label's egress half
    assert (f"table={t['AntreaPolicyEgressRule']},priority=14499,conj_id=7,ip,actions="
            f"set_field:0x7->reg5,ct(commit,table={t['EgressMetric']},zone=65520,exec("
            "set_field:0x700000000/0xffffffff00000000->ct_label))") in flows
    # md:1108 / md:1140: the Endpoint's address in reg3, then the DNAT commit
    assert pipeline.groups[0] == (
        f"group_id=10,type=select,bucket=bucket_id:0,weight:100,actions=set_field:0xa3a0004"
        f"->reg3,set_field:0x35/0xffff->reg4,resubmit(,{t['EndpointDNAT']})")
    # md:1308, md:1832: the metric tables drop what a rule denied, one flow per rule (the
    # deny totals count them: test_deny_totals.py)
    assert (f"table={t['EgressMetric']},priority=200,reg0=0x400/0x400,reg3=0x5,actions=drop"
            in flows)
    assert (f"table={t['IngressMetric']},priority=200,reg0=0x400/0x400,reg3=0x4,actions=drop"
            in flows)
    # md:1888: the Output table's logging flow
    assert (f"table={t['Output']},priority=200,reg0=0x2400000/0xfe600000,actions=meter:256,"
            "controller(reason=no_match,id=62373,userdata=01.01)") in flows
    # the K8s default drop with logging: no deny mark, no reg3 (defaultDropFlow)
    [default_drop] = [f for f in flows if f.startswith(f"table={t['EgressDefaultRule']},"
                                                       "priority=200")]
    assert "reg3" not in default_drop and "0x400/0x400" not in default_drop
    assert len([f for f in pipeline.groups if "type=all" in f]) == 4  # initGroups
