"""Denied-packet parsing, the deny flows for a protocol list, and the deny store."""

import random
import socket
import struct

import pytest
from hypothesis import given, strategies as st

from ovsflow.deny.packet import PacketError, parse_packet
from ovsflow.deny.rules import deny_flows
from ovsflow.deny.session import Backoff
from ovsflow.deny.store import DenyStore
from ovsflow.protocol_list import parse_protocol_list
from ovsflow.record import ACTIVE_TIMEOUT, DENY, FORCED_END, IDLE_TIMEOUT

MACS = b"\x02" * 6 + b"\x04" * 6
A4, B4 = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")
A6, B6 = (socket.inet_pton(socket.AF_INET6, a) for a in ("fd00::1", "fd00::2"))


def ipv4(protocol, l4, total=None, fragment=0, vlan=False):
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total or 20 + len(l4), 1, fragment, 64,
                         protocol, 0, A4, B4)
    tag = struct.pack("!HH", 0x8100, 5) if vlan else b""
    return MACS + tag + b"\x08\x00" + header + l4


def ipv6(next_header, payload):
    header = struct.pack("!IHBB16s16s", 0x60000000, len(payload), next_header, 64, A6, B6)
    return MACS + b"\x86\xdd" + header + payload


def test_udp_tcp_sctp_ports_and_ip_length():
    p = parse_packet(ipv4(17, struct.pack("!HHHH", 5353, 53, 108, 0) + b"x" * 100))
    assert (p.protocol, p.source_port, p.destination_port, p.ip_length) == (17, 5353, 53, 128)
    assert (p.source, p.destination) == (A4, B4)
    assert parse_packet(ipv4(6, struct.pack("!HH", 40000, 80) + b"\0" * 16)).destination_port \
        == 80
    assert parse_packet(ipv4(132, struct.pack("!HH", 1, 2) + b"\0" * 8)).source_port == 1


def test_length_comes_from_the_ip_header_not_the_cut_frame():
    frame = ipv4(17, struct.pack("!HHHH", 1, 2, 1480, 0), total=1500)
    assert parse_packet(frame).ip_length == 1500


def test_icmp_vlan_and_fragments():
    p = parse_packet(ipv4(1, b"\x08\x00\0\0\0\x01\0\x01", vlan=True))
    assert (p.protocol, p.icmp_type, p.icmp_code, p.source_port) == (1, 8, 0, 0)
    later = parse_packet(ipv4(17, b"\xff\xff\xff\xff", fragment=100))
    assert (later.protocol, later.source_port) == (17, 0)  # no L4 header in a later fragment


def test_ipv6_with_extension_headers():
    hop_by_hop = bytes([17, 0]) + b"\0" * 6
    p = parse_packet(ipv6(0, hop_by_hop + struct.pack("!HHHH", 7, 8, 8, 0)))
    assert (p.protocol, p.source_port, p.destination_port, p.ip_length) == (17, 7, 8, 56)
    assert parse_packet(ipv6(58, b"\x80\x00\0\0")).icmp_type == 128


@pytest.mark.parametrize("frame, fragment", [
    (b"\0" * 10, "too short for Ethernet"), (MACS + b"\x08\x06" + b"\0" * 28, "not IP"),
    (MACS + b"\x08\x00" + b"\x45" * 10, "truncated IPv4"),
    (MACS + b"\x86\xdd" + b"\x60" * 20, "truncated IPv6"),
    (MACS + b"\x81\x00\0", "truncated VLAN")])
def test_bad_frames(frame, fragment):
    with pytest.raises(PacketError, match=fragment):
        parse_packet(frame)


@pytest.mark.fuzz
@given(st.binary(max_size=120))
def test_fuzzed_frames_parse_or_raise_packet_error(blob):
    """Whatever parses must fit the record's fields: the store and the encoder trust it."""
    for frame in (blob, MACS + b"\x08\x00" + blob, MACS + b"\x86\xdd" + blob):
        try:
            p = parse_packet(frame)
        except PacketError:
            continue
        assert len(p.source) == len(p.destination) in (4, 16)
        assert 0 <= p.protocol <= 255 and 0 <= p.icmp_type <= 255 and 0 <= p.icmp_code <= 255
        assert 0 <= p.source_port <= 65535 and 0 <= p.destination_port <= 65535
        assert 0 <= p.ip_length <= 65535 + 40


