"""ctnetlink (nf_conntrack over netfilter netlink) without I/O: dump requests to bytes,
dump replies from bytes to `Connection` objects (or only counted by zone and protocol).

This is the poll's hot path, so it is a compact hand-written decoder: pyroute2's generic
netlink parser managed ~2-3k entries/s here (25x slower than `conntrack -L`); walking the
attributes with struct and bytes indexing, and keeping only the fields ovsflow exports, is
an order of magnitude faster. pyroute2 still serves where speed does not matter (the feature
probe in `kernel.py`, and as an independent reference decoder in the tests).
"""

from __future__ import annotations

import operator
import os
import socket
import struct
from typing import NoReturn

from ..connection import ENDED_STATES, IDENTITY_FIELDS, Connection, identity

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFNETLINK_V0 = 0
NLA_F_NESTED, NLA_TYPE_MASK = 0x8000, 0x3FFF

# enum ctattr_type
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO = 1, 2, 3, 4
CTA_TIMEOUT, CTA_MARK, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY = 7, 8, 9, 10
CTA_ID, CTA_ZONE, CTA_TIMESTAMP, CTA_LABELS, CTA_FILTER = 12, 18, 20, 22, 25
# enum ctattr_tuple, ctattr_ip, ctattr_l4proto
CTA_TUPLE_IP, CTA_TUPLE_PROTO, CTA_TUPLE_ZONE = 1, 2, 3
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
CTA_TIMESTAMP_START = 1
# Architectures without efficient unaligned access get an empty CTA_COUNTERS_PAD (5) /
# CTA_TIMESTAMP_PAD (3) attribute (4 bytes, no payload) before each 64-bit value, so that
# the value is 8-byte aligned (nla_put_be64): the walks skip any attribute they do not read.
CTA_PROTOINFO_TCP, CTA_PROTOINFO_DCCP, CTA_PROTOINFO_SCTP = 1, 2, 3
CTA_PROTOINFO_STATE = 1  # the first attribute of each of the three nests
CTA_FILTER_ORIG_FLAGS = 1
CTA_FILTER_F_CTA_PROTO_NUM = 1 << 3  # net/netfilter/nf_internals.h
CTA_FILTER_F_CTA_PROTO_DST_PORT = 1 << 5

IPS_DYING = 1 << 9

_FIXED_SIZE = frozenset({CTA_STATUS, CTA_ID, CTA_TIMEOUT, CTA_MARK})  # 4-byte values

STATE_NAMES = {
    CTA_PROTOINFO_TCP: ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT",
                        "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2"),
    CTA_PROTOINFO_SCTP: ("NONE", "CLOSED", "COOKIE_WAIT", "COOKIE_ECHOED", "ESTABLISHED",
                         "SHUTDOWN_SENT", "SHUTDOWN_RECD", "SHUTDOWN_ACK_SENT",
                         "HEARTBEAT_SENT", "HEARTBEAT_ACKED"),
    CTA_PROTOINFO_DCCP: ("NONE", "REQUEST", "RESPOND", "PARTOPEN", "OPEN", "CLOSEREQ",
                         "CLOSING", "TIMEWAIT", "IGNORE", "INVALID"),
}

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NFGENMSG = struct.Struct("=BBH")  # family, version, resource id (big-endian, unused)
NLATTR = struct.Struct("=HH")  # length, type
_unpack_attr = NLATTR.unpack_from
_BE32 = struct.Struct(">I").unpack_from
_BE64 = struct.Struct(">Q").unpack_from


class CtnetlinkError(ValueError):
    """A malformed dump message; the text says where."""


class NetlinkError(OSError):
    """The kernel answered the request with an error (errno)."""


def _attr(attr_type: int, payload: bytes) -> bytes:
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, attr_type) + payload + b"\0" * (-length % 4)


def _message(kind: int, flags: int, sequence: int, family: int, attrs: bytes) -> bytes:
    body = NFGENMSG.pack(family, NFNETLINK_V0, 0) + attrs
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | kind,
                         NLM_F_REQUEST | flags, sequence, 0) + body


