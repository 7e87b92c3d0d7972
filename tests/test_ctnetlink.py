"""The ctnetlink codec against the kernel: a 10k-entry table decoded by us and by pyroute2
(an independent decoder), kernel-side filters, and fuzzed dumps."""

import errno
import json
import socket
import struct
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket

from lab.ctfill import mixed_entry
from lab.netns import Netns
from ovsflow.filter import ConnectionFilter
from ovsflow.polled import Polled, key_bytes
from ovsflow.protocol_list import parse_protocol_list
from ovsflow.source import ctnetlink
from ovsflow.source import columns as column_decoder
from ovsflow.source.columns import ColumnDecoder
from ovsflow.source.ctnetlink import (
    NETLINK_NETFILTER, NLMSGHDR, CtnetlinkError, NetlinkError, count_dump, dump_request,
    new_request, parse_dump,
)
from ovsflow.source.kernel import KernelFilters, KernelSource, plan_dumps

def fill(ns: Netns, count: int) -> None:
    ns.run(sys.executable, "-m", "lab.ctfill", "mixed", str(count))


@pytest.fixture(scope="module")
def table():
    ns = Netns("ct10k")
    try:
        ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1",
               "net.netfilter.nf_conntrack_timestamp=1")
        fill(ns, 10_000)
        yield ns
    finally:
        ns.delete()


def in_netns(ns: Netns, code: str) -> str:
    """Run Python code in the namespace (netlink sockets are per namespace)."""
    return ns.run(sys.executable, "-c", f"import sys; sys.path[:0] = {sys.path!r}\n" + code
                  ).stdout


def test_10k_table_decodes_like_pyroute2(table):
    ours = in_netns(table, """
import socket
from ovsflow.source.ctnetlink import NETLINK_NETFILTER, dump_request, parse_dump
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
s.bind((0, 0))
s.send(dump_request(1, 0))
found = []
while not parse_dump(s.recv(1 << 16), found):
    pass
for c in found:
    print(c.protocol, c.source.hex(), c.destination.hex(), c.source_port, c.destination_port,
          c.icmp_id, c.icmp_type, c.zone, c.status, c.id, c.state, c.packets, c.reply_octets,
          c.start_ns > 0, c.reply_source.hex(), c.reply_destination_port)
""").splitlines()
    reference = in_netns(table, """
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket
def tuple_of(msg, name):
    t = msg.get_attr(name)
    ip, proto = t.get_attr("CTA_TUPLE_IP"), t.get_attr("CTA_TUPLE_PROTO")
    src = ip.get_attr("CTA_IP_V4_SRC") or ip.get_attr("CTA_IP_V6_SRC")
    dst = ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST")
    import ipaddress
    return (proto.get_attr("CTA_PROTO_NUM"), ipaddress.ip_address(src).packed.hex(),
            ipaddress.ip_address(dst).packed.hex(), proto.get_attr("CTA_PROTO_SRC_PORT") or 0,
            proto.get_attr("CTA_PROTO_DST_PORT") or 0,
            proto.get_attr("CTA_PROTO_ICMP_ID") or proto.get_attr("CTA_PROTO_ICMPV6_ID") or 0,
            proto.get_attr("CTA_PROTO_ICMP_TYPE") or proto.get_attr("CTA_PROTO_ICMPV6_TYPE") or 0)
states = ["NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED"]
for family in (0,):
    with NFCTSocket(nfgen_family=family) as ct:
        for msg in ct.dump():
            orig = tuple_of(msg, "CTA_TUPLE_ORIG")
            reply = tuple_of(msg, "CTA_TUPLE_REPLY")
            info = msg.get_attr("CTA_PROTOINFO")
            state = ""
            if info is not None and info.get_attr("CTA_PROTOINFO_TCP") is not None:
                state = states[info.get_attr("CTA_PROTOINFO_TCP").get_attr("CTA_PROTOINFO_TCP_STATE")]
            orig_counters = msg.get_attr("CTA_COUNTERS_ORIG")
            reply_counters = msg.get_attr("CTA_COUNTERS_REPLY")
            print(*orig, msg.get_attr("CTA_ZONE") or 0, msg.get_attr("CTA_STATUS"),
                  msg.get_attr("CTA_ID"), state,
                  orig_counters.get_attr("CTA_COUNTERS_PACKETS"),
                  reply_counters.get_attr("CTA_COUNTERS_BYTES"),
                  msg.get_attr("CTA_TIMESTAMP") is not None, reply[1], reply[4])
""").splitlines()
    assert len(ours) == 10_000
    assert sorted(ours) == sorted(reference)


