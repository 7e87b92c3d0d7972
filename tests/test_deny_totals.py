"""Exact denied totals under a flood, on a bridge at a real Antrea node's protocols (OpenFlow
1.0 and 1.5): packet-ins pass a meter, so the per-connection deny records count a sample,
which their samplingProbability says; template 270's records count every packet the
datapath denied, from the denying flows' own counters, through the flows' reinstalls and
restarts. Records are read with the PyPI `ipfix` package, not with ovsflow's decoder."""

import re
import time

import pytest

from helpers import use_antrea_information_model
from lab.antrea import AntreaStandIn
from lab.antrea_pipeline import SCENARIO, SERVICE_IP
from lab.netns import PYTHON
from test_antrea_mode import agent, antrea_node, metric
from test_antrea_records import Datagrams
from test_deny import TABLE, deny_flows, lab, wait_for  # noqa: F401 - lab: the fixture

# Datagrams from port 40000, 100 bytes each, paced (10 every 5 ms, 2000/s at most) so that
# the veth and the userspace datapath take them all on a busy machine: the datapath's
# counts must be the packets sent
FLOOD = """import socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind(("", 40000))
for i in range(count):
    s.sendto(b"f" * 100, (host, port))
    if i % 10 == 9:
        time.sleep(0.005)
"""
FRAME = {4: 14 + 20 + 8 + 100, 6: 14 + 40 + 8 + 100}  # the bytes OVS counts: whole frames


@pytest.fixture(scope="module", autouse=True)
def information_model():
    use_antrea_information_model()


def flood(pod, host: str, port: int, count: int) -> None:
    pod.run(PYTHON, "-c", FLOOD, host, str(port), str(count))


def totals(records) -> list[dict]:
    return [r for r in records if "layer2OctetDeltaCount" in r]


def denied(records) -> list[dict]:
    return [r for r in records if "samplingProbability" in r]


def table_agent(tmp_path, lab, port: int, **ovs):
    """`ovsflow run` in table mode (the pipeline of test_deny.py resubmits pod 1's packets
    to pod 2 to its deny table), exporting UDP to the `ipfix` package."""
    return agent(tmp_path, lab, port, deny_source="table", protocols=["udp"],
                 sink=Datagrams(), denyTable=TABLE, **ovs)


def settled(lab, port: int, name: str, expected: float, labels: str = "") -> None:
    """Until the agent's metric reached `expected`: the datapath's counters reach OpenFlow
    in revalidation rounds, ovsflow reads them every second."""
    lab.appctl("revalidator/wait")
    try:
        wait_for(lambda: metric(port, name, labels) == expected, timeout=10)
    except TimeoutError:
        raise AssertionError(f"{name}{labels} is {metric(port, name, labels)}, not "
                             f"{expected}") from None


def udp_flow_packets(lab) -> int:
    """What ovsflow's IPv4 UDP flow matched, as OVS says it."""
    lab.appctl("revalidator/wait")
    [line] = [f for f in deny_flows(lab) if "priority=200,udp " in f]
    return int(re.search(r"n_packets=(\d+)", line).group(1))


def metered(port: int) -> float:
    """What reached the packet-in meter: taken by ovsflow or dropped by the meter (read at
    each poll)."""
    return metric(port, "ovsflow_packet_ins_total", '{outcome="taken"}') + metric(
        port, "ovsflow_packet_ins_dropped_by_meter_total")


