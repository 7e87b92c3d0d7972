"""`ovs.denySource: antrea`: `ovsflow run` beside the lab's stand-in for Antrea's agent
(lab/antrea.py: its tables, registers, table names, logging flows, meter and a controller
with a random id), on a real Open vSwitch. ovsflow installs nothing; Antrea's controller
keeps every packet-in."""

import re
import signal
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from helpers import OVSFLOW, Collector, agent_config
from lab.antrea import TABLE, AntreaStandIn
from lab.ovs_lab import OvsLab
from test_deny import deny_flows, wait_for

RULE = 5  # the Antrea-native egress rule's conjunction id: client > server denied
DENY = 260  # the IPv4 deny template


@pytest.fixture
def lab(tmp_path):
    lab = OvsLab(tmp_path / "ovs")
    antrea = None
    try:
        lab.client = lab.add_pod("10.58.0.1/24", name="client", namespace="shop")
        lab.server = lab.add_pod("10.58.0.2/24", name="server", namespace="shop")
        lab.isolated = lab.add_pod("10.58.0.3/24", name="isolated", namespace="vault")
        antrea = lab.antrea = AntreaStandIn(
            lab.run_dir, lab.bridge, tmp_path / "antrea.json", RULE, lab.client.address,
            lab.server.address, [lab.isolated.address])
        yield lab
    finally:
        if antrea is not None:
            antrea.stop()
        lab.stop()


def metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def value(text: str, name: str, labels: str = "") -> float | None:
    found = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


@contextmanager
def agent(tmp_path, lab, metrics_port, deny_source="antrea", protocols=("udp", "tcp")):
    """`ovsflow run` and a collector for the block; `session.records`, `session.log` after."""
    collector = Collector("udp://127.0.0.1:0", timeout=120)
    path = agent_config(tmp_path, collector.port, list(protocols),
                        flowExporter={"idleFlowExportTimeout": "2s"},
                        ovs={"runDir": lab.run_dir, "bridge": lab.bridge,
                             "denySource": deny_source},
                        metrics={"bindAddress": f"127.0.0.1:{metrics_port}"})
    process = subprocess.Popen([OVSFLOW, "run", "--config", path], stderr=subprocess.PIPE,
                               text=True)
    session = SimpleNamespace(process=process, records=[], log="")
    try:
        yield session
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        session.log = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        session.records = collector.stop_and_read()


def attached(lab, port: int) -> int:
    """Waits until ovsflow shares the stand-in's current controller id; returns it."""
    wanted = lab.antrea.status()["controller_id"]
    wait_for(lambda: _gauge(port) == wanted, timeout=10, what=f"ovsflow on id {wanted}")
    return wanted


def _gauge(port: int) -> float | None:
    try:
        return value(metrics(port), "ovsflow_antrea_controller_id")
    except OSError:
        return None


def bridge_state(lab) -> list[str]:
    """Flows (without counters), groups, meters and controllers: what ovsflow must not
    change."""
    flows = [re.sub(r"duration=[^,]*, |n_packets=\d+, |n_bytes=\d+, ", "", line).strip()
             for line in lab.ofctl("dump-flows").splitlines() if "cookie=" in line]
    return sorted(flows) + [lab.ofctl("dump-groups"), lab.ofctl("dump-meters"),
                            lab.vsctl("get-controller", lab.bridge)]


def controller_packets(lab) -> int:
    """Packets the Output table's NetworkPolicy controller flows sent to the controller.
    The datapath hands its flows' counters to the OpenFlow flows in revalidation rounds:
    wait for one first."""
    lab.appctl("revalidator/wait")
    return sum(int(n) for n in re.findall(r"n_packets=(\d+),.*userdata=01\.",
                                          lab.ofctl("dump-flows", f"table={TABLE['Output']}")))


def denied_traffic(lab):
    """Egress-denied UDP and TCP (client > server, rule 5), ingress-denied UDP and TCP
    (client > isolated, a K8s NetworkPolicy's default drop), and pings (icmp: not exported)."""
    c = lab.client
    c.traffic("udp", lab.server.address, "5353", "3", "100")
    c.traffic("tcp-syn", lab.server.address, "80")
    c.traffic("udp", lab.isolated.address, "53", "2", "100")
    c.traffic("tcp-syn", lab.isolated.address, "8080")
    c.run("ping", "-c", "2", "-i", "0.2", "-W", "1", lab.isolated.address, check=False)


def flows_by_port(records) -> dict[int, dict]:
    """Deny records summed per destination port (one flow each here)."""
    flows = {}
    for r in records:
        if r["_templateId"] != DENY:
            continue
        flow = flows.setdefault(r["destinationTransportPort"], dict(r, packetDeltaCount=0))
        flow["packetDeltaCount"] += r["packetDeltaCount"]
    return flows