def summary(protocols):
    return sorted((f.priority, tuple((x.name, x.int()) for x in f.match), f.export)
                  for f in deny_flows(parse_protocol_list(protocols).protocols))


def test_flows_for_a_protocol_list():
    assert summary(["udp", "icmp", "icmpv6"]) == [
        (0, (), False),
        (200, (("eth_type", 0x0800), ("ip_proto", 1)), True),
        (200, (("eth_type", 0x0800), ("ip_proto", 17)), True),
        (200, (("eth_type", 0x86DD), ("ip_proto", 17)), True),
        (200, (("eth_type", 0x86DD), ("ip_proto", 58)), True)]
    assert summary(None) == [(0, (), False), (200, (("eth_type", 0x0800),), True),
                             (200, (("eth_type", 0x86DD),), True)]


def packet(sport=1, length=100):
    return parse_packet(ipv4(17, struct.pack("!HHHH", sport, 53, 8, 0), total=length))


def test_deny_store_aggregates_and_expires():
    store = DenyStore(active_timeout=5, idle_timeout=2, max_entries=10)
    for t in (0.0, 0.5, 1.0):
        store.add(packet(), 42, t)
    store.add(packet(sport=2), 0, 1.0)
    assert store.expired(1.5) == []
    records = store.expired(3.0)
    assert [(r.source_port, r.end_reason, r.packets, r.octets) for r in records] == [
        (1, IDLE_TIMEOUT, 3, 300), (2, IDLE_TIMEOUT, 1, 100)]
    first = records[0]
    assert first.kind == DENY and (first.start_ms, first.end_ms) == (0, 1000)
    assert (first.ingress_rule_action, first.ingress_rule_name) == (2, "42")
    assert records[1].ingress_rule_name == "" and len(store) == 0


def test_deny_store_active_records_carry_deltas_and_flush_forces_the_end():
    store = DenyStore(active_timeout=1, idle_timeout=10, max_entries=10)
    store.add(packet(), 1, 0.0)
    store.add(packet(), 1, 0.9)
    [active] = store.expired(1.0)
    assert (active.end_reason, active.packet_delta, active.packets) == (ACTIVE_TIMEOUT, 2, 2)
    store.add(packet(), 1, 1.5)
    [final] = store.flush(1.6)
    assert (final.end_reason, final.packet_delta, final.packets) == (FORCED_END, 1, 3)


def test_deny_store_is_bounded():
    store = DenyStore(active_timeout=1, idle_timeout=10, max_entries=2)
    for sport in range(5):
        store.add(packet(sport=sport), 0, 0.0)
    assert len(store) == 2 and store.rejected == 3


def test_deny_store_exports_only_while_packets_come_then_one_idle_record():
    store = DenyStore(active_timeout=1, idle_timeout=3, max_entries=10)
    store.add(packet(), 7, 0.0)
    store.add(packet(), 7, 0.5)
    [first] = store.expired(1.0)
    assert store.expired(2.0) == []  # no packet since the last record: nothing to say
    store.add(packet(), 7, 2.5)
    [second] = store.expired(3.0)
    assert store.expired(4.0) == [] and store.expired(5.0) == []
    [last] = store.expired(5.5)  # 3 s after the last packet
    assert [(r.end_reason, r.packet_delta, r.packets, r.start_ms, r.end_ms)
            for r in (first, second, last)] == [
        (ACTIVE_TIMEOUT, 2, 2, 0, 500), (ACTIVE_TIMEOUT, 1, 3, 0, 2500),
        (IDLE_TIMEOUT, 0, 3, 0, 2500)]
    assert len(store) == 0 and store.expired(10.0) == []


def test_deny_store_flow_end_never_goes_backwards_when_the_clock_does():
    store = DenyStore(active_timeout=1, idle_timeout=5, max_entries=10)
    store.add(packet(), 0, 10.0)
    [active] = store.expired(11.0)
    store.add(packet(), 0, 9.0)  # the wall clock was stepped back by a second and a half
    [idle] = store.expired(14.0)
    assert (active.end_ms, idle.end_ms) == (10000, 10000)
    assert (idle.end_reason, idle.packet_delta, idle.start_ms) == (IDLE_TIMEOUT, 1, 10000)


