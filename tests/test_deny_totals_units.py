"""The deny totals without a switch: counters across a flow's lifetimes, the meter's share of
packets let through over time, and the records of template 270 (read back with the
template's own decoder: the end-to-end tests in test_deny_totals.py use the `ipfix`
package)."""

import socket

from openflow import messages as m
from openflow.oxm import field, register_field
from ovsflow.deny.antrea import totals_key
from ovsflow.deny.counters import Lifetimes
from ovsflow.deny.rules import deny_flows
from ovsflow.deny.sampling import MeterHistory
from ovsflow.deny.store import BOTH, EGRESS, INGRESS, DenyStore
from ovsflow.deny.totals import DenyTotals, TotalsKey
from ovsflow.enrich import Enricher, PodNetworks
from ovsflow.ipfix.templates import DENY_TOTALS
from ovsflow.pods import PodRef
from ovsflow.protocol_list import parse_protocol_list
from ovsflow.record import ACTIVE_TIMEOUT, FORCED_END, RULE_DROP, RULE_REJECT

T0 = 1_700_000_000.0  # wall clock of the first reading
RULE5 = TotalsKey(direction=EGRESS, rule_id=5)
UDP4 = TotalsKey(4, 17)


def test_a_life_counts_from_zero_or_from_its_first_reading():
    born_watched, under_way = Lifetimes(), Lifetimes()
    assert born_watched.observe((10, 1000), from_zero=True) == (10, 1000)
    assert under_way.observe((10, 1000), from_zero=False) == (0, 0)
    assert under_way.observe((15, 1500)) == (5, 500)


def test_counters_that_go_back_start_a_new_life_and_the_old_one_is_kept():
    life = Lifetimes()
    life.observe((100, 9000))
    assert life.observe((30, 2000)) == (130, 11000)  # deleted and added again: from 0
    assert life.observe((40, 3000)) == (140, 12000)
    # created anew with more packets already than the old one had: only the caller knows
    assert life.observe((50, 4000), new_life=True) == (190, 16000)


def test_a_replaced_flow_whose_counters_carry_over_goes_on():
    """OVS carries the counters over to a flow ADD-ed over one of the same match (Antrea's
    next round): the counts go on; only a new life would count them twice."""
    life = Lifetimes()
    life.observe((100, 9000))
    assert life.observe((120, 10800)) == (120, 10800)


def test_the_meters_share_over_a_stretch_of_time():
    history = MeterHistory()
    assert history.probability(T0, T0 + 5) == 1.0  # nothing known
    for second, (packets_in, dropped) in enumerate([(0, 0), (100, 0), (1100, 900),
                                                    (2100, 1900), (2110, 1900)]):
        history.add(T0 + second, packets_in, dropped)
    assert history.probability(T0, T0 + 1.5) == 1.0  # nothing dropped then
    assert history.probability(T0 + 1.2, T0 + 3.7) == 0.05  # 100 of 2000 went through
    assert history.probability(T0 - 10, T0 + 100) == 210 / 2110
    assert history.probability(T0 + 3.5, T0 + 4.5) == 1.0
    history.add(T0 - 50, 0, 0)  # the wall clock went back: only what follows counts
    assert history.probability(T0 - 60, T0 + 60) == 1.0


def test_the_meter_history_keeps_an_hour():
    history = MeterHistory(keep=10)
    for second in range(100):
        history.add(T0 + second, second * 10, second * 5)
    assert len(history._times) <= 21
    assert history.probability(T0 + 95, T0 + 99) == 0.5


def totals(active=1.0, idle=3.0, enricher=None) -> DenyTotals:
    return DenyTotals(DenyStore(active, idle, 100, enricher))


def records(batches) -> list[dict]:
    decoded = []
    for batch in batches:
        for template, data, _ in batch.groups:
            assert template is DENY_TOTALS.template
            decoded += template.decode_records(data)
    return decoded