def test_kernel_filters_by_zone_and_protocol(table):
    supported = in_netns(table, """
from ovsflow.source.kernel import probe_filters
print(probe_filters().protocol)""").strip()
    assert supported == "True"  # Linux >= 5.8; the machines we run on have it
    counts = in_netns(table, """
from ovsflow.filter import ConnectionFilter
from ovsflow.protocol_list import parse_protocol_list
from ovsflow.source.kernel import KernelSource, probe_filters
filters = probe_filters()
for protocols, zones in ((None, []), (["udp"], [65520]), (["icmp", "icmpv6"], [7]),
                         (["tcp"], [7, 65520]), (["udp"], [0, 7])):
    f = ConnectionFilter(frozenset(zones), parse_protocol_list(protocols).protocols)
    source = KernelSource(f, filters)
    found = source.dump_all()
    print(len(found), len(source.dumps), sorted({(c.protocol, c.zone) for c in found}))
""").splitlines()
    specs = [mixed_entry(i) for i in range(10_000)]

    def expected(protocols, zones):
        return sum(1 for p, *_, z in specs if (not protocols or p in protocols)
                   and (not zones or z in zones))

    assert counts[0].startswith(f"{expected(None, None)} 1 ")
    assert counts[1].startswith(f"{expected({17}, {65520})} 2 [(17, 65520)]")
    assert counts[2].startswith(f"{expected({1, 58}, {7})} 2 [(1, 7), (58, 7)]")
    assert counts[3].startswith(f"{expected({6}, {7, 65520})} 4 [(6, 7), (6, 65520)]")
    # zone 0 cannot be asked of the kernel: one unfiltered-by-zone dump per protocol family
    assert counts[4].startswith(f"{expected({17}, {0, 7})} 2 [(17, 7)]")


def test_count_without_connections_matches_the_table(table):
    """`ovsflow conntrack --count`'s path: dumps counted by zone and protocol, filtered,
    against what ctfill put in the table."""
    counts = in_netns(table, """
from ovsflow.filter import ConnectionFilter
from ovsflow.protocol_list import parse_protocol_list
from ovsflow.source.kernel import KernelFilters, KernelSource, probe_filters
for kernel in (probe_filters(), KernelFilters(family=False, protocol=False, zone=False)):
    for protocols, zones in ((None, []), (["udp"], [65520]), (["icmp", "icmpv6"], [7]),
                             (["tcp"], [7, 65520]), (["udp"], [0, 7])):
        f = ConnectionFilter(frozenset(zones), parse_protocol_list(protocols).protocols)
        print(KernelSource(f, kernel).count())
""").split()
    specs = [mixed_entry(i) for i in range(10_000)]

    def expected(protocols, zones):
        return sum(1 for p, *_, z in specs if (not protocols or p in protocols)
                   and (not zones or z in zones))

    wanted = [expected(None, None), expected({17}, {65520}), expected({1, 58}, {7}),
              expected({6}, {7, 65520}), expected({17}, {0, 7})]
    assert [int(n) for n in counts] == wanted * 2  # kernel-filtered, then userspace alone