def test_backoff_doubles_to_the_cap_with_jitter_and_resets_after_a_healthy_session():
    backoff = Backoff(initial=0.2, cap=2.0, reset_after=30, rng=random.Random(7))
    delays = [backoff.next_delay(healthy_for=0) for _ in range(8)]
    steps = [0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0, 2.0]
    assert all(step / 2 <= d <= step for d, step in zip(delays, steps)), delays
    assert len(set(delays[4:])) == 4  # jittered: capped retries do not fall in step
    assert 1.0 <= backoff.next_delay(healthy_for=29.9) <= 2.0  # too short to count as healthy
    assert 0.1 <= backoff.next_delay(healthy_for=30.0) <= 0.2  # healthy long enough: reset
    assert 0.2 <= backoff.next_delay(healthy_for=0) <= 0.4
    for _ in range(2000):  # a switch refusing for days: the step stays at the cap
        delay = backoff.next_delay(healthy_for=0)
    assert 1.0 <= delay <= 2.0


# --- reading our flows back (denySource: table)

from openflow import messages as m  # noqa: E402
from openflow.oxm import field  # noqa: E402
from ovsflow.deny.rules import (  # noqa: E402
    COOKIE, CONTROLLER_ID, PACKET_IN_BYTES, DenyFlow, installed_flow,
)


def entry(priority, fields, instructions):
    return m.FlowEntry(250, priority, COOKIE, fields, instructions)


EXPORTED = m.Instructions(250, (m.ControllerAction(CONTROLLER_ID, PACKET_IN_BYTES,
                                                   m.OFPR_ACTION),))


def test_a_flow_read_back_is_ours_only_exactly_as_installed():
    udp = (field("eth_type", 0x0800), field("ip_proto", 17))
    assert installed_flow(entry(200, list(reversed(udp)), EXPORTED), 250) == DenyFlow(
        200, udp, export=True)  # the switch's order of fields does not matter
    assert installed_flow(entry(0, [], m.Instructions()), 250) == DenyFlow(0, (), False)
    changed = [
        m.Instructions(None, EXPORTED.actions),  # the meter gone from the flow
        m.Instructions(251, EXPORTED.actions),  # another meter
        m.Instructions(250, (m.ControllerAction(CONTROLLER_ID, 64, m.OFPR_ACTION),)),
        m.Instructions(250, (m.ControllerAction(7, PACKET_IN_BYTES, m.OFPR_ACTION),)),
        m.Instructions(250, EXPORTED.actions + (m.RawAction(b"\0" * 8),)),
        m.Instructions(250, EXPORTED.actions, goto_table=3),
    ]
    assert [installed_flow(entry(200, list(udp), i), 250) for i in changed] == [None] * 6
    # without a meter (the switch refused ours), a flow with one is not ours either
    assert installed_flow(entry(200, list(udp), EXPORTED), None) is None


# --- Antrea's packet-ins (denySource: antrea)

from openflow import oxm  # noqa: E402
from ovsflow.deny.antrea import (  # noqa: E402
    AntreaDenySource, direction, network_policy_controller_ids, verdict,
)
from ovsflow.deny.store import BOTH, EGRESS, INGRESS, NEITHER  # noqa: E402
from ovsflow.filter import ConnectionFilter  # noqa: E402
from ovsflow.record import RULE_DROP, RULE_REJECT  # noqa: E402

TABLE_NAMES = {12: "AntreaPolicyEgressRule", 13: "EgressRule", 14: "EgressDefaultRule",
               15: "EgressMetric", 23: "AntreaPolicyIngressRule", 24: "IngressRule",
               25: "IngressDefaultRule", 26: "IngressMetric", 28: "Output"}
DENY_MARK, DROP, REJECT, PASS = 0x400, 0b01 << 11, 0b10 << 11, 0b11 << 11
ENDPOINT = 0x0A3A0001  # 10.58.0.1, a Service Endpoint's address as ServiceLB loads it


def antrea_source(protocols=("udp", "tcp")):
    source = AntreaDenySource("/nonexistent", "br-int", ConnectionFilter(
        frozenset(), parse_protocol_list(list(protocols)).protocols), DenyStore(1, 5, 100))
    source.table_names = dict(TABLE_NAMES)
    return source