def dump_request(sequence: int, family: int, zone: int | None = None,
                 protocol: int | None = None, port: int | None = None) -> bytes:
    """IPCTNL_MSG_CT_GET dump of `family` (AF_INET, AF_INET6; 0 = both), filtered to one zone,
    one original-direction protocol and that protocol's one original-direction destination
    port when given. Kernels honour what they know and ignore the rest silently: the zone
    since Linux 6.8 (not zone 0), the protocol (CTA_FILTER, which needs a real address
    family) since 5.8, and the port of TCP and UDP only (5.8 to 6.18 at least; SCTP,
    DCCP and UDP-Lite entries come back on every port). `kernel.probe_filters` finds out
    which."""
    attrs = b""
    if zone is not None:
        attrs += _attr(CTA_ZONE, struct.pack(">H", zone))
    if protocol is not None:
        flags, proto = CTA_FILTER_F_CTA_PROTO_NUM, _attr(CTA_PROTO_NUM, bytes((protocol,)))
        if port is not None:
            flags |= CTA_FILTER_F_CTA_PROTO_DST_PORT
            proto += _attr(CTA_PROTO_DST_PORT, struct.pack(">H", port))
        attrs += _attr(CTA_FILTER | NLA_F_NESTED, _attr(
            CTA_FILTER_ORIG_FLAGS, struct.pack("=I", flags)))
        attrs += _attr(CTA_TUPLE_ORIG | NLA_F_NESTED,
                       _attr(CTA_TUPLE_PROTO | NLA_F_NESTED, proto))
    return _message(IPCTNL_MSG_CT_GET, NLM_F_DUMP, sequence, family, attrs)


NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x4, 0x200, 0x400
TCP_STATES = {name: number for number, name in enumerate(STATE_NAMES[CTA_PROTOINFO_TCP])}


def _tuple_attr(attr_type: int, protocol: int, src: bytes, dst: bytes, sport: int,
                dport: int, icmp: tuple[int, int, int] | None) -> bytes:
    v4 = len(src) == 4
    ip = _attr(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, src) + \
        _attr(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, dst)
    proto = _attr(CTA_PROTO_NUM, bytes((protocol,)))
    if icmp is not None:
        icmp_id, icmp_type, icmp_code = icmp
        kinds = (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE) if v4 else \
            (CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE)
        proto += _attr(kinds[0], struct.pack(">H", icmp_id)) + \
            _attr(kinds[1], bytes((icmp_type,))) + _attr(kinds[2], bytes((icmp_code,)))
    else:
        proto += _attr(CTA_PROTO_SRC_PORT, struct.pack(">H", sport)) + \
            _attr(CTA_PROTO_DST_PORT, struct.pack(">H", dport))
    return _attr(attr_type | NLA_F_NESTED, _attr(CTA_TUPLE_IP | NLA_F_NESTED, ip) +
                 _attr(CTA_TUPLE_PROTO | NLA_F_NESTED, proto))


def _tuples(protocol: int, src: bytes, dst: bytes, sport: int, dport: int) -> tuple[bytes, bytes]:
    """The original and reply tuple attributes of one entry; for ICMP an echo with id
    `sport`."""
    v4 = len(src) == 4
    orig_icmp = reply_icmp = None
    if protocol in (1, 58):
        orig_icmp = (sport, 8 if v4 else 128, 0)
        reply_icmp = (sport, 0 if v4 else 129, 0)
    return (_tuple_attr(CTA_TUPLE_ORIG, protocol, src, dst, sport, dport, orig_icmp),
            _tuple_attr(CTA_TUPLE_REPLY, protocol, dst, src, dport, sport, reply_icmp))


def _zone_attr(zone: int) -> bytes:
    return _attr(CTA_ZONE, struct.pack(">H", zone)) if zone else b""  # zone 0: no attribute


def new_request(sequence: int, protocol: int, src: bytes, dst: bytes, sport: int, dport: int,
                *, zone: int = 0, timeout: int = 600, tcp_state: str = "ESTABLISHED",
                mark: int = 0) -> bytes:
    """IPCTNL_MSG_CT_NEW creating one entry and its reply tuple; for ICMP an echo with id
    `sport`. How tests and benchmarks fill conntrack fast, many messages per send
    (`conntrack -I` manages ~800/s), and how the filter probe makes its entry."""
    orig, reply = _tuples(protocol, src, dst, sport, dport)
    attrs = orig + reply + _attr(CTA_TIMEOUT, struct.pack(">I", timeout)) + _zone_attr(zone)
    if mark:
        attrs += _attr(CTA_MARK, struct.pack(">I", mark))
    if protocol == 6:
        attrs += _attr(CTA_PROTOINFO | NLA_F_NESTED, _attr(
            CTA_PROTOINFO_TCP | NLA_F_NESTED,
            _attr(CTA_PROTOINFO_STATE, bytes((TCP_STATES[tcp_state],)))))
    family = socket.AF_INET if len(src) == 4 else socket.AF_INET6
    return _message(IPCTNL_MSG_CT_NEW, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK, sequence, family,
                    attrs)