def test_dump_plan_falls_back_to_one_walk_for_long_protocol_lists():
    many = ConnectionFilter(frozenset({65520}),
                            parse_protocol_list(list(range(2, 40))).protocols)
    every_filter = KernelFilters(family=True, protocol=True, zone=True)
    assert [(d.family, d.protocol) for d in plan_dumps(many, every_filter)] == [(0, None)]
    few = ConnectionFilter(frozenset({65520}), parse_protocol_list(["tcp"]).protocols)
    no_protocol_filter = KernelFilters(family=True, protocol=False, zone=True)
    assert [d.protocol for d in plan_dumps(few, no_protocol_filter)] == [None]
    assert [(d.family, d.protocol) for d in plan_dumps(few, every_filter)] == [
        (socket.AF_INET, 6), (socket.AF_INET6, 6)]


@pytest.fixture(scope="module")
def real_dump(table):
    """Raw bytes of a dump of the 10k table (first receive buffers), for fuzzing."""
    hexed = in_netns(table, """
import socket
from ovsflow.source.ctnetlink import NETLINK_NETFILTER, dump_request
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
s.bind((0, 0))
s.send(dump_request(1, 0))
print(s.recv(1 << 16).hex())
""")
    return bytes.fromhex(hexed.strip())


def test_a_real_buffer_decodes(real_dump):
    found = []
    assert parse_dump(real_dump, found) is False  # more buffers follow
    assert len(found) > 10 and all(c.source and c.destination for c in found)


@pytest.mark.fuzz
@given(st.data())
def test_truncated_or_corrupted_dumps_raise_clear_errors(real_dump, data):
    buffer = bytearray(real_dump[:data.draw(st.integers(0, len(real_dump)))])
    for _ in range(data.draw(st.integers(0, 8))):
        if buffer:
            position = data.draw(st.integers(0, len(buffer) - 1))
            buffer[position] = data.draw(st.integers(0, 255))
    try:
        parse_dump(bytes(buffer), [])
    except (CtnetlinkError, NetlinkError):
        pass


@pytest.mark.fuzz
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_clear_errors(blob):
    try:
        parse_dump(blob, [])
    except (CtnetlinkError, NetlinkError):
        pass


def test_an_error_reply_is_reported_with_its_errno():
    error = NLMSGHDR.pack(36, 2, 0, 1, 0) + struct.pack("=i", -95) + NLMSGHDR.pack(16, 0, 0, 0, 0)
    with pytest.raises(NetlinkError, match="Operation not supported") as caught:
        parse_dump(error, [])
    assert caught.value.errno == 95


def test_request_encoding():
    request = dump_request(7, socket.AF_INET, zone=65520, protocol=6)
    length, kind, flags, sequence, _ = NLMSGHDR.unpack_from(request)
    assert (length, kind, flags, sequence) == (len(request), 0x101, 0x301, 7)
    assert struct.pack(">H", 65520) in request
    message = new_request(1, 17, b"\x0a\0\0\x01", b"\x0a\0\0\x02", 5, 53, zone=9)
    assert NLMSGHDR.unpack_from(message)[1] == 0x100


def test_the_layout_fast_path_decodes_like_the_walk(table):
    """Every message of a real dump, decoded through the learned layouts and by the plain
    attribute walk: the same connection."""
    report = in_netns(table, """
import socket
from ovsflow.source import ctnetlink as ct
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, ct.NETLINK_NETFILTER)
s.bind((0, 0))
s.send(ct.dump_request(1, 0))
checked = differ = 0
done = False
while not done:
    data, pos = s.recv(1 << 16), 0
    while pos < len(data):
        length, kind = ct.NLMSGHDR.unpack_from(data, pos)[:2]
        if kind == ct.NLMSG_DONE:
            done = True
            break
        fast = []
        ct.parse_dump(data[pos:pos + length], fast)
        differ += fast[0] != ct._connection(data, pos + 20, pos + length)
        checked += 1
        pos += (length + 3) & ~3
print(checked, differ, sum(len(v) for v in ct._LAYOUTS.values()))
""").split()
    checked, differ, layouts = map(int, report)
    assert (checked, differ) == (10_000, 0)
    assert 1 <= layouts <= 20  # a handful of shapes cover the table