def registers(values: dict[int, int], version: int) -> list:
    """Registers as OVS puts them in a packet-in's metadata: zero ones left out; over 1.5 in
    OXM_OF_PKT_REG pairs, a zero half masked out (lib/nx-match.c)."""
    if version == m.OFP13:
        return [field(f"reg{n}", value) for n, value in sorted(values.items()) if value]
    fields = []
    for pair in range(8):
        high, low = values.get(2 * pair, 0), values.get(2 * pair + 1, 0)
        if high or low:
            mask = (0xFFFFFFFF if high else 0) << 32 | (0xFFFFFFFF if low else 0)
            fields.append(oxm.Field(oxm.OFPXMC_PACKET_REGS, pair,
                                    (high << 32 | low).to_bytes(8, "big"),
                                    None if mask == (1 << 64) - 1 else mask.to_bytes(8, "big")))
    return fields


def antrea_packet_in(userdata=b"\x01\x01", reg0=DROP, reg2=0, reg3=0, frame=None,
                     version=m.OFP15):
    """An NXT_PACKET_IN2 from Antrea's Output table (28), as decoded: reg0 also carries
    OutputToControllerRegMark and the operations of `userdata`, as Antrea loads them."""
    operations = userdata[1] if len(userdata) > 1 else 0
    reg0 |= operations << 25 | 2 << 21
    data = frame or ipv4(17, struct.pack("!HHHH", 4000, 53, 8, 0))
    return m.PacketIn(0, m.OFPR_NO_MATCH, 28, 0x1020000000001,
                      registers({0: reg0, 2: reg2, 3: reg3}, version), data, len(data),
                      userdata=userdata)


def taken(source):
    """The rule elements of the records the packet-ins so far made (then a new store)."""
    records, source.store = source.store.flush(1.0), DenyStore(1, 5, 100)
    return [(r.ingress_rule_name, r.ingress_rule_action, r.egress_rule_name,
             r.egress_rule_action) for r in records]


@pytest.mark.parametrize("version", [m.OFP13, m.OFP15])
def test_antrea_rule_ids_directions_and_actions_as_antrea_means_them(version):
    source = antrea_source()

    def one(**packet_in):
        source._packet_in(antrea_packet_in(version=version, **packet_in))
        return taken(source)

    # Antrea-native egress drop with logging: the deny mark, reg3 is the rule
    assert one(reg0=DENY_MARK | DROP, reg2=12, reg3=5) == [("", 0, "5", RULE_DROP)]
    # ingress reject with logging (conjunctionActionDenyFlow: disposition and ops)
    assert one(userdata=b"\x01\x03", reg0=DENY_MARK | REJECT, reg2=23, reg3=9) == [
        ("9", RULE_REJECT, "", 0)]
    # Reject without logging or deny tracking: no disposition loaded, only the ops byte
    assert one(userdata=b"\x01\x02", reg0=DENY_MARK, reg2=23, reg3=9) == [
        ("9", RULE_REJECT, "", 0)]
    # ... and after an earlier Pass with logging left 0b11 in the disposition
    assert one(userdata=b"\x01\x02", reg0=DENY_MARK | PASS, reg2=12, reg3=4) == [
        ("", 0, "4", RULE_REJECT)]
    # K8s default drop of a Service's packet: ServiceLB left the Endpoint in reg3, no mark
    assert one(reg0=DROP, reg2=14, reg3=ENDPOINT) == [("", 0, "", RULE_DROP)]
    assert one(userdata=b"\x01\x05", reg0=DROP, reg2=25) == [("", RULE_DROP, "", 0)]
    assert (source.packet_ins, source.ignored, source.allowed) == (6, 0, 0)
    assert source.directionless == 0


def test_a_direction_is_never_guessed_and_said_once(caplog):
    source = antrea_source()
    for _ in range(2):  # no reg2: the packet-in's own table, Output, tells no direction
        source._packet_in(antrea_packet_in(reg0=DENY_MARK | DROP, reg3=7))
    assert taken(source) == [("", 0, "", 0)]  # the rule in neither element
    assert source.directionless == 2
    said = [r.getMessage() for r in caplog.records if "tells no direction" in r.getMessage()]
    assert said == ["deny path: a packet denied in table 28 (named Output) of "
                    "/nonexistent/br-int.mgmt: that table tells no direction, so its records "
                    "name the rule (7) in neither element; counted in "
                    "ovsflow_deny_direction_unknown_total (said once)"]