def test_records_carry_totals_and_deltas_once_per_active_timeout_while_counts_move():
    t = totals()
    t.read({"f": (RULE5, 0, 0, 100.0)}, T0, T0 - 50)  # under way: counts from here
    t.read({"f": (RULE5, 40, 4000, 101.0)}, T0 + 1, T0 - 50)
    assert t.due(T0 + 0.5) == []  # not an active timeout since it began
    [first] = records(t.due(T0 + 1))
    assert (first["packetTotalCount"], first["packetDeltaCount"],
            first["layer2OctetTotalCount"], first["layer2OctetDeltaCount"]) == (40, 40, 4000,
                                                                               4000)
    assert (first["egressNetworkPolicyRuleName"], first["egressNetworkPolicyRuleAction"],
            first["ingressNetworkPolicyRuleName"], first["ingressNetworkPolicyRuleAction"]) \
        == ("5", RULE_DROP, "", 0)
    assert first["flowStartMilliseconds"] == T0 * 1000
    assert first["flowEndMilliseconds"] == (T0 + 1) * 1000
    assert first["flowEndReason"] == ACTIVE_TIMEOUT
    assert (first["portRangeStart"], first["portRangeEnd"], first["ipVersion"]) == (
        0, 65535, 0)
    t.read({"f": (RULE5, 40, 4000, 102.0)}, T0 + 2, T0 - 50)
    assert t.due(T0 + 3) == []  # nothing moved: nothing to say
    t.read({"f": (RULE5, 45, 4500, 103.0)}, T0 + 3, T0 - 50)
    t.learn_action(EGRESS, 5, RULE_REJECT)
    [final] = records(t.flush(T0 + 3.2))
    assert (final["packetTotalCount"], final["packetDeltaCount"]) == (45, 5)
    assert final["flowEndReason"] == FORCED_END
    assert final["egressNetworkPolicyRuleAction"] == RULE_REJECT
    assert t.packets == 45 and t.octets == 4500


def test_a_flow_created_since_the_last_reading_counts_whole_and_from_its_creation():
    t = totals()
    t.read({}, T0, T0 - 1)
    t.read({"f": (UDP4, 30, 3000, 0.4)}, T0 + 1, T0 - 1)
    [record] = records(t.flush(T0 + 1))
    assert record["packetDeltaCount"] == 30
    assert record["flowStartMilliseconds"] == (T0 + 0.6) * 1000
    assert (record["ipVersion"], record["protocolIdentifier"]) == (4, 17)


def test_flows_of_one_key_add_up_and_a_flow_gone_keeps_what_it_counted():
    t = totals()
    t.read({"a": (UDP4, 10, 100, 0.5), "b": (UDP4, 5, 50, 0.5)}, T0, T0 - 1)
    t.read({"a": (UDP4, 12, 120, 1.5)}, T0 + 1, T0 - 1)  # b was deleted
    t.read({"a": (UDP4, 12, 120, 2.5), "b": (UDP4, 1, 10, 0.2)}, T0 + 2, T0 - 1)  # b back
    [record] = records(t.flush(T0 + 2))
    assert (record["packetDeltaCount"], record["layer2OctetDeltaCount"]) == (18, 180)


def test_after_a_gap_between_sessions_a_flow_younger_than_the_gap_is_new():
    """ovs-vswitchd restarted: the flows are back with counters from 0, and by the first
    reading of the new session they may have counted more than before."""
    t = totals()
    t.read({"f": (RULE5, 10, 1000, 50.0)}, T0, T0 - 10)
    t.read({"f": (RULE5, 30, 3000, 51.0)}, T0 + 1, T0 - 10)
    t.read({"f": (RULE5, 50, 5000, 4.0)}, T0 + 10, T0 + 5)  # a new session
    [record] = records(t.flush(T0 + 10))
    assert record["packetDeltaCount"] == 20 + 50


def test_within_a_session_a_younger_flow_with_counters_carried_over_goes_on():
    """Antrea's next round ADD-s its flows over the old ones: the duration starts again,
    the counters go on (test_deny_totals.py sees OVS do it)."""
    t = totals()
    t.read({"f": (RULE5, 10, 1000, 50.0)}, T0, T0 - 10)
    t.read({"f": (RULE5, 30, 3000, 0.3)}, T0 + 1, T0 - 10)
    [record] = records(t.flush(T0 + 1))
    assert record["packetDeltaCount"] == 20


def test_flows_installed_anew_count_from_zero():
    t = totals()
    t.read({"f": (UDP4, 0, 0, 0.5)}, T0, T0 - 1)
    t.read({"f": (UDP4, 100, 10000, 1.5)}, T0 + 1, T0 - 1)
    t.end_lives()  # ovsflow deleted and added its flows: they count from 0 again
    t.read({"f": (UDP4, 150, 15000, 0.9)}, T0 + 2, T0 - 1)
    [record] = records(t.flush(T0 + 2))
    assert record["packetDeltaCount"] == 250


def test_keys_whose_flows_are_gone_are_forgotten_after_the_idle_timeout():
    t = totals(active=1, idle=3)
    t.read({"f": (RULE5, 0, 0, 10.0), "g": (UDP4, 0, 0, 10.0)}, T0, T0 - 100)
    t.read({"f": (RULE5, 5, 500, 11.0), "g": (UDP4, 0, 0, 11.0)}, T0 + 1, T0 - 100)
    t.due(T0 + 1)
    for second in range(2, 6):  # rule 5's flow is gone from here
        t.read({"g": (UDP4, 0, 0, 10.0 + second)}, T0 + second, T0 - 100)
        t.due(T0 + second)
        assert len(t) == (2 if second < 4 else 1), second  # 3 s since it was last seen
    assert records(t.flush(T0 + 6)) == []