def same_columns(columns: Polled, connections) -> None:
    """`columns` hold `connections` (the object decoder's), row for row once sorted by key."""
    expected = Polled.from_connections(connections)
    our_keys, their_keys = key_bytes(columns.keys), key_bytes(expected.keys)
    assert sorted(our_keys) == sorted(their_keys)
    ours, theirs = (np.argsort(np.array(keys, object), kind="stable")
                    for keys in (our_keys, their_keys))
    for name in ("protocols", "zones", "ids", "packets", "octets", "reply_packets",
                 "reply_octets", "counted", "starts_ns", "timeouts", "states", "labels",
                 "ended", "marks", "destination_ports"):
        assert np.array_equal(getattr(columns, name)[ours], getattr(expected, name)[theirs]), \
            name


def test_the_columns_of_a_real_dump_are_the_connections_decoded_one_by_one(table):
    """The agent's decoder (numpy gathers per learned layout, over joined receive buffers)
    against parse_dump on the same bytes: the 10k mixed table (TCP, UDP, ICMP, IPv4/IPv6,
    zones, states)."""
    hexed = in_netns(table, """
import socket
from ovsflow.source.ctnetlink import NETLINK_NETFILTER, dump_request, parse_dump
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
s.bind((0, 0))
s.send(dump_request(1, 0))
while True:
    data = s.recv(1 << 16)
    print(data.hex())
    if parse_dump(data, []):
        break
""").split()
    buffers = [bytes.fromhex(line) for line in hexed]
    connections = []
    for data in buffers:
        parse_dump(data, connections)
    assert len(connections) == 10_000
    # as the agent takes them, a few buffers at a time; and each buffer alone
    for run in (4, 1):
        decoder, pieces, done = ColumnDecoder(), [], False
        for index, data in enumerate(buffers, 1):
            done = decoder.feed(data)
            if index % run == 0 or done:
                pieces.append(decoder.take())
        assert done
        same_columns(Polled.joined(pieces), connections)
        assert sum(map(len, pieces)) == 10_000


def test_rule_ids_of_labelled_entries_on_the_fast_path():
    """Antrea's rule ids ride in ct_label (ingress rule in bits 0-31, egress in 32-63). Six
    UDP entries, each with rule ids of its own (iptables' connlabel sets one bit per rule),
    share a message length and a layout: the first is walked, the other five take the
    learned fast path, which must read each one's labels, not the walk's default."""
    ns = Netns("ctlabels")
    expected = {9000 + index: (index + 1, 0x10 + index) for index in range(6)}
    try:
        ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1",
               "net.netfilter.nf_conntrack_timestamp=1")
        ns.run("iptables", "-t", "raw", "-A", "OUTPUT", "-j", "CT", "--zone", "65520")
        for port, (ingress, egress) in expected.items():
            for bit in [b for b in range(64) if (egress << 32 | ingress) >> b & 1]:
                ns.run("iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport",
                       str(port), "-m", "connlabel", "--label", str(bit), "--set")
        report = json.loads(in_netns(ns, f"""
import json, socket
from ovsflow.enrich import rule_ids
from ovsflow.source import ctnetlink as ct
sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in {sorted(expected)}:
    sender.sendto(b"x", ("127.0.0.1", port))
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, ct.NETLINK_NETFILTER)
s.bind((0, 0))
s.send(ct.dump_request(1, socket.AF_INET, protocol=17))
buffers, found = [], []
while True:
    buffers.append(s.recv(1 << 16))
    if ct.parse_dump(buffers[-1], found):
        break
lengths, data = [], b"".join(buffers)
pos = 0
while pos < len(data):
    length, kind = ct.NLMSGHDR.unpack_from(data, pos)[:2]
    if kind != ct.NLMSG_DONE:
        lengths.append(length)
    pos += (length + 3) & ~3
print(json.dumps({{"rules": {{c.destination_port: rule_ids(c.labels) for c in found}},
                  "lengths": lengths, "learned": sorted(ct._LAYOUTS)}}))
"""))
    finally:
        ns.delete()
    [length] = set(report["lengths"])  # one shape for all six (labels included) ...
    assert len(report["lengths"]) == 6 and report["learned"] == [length]  # ... one layout
    assert {int(port): tuple(ids) for port, ids in report["rules"].items()} == expected