def test_packet_ins_wait_for_their_tables_name():
    """Names not yet set (ovsflow read them before Antrea named its tables): the packet is
    held until the names are read again, then takes its direction."""
    source = antrea_source()
    source.table_names = {}
    source._packet_in(antrea_packet_in(reg0=DENY_MARK | DROP, reg2=12, reg3=5))
    source._packet_in(antrea_packet_in(reg0=DROP, reg2=25, reg3=ENDPOINT))
    assert len(source.store) == 0 and source.packet_ins == 2
    source._name_held_packets(final=False)  # no names yet: still held
    assert len(source.store) == 0
    source.table_names = {12: "AntreaPolicyEgressRule"}
    source._name_held_packets(final=False)  # named: stored; unnamed: held still
    assert taken(source) == [("", 0, "5", RULE_DROP)]
    source.table_names = dict(TABLE_NAMES)
    source._name_held_packets(final=False)
    assert taken(source) == [("", RULE_DROP, "", 0)]
    source.table_names = {28: "Output"}  # Antrea named its tables, but not this one
    source._packet_in(antrea_packet_in(reg0=DENY_MARK | DROP, reg2=12, reg3=5))
    source._name_held_packets(final=True)  # said, not guessed
    assert taken(source) == [("", 0, "", 0)] and source.directionless == 1
    source._packet_in(antrea_packet_in(reg0=DENY_MARK | DROP, reg2=12, reg3=5))
    source._unnamed = [(*held[:4], held[4] - 10) for held in source._unnamed]  # 10 s ago
    source._name_held_packets(final=False)  # held long enough: no name is coming
    assert taken(source) == [("", 0, "", 0)] and source.directionless == 2


@pytest.mark.parametrize("reg0, operations, expected", [
    (DROP, 0b1, RULE_DROP), (DENY_MARK | DROP, 0b1, RULE_DROP),
    (DENY_MARK | REJECT, 0b11, RULE_REJECT), (DENY_MARK, 0b10, RULE_REJECT),
    (DENY_MARK | PASS, 0b10, RULE_REJECT), (DENY_MARK | DROP, 0b100, RULE_DROP),
    (DROP, 0b100, RULE_DROP), (0, 0b1, None), (PASS, 0b1, None),
])
def test_verdicts_from_the_disposition_the_operations_and_the_deny_mark(reg0, operations,
                                                                         expected):
    assert verdict(reg0, operations) == expected


def test_antrea_packet_ins_that_are_not_denied_packets_are_counted_not_taken():
    source = antrea_source(protocols=["tcp"])
    source._packet_in(antrea_packet_in(reg0=0, reg2=23))  # allowed, logged
    source._packet_in(antrea_packet_in(reg0=PASS, reg2=12))  # pass, logged
    source._packet_in(antrea_packet_in(userdata=b"\x00\x01"))  # Traceflow
    source._packet_in(antrea_packet_in(userdata=b""))  # no userdata: not Antrea's action
    source._packet_in(antrea_packet_in(reg2=12, reg3=5))  # udp: not exported
    source._packet_in(antrea_packet_in(reg2=12, frame=b"\0" * 10))
    assert (source.allowed, source.ignored, source.packet_ins, source.unwanted,
            source.malformed) == (2, 2, 2, 1, 1)
    assert dict(source.unwanted_by_protocol) == {17: 1} and len(source.store) == 0


def test_directions_of_antreas_tables():
    assert [direction(name) for name in (
        "AntreaPolicyIngressRule", "IngressRule", "IngressDefaultRule", "IngressMetric",
        "AntreaPolicyEgressRule", "EgressRule", "EgressDefaultRule", "EgressMetric",
        "Output", None)] == [INGRESS] * 4 + [EGRESS] * 4 + [NEITHER, NEITHER]


def test_the_store_names_the_rule_in_the_elements_of_its_direction():
    store = DenyStore(active_timeout=1, idle_timeout=10, max_entries=10)
    for rule_direction in (INGRESS, EGRESS, BOTH, NEITHER):
        store.add(packet(sport=10 + rule_direction), 7, 0.0, rule_direction, RULE_REJECT)
    records = sorted(store.flush(1.0), key=lambda r: r.source_port)
    assert [(r.ingress_rule_name, r.ingress_rule_action, r.egress_rule_name,
             r.egress_rule_action) for r in records] == [
        ("", 0, "", 0), ("7", 3, "7", 3), ("", 0, "7", 3), ("7", 3, "", 0)]
    keys, rows = store.snapshot()
    restored = DenyStore(active_timeout=1, idle_timeout=10, max_entries=10)
    assert restored.restore(keys, rows) == 4
    assert sorted((r.ingress_rule_action, r.egress_rule_action)
                  for r in restored.flush(2.0)) == sorted(
        (r.ingress_rule_action, r.egress_rule_action) for r in records)


