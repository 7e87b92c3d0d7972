"""The ctnetlink codec against the kernel: a 10k-entry table decoded by us and by pyroute2
(an independent decoder), kernel-side filters, and fuzzed dumps."""

import socket
import struct
import sys

import pytest
from hypothesis import given, settings, strategies as st
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket

from lab.ctfill import mixed_entry
from lab.netns import Netns
from ovsflow.filter import ConnectionFilter
from ovsflow.protocols import parse_protocol_list
from ovsflow.source.ctnetlink import (
    NETLINK_NETFILTER, NLMSGHDR, CtnetlinkError, NetlinkError, dump_request, new_request,
    parse_dump,
)
from ovsflow.source.kernel import KernelSource, kernel_supports_protocol_filter, plan_dumps

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
from ovsflow.source.kernel import kernel_supports_protocol_filter
print(kernel_supports_protocol_filter())""").strip()
    assert supported == "True"  # Linux >= 5.8; the machines we run on have it
    counts = in_netns(table, """
from ovsflow.filter import ConnectionFilter
from ovsflow.protocols import parse_protocol_list
from ovsflow.source.kernel import KernelSource
for protocols, zones in ((None, []), (["udp"], [65520]), (["icmp", "icmpv6"], [7]),
                         (["tcp"], [7, 65520]), (["udp"], [0, 7])):
    f = ConnectionFilter(frozenset(zones), parse_protocol_list(protocols).protocols)
    source = KernelSource(f, protocol_filter=True)
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


def test_dump_plan_falls_back_to_one_walk_for_long_protocol_lists():
    many = ConnectionFilter(frozenset({65520}),
                            parse_protocol_list(list(range(2, 40))).protocols)
    assert [(d.family, d.protocol) for d in plan_dumps(many, True)] == [(0, None)]
    few = ConnectionFilter(frozenset({65520}), parse_protocol_list(["tcp"]).protocols)
    assert [d.protocol for d in plan_dumps(few, False)] == [None]
    assert [(d.family, d.protocol) for d in plan_dumps(few, True)] == [
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