# --- crafted messages: what this machine's kernel does not send (x86_64 aligns 64-bit
# values without padding), built by an encoder written here, independent of the codec's

def nla(kind: int, payload: bytes, nested: bool = False) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind | (0x8000 if nested else 0)) + payload + \
        b"\0" * (-length % 4)


def ct_message(*attrs: bytes, family: int = socket.AF_INET) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), 0x100, 2, 1, 0) + body


def udp_tuple(kind: int, src: str, dst: str, sport: int, dport: int) -> bytes:
    ip = nla(1, socket.inet_aton(src)) + nla(2, socket.inet_aton(dst))
    proto = nla(1, bytes((17,))) + nla(2, struct.pack(">H", sport)) + \
        nla(3, struct.pack(">H", dport))
    return nla(kind, nla(1, ip, True) + nla(2, proto, True), True)


PAD = nla(5, b"")  # CTA_COUNTERS_PAD; CTA_TIMESTAMP_PAD is type 3 in its nest


def padded_entry(sport: int, packets: int, octets: int, *, status: int = 8,
                 state: int | None = None) -> bytes:
    """An entry as a kernel without efficient unaligned access sends it: an empty PAD
    attribute before every 64-bit counter and timestamp."""
    counters = lambda kind, p, o: nla(kind, PAD + nla(1, struct.pack(">Q", p)) + PAD +  # noqa: E731
                                      nla(2, struct.pack(">Q", o)), True)
    attrs = [udp_tuple(1, "10.1.0.1", "10.1.0.2", sport, 53),
             udp_tuple(2, "10.1.0.2", "10.1.0.1", 53, sport),
             nla(3, struct.pack(">I", status)), nla(7, struct.pack(">I", 30)),
             counters(9, packets, octets), counters(10, packets + 1, octets * 2),
             nla(12, struct.pack(">I", 1000 + sport)), nla(18, struct.pack(">H", 65520)),
             nla(20, nla(3, b"") + nla(1, struct.pack(">Q", 5 * 10**18 + sport)), True)]
    if state is not None:
        attrs.append(nla(4, nla(1, nla(1, bytes((state,))), True), True))  # TCP state
    return ct_message(*attrs)


DONE = struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0" * 4


def test_pad_attributes_are_skipped_by_the_walk_and_the_learned_layout():
    found = []
    # the first of a shape is walked (and learned), the next ones take the fast path
    assert parse_dump(b"".join(padded_entry(p, p * 10, p * 1000) for p in (1, 2, 3)) + DONE,
                      found)
    assert [(c.source_port, c.packets, c.octets, c.reply_packets, c.reply_octets)
            for c in found] == [(p, p * 10, p * 1000, p * 10 + 1, p * 2000) for p in (1, 2, 3)]
    assert [(c.id, c.zone, c.start_ns, c.timeout) for c in found] == [
        (1000 + p, 65520, 5 * 10**18 + p, 30) for p in (1, 2, 3)]
    assert {(c.source, c.reply_source) for c in found} == {
        (socket.inet_aton("10.1.0.1"), socket.inet_aton("10.1.0.2"))}