def test_table_mode_counts_a_flood_past_the_meter_exactly(lab, tmp_path):
    """2000 denied datagrams at a 20/s meter, then ovsflow's flows deleted with the meter
    (as Antrea's DeleteMeterAll does) and put back, then 1000 more: the totals are every
    packet sent, the deny records a sample that says so."""
    port = 9561
    with table_agent(tmp_path, lab, port, denyPacketInRate=20) as session:
        wait_for(lambda: len(deny_flows(lab)) == 3, what="ovsflow's deny flows")
        flood(lab.pod1, lab.pod2.address, 5353, 2000)
        assert udp_flow_packets(lab) == 2000  # all of them reached the datapath's flow
        settled(lab, port, "ovsflow_denied_packets_total", 2000)
        wait_for(lambda: metered(port) == 2000, timeout=5, what="the meter's counts")
        lab.ofctl("del-meters")  # OVS deletes the flows that use the meter
        wait_for(lambda: metric(port, "ovsflow_deny_flows_restored_total") == 1,
                 what="ovsflow's flows and meter back")
        flood(lab.pod1, lab.pod2.address, 5353, 1000)
        assert udp_flow_packets(lab) == 1000  # the flow counts from 0 again
        settled(lab, port, "ovsflow_denied_packets_total", 3000)
        wait_for(lambda: metered(port) == 3000, timeout=5, what="the meters' counts")
        taken = metric(port, "ovsflow_packet_ins_total", '{outcome="taken"}')
        time.sleep(1.5)  # the deny records' active timeout (1 s) and a poll
    records = session.records
    udp4 = [r for r in totals(records) if (r["ipVersion"], r["protocolIdentifier"]) == (4, 17)]
    assert sum(r["packetDeltaCount"] for r in udp4) == 3000
    assert sum(r["layer2OctetDeltaCount"] for r in udp4) == 3000 * FRAME[4]
    assert max(r["packetTotalCount"] for r in udp4) == 3000
    assert {(r["portRangeStart"], r["portRangeEnd"], r["ingressNetworkPolicyRuleAction"],
             r["egressNetworkPolicyRuleAction"]) for r in udp4} == {(0, 65535, 2, 2)}
    assert all(r["packetDeltaCount"] for r in totals(records))  # sent only when they moved
    assert not [r for r in totals(records) if r["ipVersion"] == 6]  # no IPv6 packet denied
    # the sample: what passed the meter, and the share the meter let through
    assert taken < 200
    sample = denied(records)
    assert sum(r["packetDeltaCount"] for r in sample) == taken
    assert min(r["samplingProbability"] for r in sample) < 0.05
    estimate = sum(r["packetDeltaCount"] / r["samplingProbability"] for r in sample)
    assert 0.75 * 3000 < estimate < 1.25 * 3000, estimate


def test_deny_records_say_they_are_whole_while_the_meter_drops_nothing(lab, tmp_path):
    port = 9562
    with table_agent(tmp_path, lab, port) as session:
        wait_for(lambda: len(deny_flows(lab)) == 3, what="ovsflow's deny flows")
        flood(lab.pod1, lab.pod2.address, 5353, 40)
        settled(lab, port, "ovsflow_denied_packets_total", 40)
        time.sleep(1.5)
    sample = denied(session.records)
    assert sum(r["packetDeltaCount"] for r in sample) == 40
    assert {r["samplingProbability"] for r in sample} == {1.0}
    assert sum(r["packetDeltaCount"] for r in totals(session.records)) == 40


@pytest.fixture
def antrea_lab(tmp_path):
    """The node of test_antrea_mode.py, its stand-in's packet-in meters at 100/s (Antrea's
    `packetInRate`) so that a small flood goes past them."""
    with antrea_node(tmp_path) as lab:
        lab.antrea = AntreaStandIn(lab.run_dir, lab.bridge, tmp_path / "antrea.json",
                                   SCENARIO, packet_in_rate=100)
        yield lab


def by_rule(records) -> dict[tuple, int]:
    """Packets per (ingress rule, ingress action, egress rule, egress action, Pod, port)."""
    sums: dict[tuple, int] = {}
    for r in totals(records):
        key = (r["ingressNetworkPolicyRuleName"], r["ingressNetworkPolicyRuleAction"],
               r["egressNetworkPolicyRuleName"], r["egressNetworkPolicyRuleAction"],
               f"{r['sourcePodNamespace']}/{r['sourcePodName']}", r["egressInterface"])
        sums[key] = sums.get(key, 0) + r["packetDeltaCount"]
    return sums