def test_a_key_missing_from_one_reading_only_goes_on():
    """ovsflow reinstalling its flows: they are missing from one reading; the key's
    totals go on (one record, one start)."""
    t = totals(active=1, idle=0)
    t.read({"f": (UDP4, 10, 1000, 0.5)}, T0, T0 - 1)
    first = records(t.due(T0 + 1))
    t.read({}, T0 + 1, T0 - 1)
    t.due(T0 + 2)
    t.end_lives()
    t.read({"f": (UDP4, 4, 400, 0.5)}, T0 + 2, T0 - 1)
    [second] = records(t.due(T0 + 3))
    assert (second["packetTotalCount"], second["packetDeltaCount"]) == (14, 4)
    assert second["flowStartMilliseconds"] == first[0]["flowStartMilliseconds"]


def test_an_egress_default_drop_names_its_pod_and_an_ingress_one_its_port():
    address = socket.inet_aton("10.58.0.1")

    class Pods:
        changes = 1

        def lookup(self, a):
            return PodRef("shop", "client") if a == address else None

        def __len__(self):
            return 1

    t = totals(enricher=Enricher(Pods(), "node-1", PodNetworks()))
    egress = TotalsKey(4, direction=EGRESS, address=address)
    ingress = TotalsKey(direction=INGRESS, ofport=37)
    t.read({"e": (egress, 3, 300, 0.1), "i": (ingress, 4, 400, 0.1)}, T0, T0 - 1)
    found = {(r["sourcePodNamespace"], r["sourcePodName"], r["egressInterface"],
              r["egressNetworkPolicyRuleAction"], r["ingressNetworkPolicyRuleAction"])
             for r in records(t.flush(T0))}
    assert found == {("shop", "client", 0, RULE_DROP, 0), ("", "", 37, 0, RULE_DROP)}


def test_table_modes_flows_count_per_protocol_and_block_of_ports():
    flows = deny_flows(parse_protocol_list(["tcp/30000-32767", "udp", "icmp"]).protocols)
    keys = sorted((k.ip_version, k.protocol, k.ports, k.direction)
                  for k in (f.totals_key() for f in flows) if k is not None)
    blocks = [(30000, 30719), (30720, 32767)]  # 30000-30719 is itself 4 aligned blocks
    tcp = sorted(k[2] for k in keys if k[:2] == (4, 6))
    assert tcp[0][0] == 30000 and tcp[-1][1] == 32767 and len(tcp) == 5
    assert all(a[1] + 1 == b[0] for a, b in zip(tcp, tcp[1:]))  # contiguous, no overlap
    assert blocks[1] in tcp
    assert (4, 17, (0, 65535), BOTH) in keys and (6, 17, (0, 65535), BOTH) in keys
    assert (4, 1, (0, 65535), BOTH) in keys
    assert not [k for k in keys if k[:2] == (6, 1)]  # ICMP is IPv4's alone
    assert len(keys) == len(flows) - 1  # all but the drop flow


def entry(table, priority, match, packets=1, octets=100):
    return m.FlowEntry(table, priority, 0, match, m.Instructions(), packets, octets, 1, 0)


def test_antreas_denying_flows_and_the_others():
    v = m.OFP15
    deny = register_field(0, 0x400, 0x400, version=v)
    metric = entry(16, 200, [deny, register_field(3, 5, version=v)])
    assert totals_key(metric, "EgressMetric") == TotalsKey(direction=EGRESS, rule_id=5)
    assert totals_key(metric, "IngressMetric") == TotalsKey(direction=INGRESS, rule_id=5)
    assert totals_key(metric, "Output") is None
    without_mark = entry(16, 200, [register_field(3, 5, version=v)])
    assert totals_key(without_mark, "EgressMetric") is None
    source = socket.inet_aton("10.58.0.1")
    egress_drop = entry(15, 200, [field("eth_type", 0x0800), field("ipv4_src", source)])
    assert totals_key(egress_drop, "EgressDefaultRule") == TotalsKey(
        4, direction=EGRESS, address=source)
    ingress_drop = entry(26, 200, [register_field(1, 0x25, version=v)])
    assert totals_key(ingress_drop, "IngressDefaultRule") == TotalsKey(
        direction=INGRESS, ofport=0x25)
    baseline = entry(26, 190, [register_field(1, 0x25, version=v)])  # a Baseline tier rule
    assert totals_key(baseline, "IngressDefaultRule") is None