def test_the_decoder_says_when_a_connection_ended():
    """IPS_DYING, or TCP TIME_WAIT / CLOSE: the neutral `ended` flag the store reads. Both
    the walk and the learned layout (the second message of each shape) set it."""
    found = []
    parse_dump(b"".join([padded_entry(1, 1, 1), padded_entry(2, 1, 1),
                         padded_entry(3, 1, 1, status=8 | 1 << 9),
                         padded_entry(4, 1, 1, status=8 | 1 << 9),
                         padded_entry(5, 1, 1, state=3), padded_entry(6, 1, 1, state=3),
                         padded_entry(7, 1, 1, state=7), padded_entry(8, 1, 1, state=7),
                         padded_entry(9, 1, 1, state=8)]), found)
    assert [(c.source_port, c.state, c.ended) for c in found] == [
        (1, "", False), (2, "", False), (3, "", True), (4, "", True),
        (5, "ESTABLISHED", False), (6, "ESTABLISHED", False), (7, "TIME_WAIT", True),
        (8, "TIME_WAIT", True), (9, "CLOSE", True)]


def test_a_16_byte_error_message_is_a_clear_error_not_the_next_messages_bytes():
    """NLMSG_ERROR with the header alone: its errno is not there to read (the next
    message's length was read as one)."""
    short_error = struct.pack("=IHHII", 16, 2, 0, 1, 0)
    for data in (short_error, short_error + DONE):
        with pytest.raises(CtnetlinkError, match="NLMSG_ERROR at offset 0 has 16 bytes"):
            parse_dump(data, [])


attribute_trees = st.recursive(
    st.tuples(st.integers(0, 30), st.binary(max_size=12)).map(lambda a: nla(*a)),
    lambda children: st.tuples(st.integers(0, 30), st.lists(children, max_size=4)).map(
        lambda a: nla(a[0], b"".join(a[1]), True)),
    max_leaves=12)


@st.composite
def netlink_buffers(draw):
    """Messages of the kinds a dump holds (CT_NEW with arbitrary attribute trees, errors of
    any length, DONE), some with a length field that lies: truncated messages, a 16-byte
    NLMSG_ERROR, entries without addresses (which the learned layout read as 0, not bytes)."""
    messages = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from([0x100, 0x100, 2, 3]))
        body = struct.pack("=BBH", 2, 0, 0) + b"".join(draw(st.lists(attribute_trees,
                                                                     max_size=6)))
        if kind == 2:
            body = draw(st.binary(max_size=24))
        length = 16 + len(body)
        if draw(st.booleans()):
            length = draw(st.integers(0, length + 8))
        messages.append(struct.pack("=IHHII", length, kind, 2, 1, 0) + body)
    return b"".join(messages)


@pytest.mark.fuzz
@given(netlink_buffers())
def test_structured_garbage_raises_only_clear_errors(data):
    """... and the count reads the same entries as the decode, or fails as clearly."""
    found, counts = [], {}
    try:
        parse_dump(data, found)
    except (CtnetlinkError, NetlinkError):
        with pytest.raises((CtnetlinkError, NetlinkError)):
            count_dump(data, counts)
        with pytest.raises((CtnetlinkError, NetlinkError)):
            decoder = ColumnDecoder()
            decoder.feed(data)
            decoder.take()
        return
    assert all(isinstance(c.source, bytes) and isinstance(c.ended, bool) for c in found)
    count_dump(data, counts)
    assert counts == Counter((c.zone, c.protocol, c.destination_port) for c in found)
    decoder = ColumnDecoder()
    try:
        decoder.feed(data)
        columns = decoder.take()
    except CtnetlinkError as err:  # a value no column holds (labels over 128 bits)
        assert "out of range" in str(err)
        return
    same_columns(columns, found)


def test_count_reads_zone_protocol_and_port_on_the_walk_and_the_learned_layout():
    """The first message of a shape is walked, the next ones counted through its layout:
    zone, protocol and destination port read at the layout's offsets, zone 0 where the
    entry has none."""
    zoned = [padded_entry(p, 1, 1) for p in (1, 2, 3)]
    unzoned = [ct_message(udp_tuple(1, "10.1.0.1", "10.1.0.2", p, 5300 + p),
                          udp_tuple(2, "10.1.0.2", "10.1.0.1", 5300 + p, p),
                          nla(3, struct.pack(">I", 8)), nla(12, struct.pack(">I", p)))
               for p in (4, 5, 5)]
    counts = {}
    assert count_dump(b"".join(zoned + unzoned) + DONE, counts) is True
    assert counts == {(65520, 17, 53): 3, (0, 17, 5304): 1, (0, 17, 5305): 2}


