"""Antrea's fields in the records of a running agent: Pod names, node, flowType and the
NetworkPolicy rules, for intra-node, to-external and denied traffic, while Pods come and go
and ovsdb-server restarts. Real Open vSwitch (userspace datapath) with Antrea's Port
external_ids and ct_label rule ids (lab/ovs_lab.py), `ovsflow run`, and the records decoded
by the PyPI `ipfix` package, not by ovsflow's own decoder."""

from __future__ import annotations

import ipaddress
import signal
import socket
import subprocess
import time
from datetime import datetime, timezone

import ipfix.message
import pytest

from helpers import OVSFLOW, agent_config, ipfix_package_records, use_antrea_information_model
from lab.ovs_lab import CONNTRACK_PIPELINE, OvsLab, commit_with_rules
from ovsflow.enrich import FROM_EXTERNAL, INTRA_NODE, TO_EXTERNAL
from ovsflow.record import RULE_ALLOW, RULE_DROP

DENY_TABLE, DENY_RULE = 250, 7
NODE = "node-7"


@pytest.fixture(scope="module", autouse=True)
def information_model():
    use_antrea_information_model()


class Datagrams:
    """A UDP socket the agent exports to; `records()` decodes everything received so far."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.buffer = ipfix.message.MessageBuffer()
        self.decoded: list[dict] = []

    def records(self) -> list[dict]:
        while True:
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return self.decoded
            self.buffer.from_bytes(data)
            self.decoded += ipfix_package_records(self.buffer)


def wait_for(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout}s")
        time.sleep(0.2)
    return result


def utc(naive: datetime) -> float:
    """The `ipfix` package's datetimes are naive UTC."""
    return naive.replace(tzinfo=timezone.utc).timestamp()


def flows(records, source: str, destination: str) -> list[dict]:
    return [r for r in records
            if r.get("sourceIPv4Address") == ipaddress.ip_address(source)
            and r.get("destinationIPv4Address") == ipaddress.ip_address(destination)]


@pytest.fixture
def lab(tmp_path):
    lab = OvsLab(tmp_path / "ovs")
    try:
        lab.web = lab.add_pod("10.66.0.1/24", name="web", namespace="shop")
        lab.db = lab.add_pod("10.66.0.2/24", name="db", namespace="shop")
        lab.intruder = lab.add_pod("10.66.0.3/24", name="intruder", namespace="other")
        lab.outside = lab.add_pod("10.66.0.200/24", pod=False)  # beyond the Pod CIDR
        for flow in [*CONNTRACK_PIPELINE,
                     commit_with_rules(f"nw_src={lab.web.address},nw_dst={lab.db.address}",
                                       12, 11),
                     commit_with_rules(f"nw_src={lab.web.address},"
                                       f"nw_dst={lab.outside.address}", 0, 13),
                     commit_with_rules(f"nw_src={lab.outside.address},"
                                       f"nw_dst={lab.db.address}", 14, 0),
                     f"table=0,priority=100,ip,nw_src={lab.intruder.address},"
                     f"nw_dst={lab.db.address},actions=load:{DENY_RULE}->NXM_NX_REG3[],"
                     f"resubmit(,{DENY_TABLE})"]:
            lab.ofctl("add-flow", flow)
        yield lab
    finally:
        lab.stop()


def udp(client, server, count=2):
    client.traffic("udp", server.address, "5353", str(count), "60")