def delete_request(sequence: int, protocol: int, src: bytes, dst: bytes, sport: int,
                   dport: int, *, zone: int = 0) -> bytes:
    """IPCTNL_MSG_CT_DELETE of the entry `new_request` made with the same arguments. Always
    by its tuple: a delete without one flushes the whole table."""
    family = socket.AF_INET if len(src) == 4 else socket.AF_INET6
    return _message(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, sequence, family,
                    _tuples(protocol, src, dst, sport, dport)[0] + _zone_attr(zone))


_LENGTH_TYPE = struct.Struct("=IH").unpack_from
_CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW


def parse_dump(data: bytes, connections: list[Connection]) -> bool:
    """Append the connections in one receive buffer (one or more netlink messages) to
    `connections`. Returns True when the dump is complete (NLMSG_DONE)."""
    starts, lengths, done = _entries(data)
    layouts, append, from_bytes = _LAYOUTS, connections.append, int.from_bytes
    new, ended_states = tuple.__new__, ENDED_STATES
    for pos, length in zip(starts, lengths):
        start = pos + NLMSGHDR.size + NFGENMSG.size
        # the fast path (see _learn), inlined: this loop runs once per connection
        for (mask, expected, unpack, arguments, names, state_at, status_at, pack_key,
             key_values, _, _, _, _, _) in layouts.get(length, ()):
            if from_bytes(data[start:pos + length], "big") & mask == expected:
                values = unpack(data, start)
                state = names[values[state_at]] if names is not None else ""
                append(new(Connection, arguments(values + (
                    state, state in ended_states or values[status_at] & IPS_DYING != 0,
                    pack_key(*key_values(values)), 0, b"", True))))
                break
        else:
            append(_walk(data, pos, start, length))
    return done


def _entries(data: bytes) -> tuple[list[int], list[int], bool]:
    """Where the conntrack entries' messages in one receive buffer start, their lengths,
    and whether the dump is complete (NLMSG_DONE); an error reply raises NetlinkError."""
    starts: list[int] = []
    lengths: list[int] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < NLMSGHDR.size:
            _bad_header(pos, 0, end)
        length, message_type = _LENGTH_TYPE(data, pos)
        if length < NLMSGHDR.size or pos + length > end:
            _bad_header(pos, length, end)
        if message_type == _CT_NEW:
            starts.append(pos)
            lengths.append(length)
        elif _control(data, pos, length, message_type):
            return starts, lengths, True
        pos += (length + 3) & ~3
    return starts, lengths, False


def count_dump(data: bytes, counts: dict[tuple[int, ...], int], marks: bool = False) -> bool:
    """`parse_dump` for a count: add one receive buffer's entries to `counts` by (zone,
    protocol, destination port), what the filter needs, and with `marks` the mark too,
    without building a Connection each. Returns True when the dump is complete. (The
    message walk is `_entries`', repeated rather than shared: the count is timed against
    `conntrack -L`, and a walk before the count costs each entry another loop turn.)"""
    pos, end = 0, len(data)
    layouts, from_bytes, get = _LAYOUTS, int.from_bytes, counts.get
    while pos < end:
        if end - pos < NLMSGHDR.size:
            _bad_header(pos, 0, end)
        length, message_type = _LENGTH_TYPE(data, pos)
        if length < NLMSGHDR.size or pos + length > end:
            _bad_header(pos, length, end)
        if message_type == _CT_NEW:
            start = pos + NLMSGHDR.size + NFGENMSG.size
            for layout in layouts.get(length, ()):
                if from_bytes(data[start:pos + length], "big") & layout[0] == layout[1]:
                    zone_at, port_at = start + layout[9], start + layout[12]
                    found = (data[zone_at] << 8 | data[zone_at + 1] if zone_at > start else 0,
                             data[start + layout[10]],
                             data[port_at] << 8 | data[port_at + 1] if port_at > start else 0)
                    if marks:
                        mark_at = start + layout[13]
                        found += (from_bytes(data[mark_at:mark_at + 4], "big")
                                  if mark_at > start else 0,)
                    break
            else:
                connection = _walk(data, pos, start, length)
                found = connection.zone, connection.protocol, connection.destination_port
                if marks:
                    found += (connection.mark,)
            counts[found] = get(found, 0) + 1
        elif _control(data, pos, length, message_type):
            return True
        pos += (length + 3) & ~3
    return False