def test_antrea_deny_packet_ins_become_records_and_antrea_keeps_every_one(lab, tmp_path):
    before = bridge_state(lab)
    # Antrea alone first: the stand-in counts what its controller flows send
    lab.client.traffic("udp", lab.server.address, "4000", "4", "10")
    time.sleep(0.3)
    assert lab.antrea.status()["packet_ins"] == controller_packets(lab) == 4
    with agent(tmp_path, lab, 9541) as session:
        controller_id = attached(lab, 9541)
        sent_before, got_before = controller_packets(lab), lab.antrea.status()["packet_ins"]
        denied_traffic(lab)
        time.sleep(1.0)
        sent = controller_packets(lab) - sent_before
        antrea_got = lab.antrea.status()["packet_ins"] - got_before
        text = metrics(9541)
        during = bridge_state(lab)
    # Antrea's controller received every packet-in with ovsflow attached
    assert antrea_got == sent and sent >= 3 + 2 + 2 + 2  # udp, syns (with retries), pings
    taken = value(text, "ovsflow_packet_ins_total", '{outcome="taken"}')
    assert taken == sent  # ovsflow got a copy of each
    assert value(text, "ovsflow_packet_ins_total", '{outcome="unwanted_protocol"}') == 2
    assert value(text, "ovsflow_deny_filtered_out_total", '{protocol="icmp"}') == 2
    assert before == during == bridge_state(lab)  # nothing of Antrea's changed
    assert f"Antrea's controller id is {controller_id}" in session.log

    flows = flows_by_port(session.records)
    assert set(flows) == {5353, 80, 53, 8080}, flows  # no icmp: filtered in userspace
    for port, protocol in ((5353, 17), (80, 6)):  # the Antrea-native egress rule
        r = flows[port]
        assert r["protocolIdentifier"] == protocol
        assert (r["egressNetworkPolicyRuleName"], r["egressNetworkPolicyRuleAction"]) == (
            str(RULE), 2)
        assert (r["ingressNetworkPolicyRuleName"], r["ingressNetworkPolicyRuleAction"]) == (
            "", 0)
        assert (r["sourcePodNamespace"], r["sourcePodName"]) == ("shop", "client")
        assert (r["destinationPodNamespace"], r["destinationPodName"]) == ("shop", "server")
    for port, protocol in ((53, 17), (8080, 6)):  # the K8s NetworkPolicy default drop
        r = flows[port]
        assert r["protocolIdentifier"] == protocol
        assert (r["ingressNetworkPolicyRuleName"], r["ingressNetworkPolicyRuleAction"]) == (
            "", 2)
        assert r["egressNetworkPolicyRuleAction"] == 0
        assert (r["destinationPodNamespace"], r["destinationPodName"]) == (
            "vault", "isolated")
    assert flows[5353]["packetDeltaCount"] == 3 and flows[53]["packetDeltaCount"] == 2
    assert flows[5353]["octetDeltaCount"] == 3 * (20 + 8 + 100)


def test_ovsflow_follows_antrea_to_its_new_controller_id(lab, tmp_path):
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
        assert value(metrics(9542), "ovsflow_antrea_controller_id") == second
    assert followed < 5.0, followed
    flows = flows_by_port(session.records)
    assert {port: flows[port]["packetDeltaCount"] for port in flows} == {6001: 2, 6002: 3}
    assert f"Antrea's controller id is {second} (was {first})" in session.log


def test_default_mode_beside_antrea_gets_its_flows_back_after_antrea_restarts(lab, tmp_path):
    """Antrea's DeleteMeterAll at its connect deletes ovsflow's meter, and OVS the flows
    that use it: ovsflow (denySource table) puts them back."""
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
    packets = sum(r["packetDeltaCount"] for r in session.records
                  if r["_templateId"] == DENY and r["destinationTransportPort"] == 7000)
    assert packets == 5


def test_a_listener_that_reads_nothing_costs_antrea_no_packet_in(lab, tmp_path):
    """A connection that shares Antrea's controller id and never reads (the worst ovsflow):
    OVS keeps a send queue per connection, so Antrea's controller still gets every
    packet-in its flows send. (At bursts the stand-in itself cannot keep up with, OVS drops
    from the stand-in's own queue, with or without a second listener: the load here is one
    it takes whole.)"""
    import socket

    from openflow import messages as m
    stalled = socket.socket(socket.AF_UNIX)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(f"{lab.run_dir}/{lab.bridge}.mgmt")
    try:
        v = m.OFP13  # the bridge's (the HELLO offers only it)
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