def test_records_name_pods_flow_types_and_rules_while_pods_come_and_go(lab, tmp_path):
    sink = Datagrams()
    config = agent_config(
        tmp_path, sink.port, ["udp"],
        flowExporter={"activeFlowExportTimeout": "1s", "idleFlowExportTimeout": "30s"},
        conntrack={"source": "ovs", "zones": [65520]},
        ovs={"runDir": lab.run_dir, "bridge": lab.bridge, "denyTable": DENY_TABLE},
        ipfix={"nodeName": NODE, "clusterPodCIDRs": ["10.66.0.0/25"]})
    agent = subprocess.Popen([OVSFLOW, "run", "--config", config], stderr=subprocess.PIPE,
                             text=True)
    try:
        time.sleep(2)  # the Pod map's first load and the deny flows
        udp(lab.web, lab.db)
        udp(lab.web, lab.outside)
        udp(lab.outside, lab.db)
        udp(lab.intruder, lab.db)
        records = wait_for(lambda: all(flows(sink.records(), s.address, d.address) for s, d in (
            (lab.web, lab.db), (lab.web, lab.outside), (lab.outside, lab.db),
            (lab.intruder, lab.db))) and sink.records(), "the first records")

        # ovsdb-server restarts under the agent; a Pod that starts afterwards is named
        lab.stop_daemon("ovsdb-server")
        lab.start_ovsdb()
        late = lab.add_pod("10.66.0.4/24", name="late", namespace="shop")
        lab.ofctl("add-flow", commit_with_rules(
            f"nw_src={late.address},nw_dst={lab.db.address}", 15, 0))
        time.sleep(1)
        udp(late, lab.db)
        wait_for(lambda: flows(sink.records(), late.address, lab.db.address),
                 "the late Pod's record")

        # web goes (its Port and namespace, as the CNI's DEL); its connections stay in
        # conntrack and keep its name
        removed_at = time.time()
        lab.remove_pod(lab.web)
        time.sleep(3)
        records = sink.records()
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, agent.stderr.read()
    time.sleep(0.5)
    records = sink.records()

    [intra, *_] = flows(records, "10.66.0.1", "10.66.0.2")
    assert (intra["sourcePodNamespace"], intra["sourcePodName"]) == ("shop", "web")
    assert (intra["destinationPodNamespace"], intra["destinationPodName"]) == ("shop", "db")
    assert (intra["sourceNodeName"], intra["destinationNodeName"]) == (NODE, NODE)
    assert intra["flowType"] == INTRA_NODE
    assert (intra["ingressNetworkPolicyRuleName"], intra["egressNetworkPolicyRuleName"]) == (
        "12", "11")
    assert (intra["ingressNetworkPolicyRuleAction"],
            intra["egressNetworkPolicyRuleAction"]) == (RULE_ALLOW, RULE_ALLOW)

    [outbound, *_] = flows(records, "10.66.0.1", "10.66.0.200")
    assert outbound["flowType"] == TO_EXTERNAL
    assert (outbound["sourcePodName"], outbound["destinationPodName"]) == ("web", "")
    assert (outbound["sourceNodeName"], outbound["destinationNodeName"]) == (NODE, "")
    assert (outbound["ingressNetworkPolicyRuleAction"],
            outbound["egressNetworkPolicyRuleAction"]) == (0, RULE_ALLOW)
    assert outbound["egressNetworkPolicyRuleName"] == "13"

    [inbound, *_] = flows(records, "10.66.0.200", "10.66.0.2")
    assert inbound["flowType"] == FROM_EXTERNAL
    assert (inbound["sourcePodName"], inbound["destinationPodName"]) == ("", "db")
    assert inbound["ingressNetworkPolicyRuleName"] == "14"

    [denied, *_] = flows(records, "10.66.0.3", "10.66.0.2")
    assert (denied["sourcePodNamespace"], denied["sourcePodName"]) == ("other", "intruder")
    assert denied["destinationPodName"] == "db" and denied["flowType"] == INTRA_NODE
    assert (denied["ingressNetworkPolicyRuleAction"],
            denied["egressNetworkPolicyRuleAction"]) == (RULE_DROP, RULE_DROP)
    assert denied["ingressNetworkPolicyRuleName"] == str(DENY_RULE)

    [late_record, *_] = flows(records, "10.66.0.4", "10.66.0.2")
    assert (late_record["sourcePodName"], late_record["ingressNetworkPolicyRuleName"]) == (
        "late", "15")

    # records of web's connections exported after its Pod was gone still name it
    after = [r for r in flows(records, "10.66.0.1", "10.66.0.2")
             if utc(r["flowEndMilliseconds"]) > removed_at + 1.5]
    assert after, "no record of web > db after web was removed"
    assert {(r["sourcePodName"], r["sourceNodeName"]) for r in after} == {("web", NODE)}