def _bad_header(pos: int, length: int, end: int) -> NoReturn:
    if end - pos < NLMSGHDR.size:
        raise CtnetlinkError(f"{end - pos} bytes at offset {pos} are too short for a "
                             "netlink header")
    raise CtnetlinkError(f"netlink message at offset {pos} claims {length} bytes, "
                         f"{end - pos} are left")


def _walk(data: bytes, pos: int, start: int, length: int) -> Connection:
    """The conntrack message at `pos` decoded by the attribute walk, and learned."""
    try:
        connection = _connection(data, start, pos + length)
    except (IndexError, struct.error):
        raise CtnetlinkError(f"conntrack message at offset {pos} is truncated") from None
    _learn(data, start, pos + length)
    return connection


def _control(data: bytes, pos: int, length: int, message_type: int) -> bool:
    """A message other than an entry: True for the end of the dump; an error reply
    raises NetlinkError; anything else is skipped."""
    if message_type == NLMSG_DONE:
        return True
    if message_type == NLMSG_ERROR:
        if length < NLMSGHDR.size + 4:
            raise CtnetlinkError(f"NLMSG_ERROR at offset {pos} has {length} bytes: too "
                                 "short for its errno")
        error = -struct.unpack_from("=i", data, pos + NLMSGHDR.size)[0]
        if error:
            raise NetlinkError(error, f"conntrack dump refused by the kernel: "
                               f"{os.strerror(error)}")
    return False


def _bad(pos: int, length: int, end: int) -> None:
    raise CtnetlinkError(f"attribute at offset {pos} has length {length}: too short for its "
                         f"type, or longer than the {end - pos} bytes left")


def _connection(data: bytes, pos: int, end: int) -> Connection:
    orig = reply = None
    status = mark = zone = timeout = conn_id = 0
    packets = octets = reply_packets = reply_octets = start_ns = 0
    labels = b""
    state = ""
    while pos < end:
        length, attr_type = _unpack_attr(data, pos)
        if length < NLATTR.size or pos + length > end:
            _bad(pos, length, end)
        attr_type &= NLA_TYPE_MASK
        if length < 8 and attr_type in _FIXED_SIZE:
            _bad(pos, length, end)
        if attr_type == CTA_TUPLE_ORIG:
            orig = _tuple(data, pos + 4, pos + length)
        elif attr_type == CTA_TUPLE_REPLY:
            reply = _tuple(data, pos + 4, pos + length)
        elif attr_type == CTA_STATUS:
            status = _BE32(data, pos + 4)[0]
        elif attr_type == CTA_COUNTERS_ORIG:
            packets, octets = _counters(data, pos + 4, pos + length)
        elif attr_type == CTA_COUNTERS_REPLY:
            reply_packets, reply_octets = _counters(data, pos + 4, pos + length)
        elif attr_type == CTA_PROTOINFO:
            state = _state(data, pos + 4, pos + length)
        elif attr_type == CTA_ID:
            conn_id = _BE32(data, pos + 4)[0]
        elif attr_type == CTA_TIMEOUT:
            timeout = _BE32(data, pos + 4)[0]
        elif attr_type == CTA_MARK:
            mark = _BE32(data, pos + 4)[0]
        elif attr_type == CTA_ZONE:
            zone = (data[pos + 4] << 8) | data[pos + 5]
        elif attr_type == CTA_TIMESTAMP:
            start_ns = _timestamp(data, pos + 4, pos + length)
        elif attr_type == CTA_LABELS:
            labels = data[pos + 4:pos + length]
        pos += (length + 3) & ~3
    if orig is None:
        raise CtnetlinkError("conntrack entry without an original tuple")
    protocol, src, dst, sport, dport, icmp_id, icmp_type, icmp_code = orig
    if len(src) not in (4, 16) or len(dst) != len(src):
        raise CtnetlinkError(f"conntrack entry with addresses of {len(src)} and {len(dst)} "
                             "bytes in its original tuple")
    if reply is None:
        reply = (protocol, b"", b"", 0, 0, 0, 0, 0)
    return Connection(protocol, src, dst, sport, dport, reply[1], reply[2], reply[3],
                      reply[4], icmp_type, icmp_code, icmp_id, zone, mark, labels, status,
                      state, packets, octets, reply_packets, reply_octets, True, start_ns,
                      conn_id, timeout, bool(status & IPS_DYING) or state in ENDED_STATES,
                      identity(protocol, src, dst, sport, dport, icmp_id, icmp_type, icmp_code,
                               zone, start_ns))