@pytest.mark.fuzz
@given(st.lists(st.tuples(st.integers(1, 65535), st.integers(0, 2**64 - 2),
                          st.integers(0, 2**63 - 1)), min_size=1, max_size=6))
def test_padded_entries_decode_any_counter_values(entries):
    found = []
    parse_dump(b"".join(padded_entry(p, n, o) for p, n, o in entries), found)
    assert [(c.source_port, c.packets, c.octets) for c in found] == entries


class OverflowingSocket:
    """A netlink socket whose first dump overflows (ENOBUFS) after its first buffer. A
    stand-in: a real dump is paced by our reads and does not overflow on demand."""

    def __init__(self, buffers: list[bytes]):
        self.buffers, self.sent, self.overflowed = buffers, 0, False
        self.pending: list[bytes] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def send(self, request: bytes) -> None:
        self.sent += 1
        self.pending = list(self.buffers)

    def recv(self, size: int) -> bytes:
        if not self.overflowed and len(self.pending) < len(self.buffers):
            self.overflowed = True
            raise OSError(errno.ENOBUFS, "No buffer space available")
        if not self.pending:
            raise BlockingIOError
        return self.pending.pop(0)

    def setblocking(self, flag: bool) -> None:
        pass


def test_a_count_restarted_after_an_overflow_counts_each_entry_once():
    buffers = [b"".join(padded_entry(p, 1, 1) for p in range(1, 4)),
               b"".join(padded_entry(p, 1, 1) for p in range(4, 6)) + DONE]
    source = KernelSource(ConnectionFilter(frozenset(), parse_protocol_list(None).protocols),
                          KernelFilters(family=False, protocol=False, zone=False))
    fake = OverflowingSocket(buffers)
    source._socket = lambda: fake
    assert source.count() == 5
    assert (fake.sent, source.dump_retries) == (2, 1)


def entry_with_payload(sport: int, payload: bytes, tcp_state: int | None) -> bytes:
    """An entry carrying `payload` in an attribute no decoder reads (type 31), after its
    tuples: room for bytes that look like a message header."""
    attrs = [udp_tuple(1, "10.1.0.1", "10.1.0.2", sport, 53),
             udp_tuple(2, "10.1.0.2", "10.1.0.1", 53, sport),
             nla(3, struct.pack(">I", 8)), nla(12, struct.pack(">I", sport)),
             nla(31, payload)]
    if tcp_state is not None:
        attrs.append(nla(4, nla(1, nla(1, bytes((tcp_state,))), True), True))
    return ct_message(*attrs)


def test_a_buffer_of_entries_of_several_lengths_is_read_without_the_walk():
    data = b"".join(entry_with_payload(port, b"x" * (port % 3 * 4), 3 if port % 2 else None)
                    for port in range(1, 40))
    starts, lengths, done = ctnetlink._entries(data)
    assert len(set(lengths)) > 2 and not done
    chained = chain(data)
    assert [values.tolist() for values in chained] == [starts, lengths]
    # the dump's last buffer (NLMSG_DONE after the entries) is left to the walk
    assert chain(data + DONE) == (None, None)
    decoder = ColumnDecoder()
    assert decoder.feed(data) is False and decoder.feed(DONE) is True
    assert sorted(decoder.take().ids.tolist()) == list(range(1, 40))
    # a look-alike inside an entry (the type, a length that fits, the dump's sequence and
    # port) breaks the chain: the walk reads that buffer
    planted = entry_with_payload(1, struct.pack("=IHHII", 20, 0x100, 2, 1, 0), None)
    assert chain(planted + data) == (None, None)
    assert ctnetlink._entries(planted + data)[0][:2] == [0, len(planted)]


def chain(data: bytes):
    return column_decoder._chain(np.frombuffer(data, np.uint32))