def test_antreas_controller_id_is_read_from_its_network_policy_controller_actions():
    def flow(cookie, *actions):
        return m.FlowEntry(28, 200, cookie, [], m.Instructions(256, actions))

    flows = [
        flow(1 << 48, m.ControllerAction(111, 0xFFFF, 0, b"\x01\x01")),
        flow(2 << 48, m.ControllerAction(222, 0xFFFF, 0, b"\x01\x05")),  # a newer round
        flow(3 << 48, m.ControllerAction(333, 0xFFFF, 0, b"\x00\x01")),  # Traceflow
        flow(3 << 48, m.ControllerAction(444, 0xFFFF, 0, b"")),
        flow(3 << 48, m.RawAction(b"\0" * 8)),
    ]
    found = network_policy_controller_ids(flows)
    assert found == [(1 << 48, 111, 28), (2 << 48, 222, 28)]
    assert max(found)[1] == 222


def test_a_meter_in_antreas_range_is_warned_about(caplog):
    """Antrea's meters are 1-255 (Egress QoS) and 256-258 (its packet-ins): a deny meter
    there would be taken over or fought over beside Antrea."""
    from ovsflow.config import OvsConfig
    from ovsflow.deny.source import DenySource

    def warned(meter_id):
        caplog.clear()
        DenySource("/nonexistent", "br-int", 250, meter_id, 5000, ConnectionFilter(
            frozenset(), parse_protocol_list(["udp"]).protocols), DenyStore(1, 5, 100))
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    assert warned(OvsConfig().deny_meter_id) == [] and warned(259) == []
    assert warned(256) == ["deny path: meter 256 is in Antrea's range (1-255 Egress QoS, "
                           "256-258 packet-ins): beside Antrea, choose ovs.denyMeterId "
                           "outside it"]
    assert len(warned(1)) == 1 and len(warned(258)) == 1


@pytest.mark.parametrize("version", [m.OFP13, m.OFP15])
def test_the_deny_flows_are_byte_for_byte_what_ovs_ofctl_sends(tmp_path, version):
    """Our flows and meter as ovs-ofctl itself encodes them for the session's version (in
    1.5 the meter is an action, in 1.3 an instruction)."""
    from ofctl import OPENFLOW, ofctl_sends
    from ovsflow.deny.rules import delete_all, meter_mod

    def sends(*args):
        return ofctl_sends(tmp_path, "-O", OPENFLOW[version], *args)[1]

    flows = {tuple(x.int() for x in f.match): f
             for f in deny_flows(parse_protocol_list(["udp"]).protocols)}
    assert flows[(0x0800, 17)].add(2, 250, 28518, version=version) == sends(
        "add-flow", "SWITCH", "table=250,priority=200,cookie=0x6f7673666c6f7700,udp,"
                              "actions=meter:28518,controller(max_len=128,id=28518)")
    assert flows[(0x86DD, 17)].add(2, 250, None, version=version) == sends(
        "add-flow", "SWITCH", "table=250,priority=200,cookie=0x6f7673666c6f7700,udp6,"
                              "actions=controller(max_len=128,id=28518)")
    assert flows[()].add(2, 250, 28518, version=version) == sends(
        "add-flow", "SWITCH", "table=250,priority=0,cookie=0x6f7673666c6f7700,actions=drop")
    # a non-strict delete ignores the priority: ovs-ofctl writes its default, 0x8000, there
    theirs = sends("del-flows", "SWITCH", "table=250,cookie=0x6f7673666c6f7700/-1")
    assert delete_all(2, 250, version=version) == theirs[:30] + b"\0\0" + theirs[32:]
    assert theirs[30:32] == b"\x80\0"
    assert meter_mod(2, m.OFPMC_ADD, 28518, 5000, version=version) == sends(
        "add-meter", "SWITCH", "meter=28518,pktps,burst,stats,band=type=drop,rate=5000,"
                               "burst_size=500")