def _tuple(data: bytes, pos: int, end: int) -> tuple:
    src = dst = b""
    protocol = sport = dport = icmp_id = icmp_type = icmp_code = 0
    while pos < end:
        length, attr_type = _unpack_attr(data, pos)
        if length < NLATTR.size or pos + length > end:
            _bad(pos, length, end)
        attr_type &= NLA_TYPE_MASK
        stop = pos + length
        if attr_type == CTA_TUPLE_IP:
            inner = pos + 4
            while inner < stop:
                size, kind = _unpack_attr(data, inner)
                if size < NLATTR.size or inner + size > stop:
                    _bad(inner, size, stop)
                kind &= NLA_TYPE_MASK
                if kind == CTA_IP_V4_SRC or kind == CTA_IP_V6_SRC:
                    src = data[inner + 4:inner + size]
                elif kind == CTA_IP_V4_DST or kind == CTA_IP_V6_DST:
                    dst = data[inner + 4:inner + size]
                inner += (size + 3) & ~3
        elif attr_type == CTA_TUPLE_PROTO:
            inner = pos + 4
            while inner < stop:
                size, kind = _unpack_attr(data, inner)
                if size < NLATTR.size + 1 or inner + size > stop:
                    _bad(inner, size, stop)
                kind &= NLA_TYPE_MASK
                value = inner + 4
                if kind == CTA_PROTO_NUM:
                    protocol = data[value]
                elif kind == CTA_PROTO_SRC_PORT:
                    sport = (data[value] << 8) | data[value + 1]
                elif kind == CTA_PROTO_DST_PORT:
                    dport = (data[value] << 8) | data[value + 1]
                elif kind == CTA_PROTO_ICMP_ID or kind == CTA_PROTO_ICMPV6_ID:
                    icmp_id = (data[value] << 8) | data[value + 1]
                elif kind == CTA_PROTO_ICMP_TYPE or kind == CTA_PROTO_ICMPV6_TYPE:
                    icmp_type = data[value]
                elif kind == CTA_PROTO_ICMP_CODE or kind == CTA_PROTO_ICMPV6_CODE:
                    icmp_code = data[value]
                inner += (size + 3) & ~3
        pos += (length + 3) & ~3
    return protocol, src, dst, sport, dport, icmp_id, icmp_type, icmp_code


def _counters(data: bytes, pos: int, end: int) -> tuple[int, int]:
    packets = octets = 0
    while pos < end:
        length, attr_type = _unpack_attr(data, pos)
        if length < NLATTR.size or pos + length > end:
            _bad(pos, length, end)
        attr_type &= NLA_TYPE_MASK
        if attr_type == CTA_COUNTERS_PACKETS or attr_type == CTA_COUNTERS_BYTES:
            if length < NLATTR.size + 8:
                _bad(pos, length, end)
            if attr_type == CTA_COUNTERS_PACKETS:
                packets = _BE64(data, pos + 4)[0]
            else:
                octets = _BE64(data, pos + 4)[0]
        pos += (length + 3) & ~3  # CTA_COUNTERS_PAD and the 32-bit forms: skipped
    return packets, octets


def _timestamp(data: bytes, pos: int, end: int) -> int:
    while pos < end:
        length, attr_type = _unpack_attr(data, pos)
        if length < NLATTR.size or pos + length > end:
            _bad(pos, length, end)
        if attr_type & NLA_TYPE_MASK == CTA_TIMESTAMP_START:
            if length < NLATTR.size + 8:
                _bad(pos, length, end)
            return _BE64(data, pos + 4)[0]
        pos += (length + 3) & ~3  # CTA_TIMESTAMP_PAD: skipped
    return 0