@pytest.mark.fuzz
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 700), st.booleans(),
                          st.booleans()), min_size=1, max_size=8))
def test_header_look_alikes_inside_entries_never_move_the_message_starts(entries):
    """An entry's bytes may hold an entry's type at an aligned place, with a length,
    sequence and port that fit (an address or a label is anybody's bytes): the starts read
    without the walk are the walk's, or the walk reads the buffer; the decoder's columns
    are parse_dump's."""
    messages = []
    for sport, (words_before, fake_length, fake_is_plausible, tcp) in enumerate(entries, 1):
        fake = struct.pack("=IHHII", fake_length, 0x100, 2, 1 if fake_is_plausible else 7, 0)
        messages.append(entry_with_payload(sport, b"\0" * 4 * words_before + fake,
                                           3 if tcp else None))
    data = b"".join(messages)
    starts, lengths, _ = ctnetlink._entries(data)
    chained = chain(data)
    assert chained[0] is None or [values.tolist() for values in chained] == [starts,
                                                                               lengths]
    found = []
    parse_dump(data, found)
    decoder = ColumnDecoder()
    decoder.feed(data)
    same_columns(decoder.take(), found)


MARKS = {1: 0x13, 2: 0x10, 3: 0x0, 4: 0x3, 5: 0xF0, 6: 0x1}  # source port -> ct_mark


def test_marks_reach_the_columns_and_the_filter_beside_antrea():
    """The kernel's CTA_MARK, through the agent's path (the column decoder, the walk of a
    first message and the layout it learns) and `--count`'s: beside Antrea, an entry
    outside zone 0 whose mark has no source bits (ct_mark[0..3]) is left out, one in
    zone 0 is kept whatever its mark."""
    ns = Netns("ctmarks")
    try:
        ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1",
               "net.netfilter.nf_conntrack_timestamp=1")
        report = json.loads(in_netns(ns, f"""
import json, socket
from ovsflow.filter import ConnectionFilter
from ovsflow.polled import key_bytes
from ovsflow.protocols import ALL_PROTOCOLS
from ovsflow.source import ctnetlink as ct
from ovsflow.source.kernel import KernelSource, probe_filters
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, ct.NETLINK_NETFILTER)
s.bind((0, 0))
marks = {MARKS!r}
for sport, mark in marks.items():
    for zone in (65520, 0):
        s.send(ct.new_request(sport, 17, bytes((10, 9, 0, 1)), bytes((10, 9, 0, 2)), sport,
                              53, zone=zone, mark=mark, timeout=60))
        ct.parse_dump(s.recv(1 << 16), [])
kernel = probe_filters()
found = {{}}
for antrea in (False, True):
    source = KernelSource(ConnectionFilter(frozenset(), ALL_PROTOCOLS, antrea), kernel)
    pieces = list(source.pieces())
    found[antrea] = {{
        "columns": sorted((int.from_bytes(k[1:3], "big"), z, m) for p in pieces
                          for k, z, m in zip(key_bytes(p.keys), p.zones.tolist(),
                                             p.marks.tolist())),
        "objects": sorted((c.source_port, c.zone, c.mark) for c in source.dump_all()),
        "count": source.count(), "left_out": dict(source.filter.rejected)}}
print(json.dumps(found))
"""))
    finally:
        ns.delete()
    everything = sorted([sport, zone, mark] for sport, mark in MARKS.items()
                        for zone in (65520, 0))
    assert report["false"]["columns"] == report["false"]["objects"] == everything
    assert report["false"]["count"] == 12 and report["false"]["left_out"] == {}
    allowed = [[sport, zone, mark] for sport, zone, mark in everything
               if zone == 0 or mark & 0xF]
    assert report["true"]["columns"] == report["true"]["objects"] == allowed
    assert report["true"]["count"] == len(allowed) == 9
    # sports 2, 3 and 5 in zone 65520; counted by the column path and by the objects'
    assert report["true"]["left_out"] == {"17": 2 * 3}