def test_antrea_mode_counts_every_packet_each_rule_denied(antrea_lab, tmp_path):
    """Antrea's metric tables count each rule's denials, its default-rule tables each
    Pod's default drops, whether a packet reached the controller or not (a Reject without
    logging, a flood over meter 256). Through an ovs-vswitchd restart (every flow anew,
    from 0) and an Antrea restart (its next round ADD-s its flows over the old ones: OVS
    carries their counters over), each counted once."""
    lab, port = antrea_lab, 9563
    with agent(tmp_path, lab, port, protocols=["udp"], sink=Datagrams()) as session:
        # ovsflow counts from its first reading of Antrea's flows: the 4 deny rules' metric
        # flows and client's default drop
        wait_for(lambda: metric(port, "ovsflow_deny_totals_counted") == 5,
                 what="ovsflow counting Antrea's denying flows")
        flood(lab.client, lab.server.address, 5353, 3000)  # rule 5: egress drop, logged
        flood(lab.client, lab.vault.address, 5355, 50)  # rule 9: reject, not logged
        flood(lab.client, SERVICE_IP, 53, 40)  # the K8s default drop of client's egress
        flood(lab.client, lab.web.address, 8080, 30)  # rule 4: ingress drop
        flood(lab.client6, lab.server6.address, 5356, 30)  # rule 6: IPv6 egress drop
        settled(lab, port, "ovsflow_denied_packets_total", 3150)

        lab.stop_daemon("ovs-vswitchd")
        lab.start_vswitchd()
        lab.wait_for_bridge()
        lab.antrea.wait_until(lambda s: s["connections"] == 2 and s["named"])
        wait_for(lambda: metric(port, "ovsflow_openflow_connections_total") == 2,
                 what="ovsflow's second session")
        time.sleep(1.5)  # a reading of the new session's flows
        flood(lab.client, lab.server.address, 5353, 500)
        settled(lab, port, "ovsflow_denied_packets_total", 3650)

        lab.ofctl("dump-flows")
        cookies = set(re.findall(r"cookie=(0x[0-9a-f]+)\d{10}", lab.ofctl("dump-flows")))
        second = lab.antrea.restart()["controller_id"]
        wait_for(lambda: metric(port, "ovsflow_antrea_controller_id") == second,
                 what="ovsflow on the new id")
        flood(lab.client, lab.server.address, 5353, 500)
        settled(lab, port, "ovsflow_denied_packets_total", 4150)
        assert cookies != set(re.findall(r"cookie=(0x[0-9a-f]+)\d{10}",
                                         lab.ofctl("dump-flows")))  # a new round's flows
        [rule5] = [line for line in lab.ofctl("dump-flows").splitlines()
                   if "reg0=0x400/0x400,reg3=0x5 " in line]
        assert "n_packets=1000," in rule5  # carried over from the round before the restart
        taken = metric(port, "ovsflow_packet_ins_total", '{outcome="taken"}')
        time.sleep(1.5)
    records = session.records
    assert by_rule(records) == {
        ("", 0, "5", 2, "/", 0): 4000,
        ("", 0, "9", 3, "/", 0): 50,  # a reject: its action learnt from its packet-ins
        ("", 0, "", 2, "shop/client", 0): 40,
        ("4", 2, "", 0, "/", 0): 30,
        ("", 0, "6", 2, "/", 0): 30,
    }
    assert sum(r["layer2OctetDeltaCount"] for r in totals(records)) == \
        4120 * FRAME[4] + 30 * FRAME[6]
    [default_drop] = {r["ipVersion"] for r in totals(records) if r["sourcePodName"]}
    assert default_drop == 4
    # the per-connection sample of rule 5's flood, and its share
    rule5 = [r for r in denied(records) if r["egressNetworkPolicyRuleName"] == "5"]
    assert 0 < sum(r["packetDeltaCount"] for r in rule5) < 1000
    assert min(r["samplingProbability"] for r in rule5) < 0.2
    assert sum(r["packetDeltaCount"] for r in denied(records)) == taken