def _state(data: bytes, pos: int, end: int) -> str:
    """The state in CTA_PROTOINFO: the first attribute of its TCP, SCTP or DCCP nest."""
    while pos < end:
        length, attr_type = _unpack_attr(data, pos)
        if length < NLATTR.size or pos + length > end:
            _bad(pos, length, end)
        names = STATE_NAMES.get(attr_type & NLA_TYPE_MASK)
        if names is not None and length >= 2 * NLATTR.size + 1:
            inner_length, inner_type = _unpack_attr(data, pos + 4)
            if inner_type & NLA_TYPE_MASK == CTA_PROTOINFO_STATE and inner_length >= 5 \
                    and pos + 4 + inner_length <= end:
                number = data[pos + 8]
                return names[number] if number < len(names) else str(number)
        pos += (length + 3) & ~3
    return ""


# --- the fast path
#
# Entries of one kind (say IPv4 UDP in a zone, with counters and a timestamp) come as
# messages with the same attributes at the same offsets. The first such message is decoded
# by the walk above, and described as a layout: the attribute headers it must find (checked
# at once, as a masked big integer), one struct.Struct for the values, and where each
# Connection field sits. Later messages of that length whose headers all match are decoded
# with one comparison and one unpack.

# Appended to the unpacked values, by index: what the fast path computes per message, then
# the defaults of fields a layout does not read (0, no labels b"", counted True).
_COMPUTED = ("state", "ended", "key")
_DEFAULT_AT = {"labels": 1, "counted": 2}  # else 0
_MAX_LAYOUTS_PER_LENGTH = 4
# message length -> layouts: (header mask, expected headers, unpack of the values, Connection
# arguments getter, state names by number or None, where in the values the state number and
# the status are, the key's packer and the getter of its values, offsets of the zone (0: none)
# and of the protocol in the message, the headers and leaves found, for `columns.py`, and
# the offsets of the original destination port and of the mark (0: none), for `count_dump`)
_LAYOUTS: dict[int, list[tuple]] = {}


def _numbered(names: tuple[str, ...]) -> tuple[str, ...]:
    """State names for every value of the state's byte, as the walk names them."""
    return names + tuple(str(number) for number in range(len(names), 256))


def _learn(data: bytes, start: int, end: int) -> None:
    """Describe the message the walk just decoded as a layout for its length. Mirrors
    `_connection` attribute for attribute; the tests check both give the same result."""
    headers: list[tuple[int, int]] = []  # (offset, the header as a big-endian u32)
    leaves: list[tuple[int, str, str]] = []  # (offset, struct code, Connection field)
    state_names: list[tuple[str, ...]] = []

    def header(pos: int) -> tuple[int, int, int]:
        length, attr_type = _unpack_attr(data, pos)
        headers.append((pos - start, _BE32(data, pos)[0]))
        return length, attr_type & NLA_TYPE_MASK, pos + length

    def leaf(pos: int, code: str, name: str) -> None:
        leaves.append((pos - start, code, name))

    def children(pos: int, stop: int):
        while pos < stop:
            length, attr_type, child_end = header(pos)
            yield pos, length, attr_type, child_end
            pos += (length + 3) & ~3

    def tuple_(pos: int, stop: int, reply: bool) -> None:
        prefix = "reply_" if reply else ""
        for at, length, kind, child_end in children(pos, stop):
            if kind == CTA_TUPLE_IP:
                for inner, size, ip_kind, _ in children(at + 4, child_end):
                    if ip_kind in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                        leaf(inner + 4, f"{size - 4}s", prefix + "source")
                    elif ip_kind in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                        leaf(inner + 4, f"{size - 4}s", prefix + "destination")
            elif kind == CTA_TUPLE_PROTO:
                for inner, _, proto_kind, _ in children(at + 4, child_end):
                    if proto_kind == CTA_PROTO_SRC_PORT:
                        leaf(inner + 4, "H", prefix + "source_port")
                    elif proto_kind == CTA_PROTO_DST_PORT:
                        leaf(inner + 4, "H", prefix + "destination_port")
                    elif reply:
                        continue  # the generic walk reads the rest from the original only
                    elif proto_kind == CTA_PROTO_NUM:
                        leaf(inner + 4, "B", "protocol")
                    elif proto_kind in (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID):
                        leaf(inner + 4, "H", "icmp_id")
                    elif proto_kind in (CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE):
                        leaf(inner + 4, "B", "icmp_type")
                    elif proto_kind in (CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMPV6_CODE):
                        leaf(inner + 4, "B", "icmp_code")

    scalars = {CTA_STATUS: ("I", "status"), CTA_ID: ("I", "id"), CTA_TIMEOUT: ("I", "timeout"),
               CTA_MARK: ("I", "mark"), CTA_ZONE: ("H", "zone")}
    for pos, length, kind, attr_end in children(start, end):
        if kind in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
            tuple_(pos + 4, attr_end, kind == CTA_TUPLE_REPLY)
        elif kind in scalars:
            leaf(pos + 4, *scalars[kind])
        elif kind in (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY):
            prefix = "reply_" if kind == CTA_COUNTERS_REPLY else ""
            for inner, _, counter, _ in children(pos + 4, attr_end):
                if counter == CTA_COUNTERS_PACKETS:
                    leaf(inner + 4, "Q", prefix + "packets")
                elif counter == CTA_COUNTERS_BYTES:
                    leaf(inner + 4, "Q", prefix + "octets")
        elif kind == CTA_TIMESTAMP:
            for inner, _, stamp, _ in children(pos + 4, attr_end):
                if stamp == CTA_TIMESTAMP_START:
                    leaf(inner + 4, "Q", "start_ns")
                    break
        elif kind == CTA_PROTOINFO:
            for inner, size, nest, nest_end in children(pos + 4, attr_end):
                names = STATE_NAMES.get(nest)
                if names is not None and size >= 2 * NLATTR.size + 1:
                    _, state_kind, _ = header(inner + 4)
                    if state_kind == CTA_PROTOINFO_STATE:
                        leaf(inner + 8, "B", "state")
                        state_names.append(names)
                        break
        elif kind == CTA_LABELS:
            leaf(pos + 4, f"{length - 4}s", "labels")

    # The headers, checked in one masked comparison of the message as a big integer.
    size = end - start
    mask, expected = bytearray(size), bytearray(size)
    for offset, value in headers:
        mask[offset:offset + 4] = b"\xff" * 4
        expected[offset:offset + 4] = value.to_bytes(4, "big")
    # The leaves, read with one unpack.
    codes, fields, at = [">"], {}, 0
    for index, (offset, code, name) in enumerate(sorted(leaves)):
        if offset < at:
            return  # overlapping reads: a message too odd to learn; the walk handles it
        codes.append(f"{offset - at}x" if offset > at else "")
        codes.append(code)
        at = offset + struct.calcsize(">" + code)
        fields[name] = index
    if at > size:
        return
    if "status" not in fields or "protocol" not in fields:
        return  # not what a kernel sends: the walk handles it
    computed = {name: len(leaves) + index for index, name in enumerate(_COMPUTED)}
    defaults = len(leaves) + len(_COMPUTED)  # (0, b"", True), appended by parse_dump
    field_indexes = [computed[name] if name in computed else fields[name] if name in fields
                     else defaults + _DEFAULT_AT.get(name, 0) for name in Connection._fields]
    offsets = {name: offset for offset, _, name in leaves}
    # Connection.key (`identity`) packed from the values: a field the message lacks (no
    # zone, no ICMP id) is zero, as `identity` packs it from the walk's Connection.
    codes_by_name = {name: code for _, code, name in leaves}
    if "source" not in fields or codes_by_name["source"] != codes_by_name.get("destination"):
        return
    key_codes, key_fields = [">"], []
    for name, code in [*IDENTITY_FIELDS, ("source", codes_by_name["source"]),
                       ("destination", codes_by_name["source"])]:
        if name in fields:
            key_codes.append(code)
            key_fields.append(fields[name])
        else:
            key_codes.append(f"{struct.calcsize('>' + code)}x")
    layout = (int.from_bytes(mask, "big"), int.from_bytes(expected, "big"),
              struct.Struct("".join(codes)).unpack_from, operator.itemgetter(*field_indexes),
              _numbered(state_names[0]) if state_names else None, fields.get("state"),
              fields["status"], struct.Struct("".join(key_codes)).pack,
              operator.itemgetter(*key_fields), offsets.get("zone", 0), offsets["protocol"],
              (tuple(headers), tuple(leaves)), offsets.get("destination_port", 0),
              offsets.get("mark", 0))
    known = _LAYOUTS.setdefault(end - start + NLMSGHDR.size + NFGENMSG.size, [])
    known.insert(0, layout)
    del known[_MAX_LAYOUTS_PER_LENGTH:]
