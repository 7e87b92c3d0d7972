"""The attribute walk: one conntrack message decoded attribute by attribute, whatever its
layout, and then learned as a layout (`layouts.learn`) for the messages like it."""

from __future__ import annotations

import struct

from ...connection import ENDED_STATES, Connection, identity
from .layouts import learn
from .wire import (
    BE32, BE64, CTA_COUNTERS_BYTES, CTA_COUNTERS_ORIG, CTA_COUNTERS_PACKETS,
    CTA_COUNTERS_REPLY, CTA_ID, CTA_IP_V4_DST, CTA_IP_V4_SRC, CTA_IP_V6_DST, CTA_IP_V6_SRC,
    CTA_LABELS, CTA_MARK, CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMP_ID,
    CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_CODE, CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE,
    CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTOINFO, CTA_PROTOINFO_STATE, CTA_STATUS,
    CTA_TIMEOUT, CTA_TIMESTAMP, CTA_TIMESTAMP_START, CTA_TUPLE_IP, CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO, CTA_TUPLE_REPLY, CTA_ZONE, FIXED_SIZE, IPS_DYING, NLA_TYPE_MASK, NLATTR,
    STATE_NAMES, CtnetlinkError, unpack_attr,
)


def walk(data: bytes, pos: int, start: int, length: int) -> Connection:
    """The conntrack message at `pos` decoded by the attribute walk, and learned."""
    try:
        connection = _connection(data, start, pos + length)
    except (IndexError, struct.error):
        raise CtnetlinkError(f"conntrack message at offset {pos} is truncated") from None
    learn(data, start, pos + length)
    return connection


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
        length, attr_type = unpack_attr(data, pos)
        if length < NLATTR.size or pos + length > end:
            _bad(pos, length, end)
        attr_type &= NLA_TYPE_MASK
        if length < 8 and attr_type in FIXED_SIZE:
            _bad(pos, length, end)
        if attr_type == CTA_TUPLE_ORIG:
            orig = _tuple(data, pos + 4, pos + length)
        elif attr_type == CTA_TUPLE_REPLY:
            reply = _tuple(data, pos + 4, pos + length)
        elif attr_type == CTA_STATUS:
            status = BE32(data, pos + 4)[0]
        elif attr_type == CTA_COUNTERS_ORIG:
            packets, octets = _counters(data, pos + 4, pos + length)
        elif attr_type == CTA_COUNTERS_REPLY:
            reply_packets, reply_octets = _counters(data, pos + 4, pos + length)
        elif attr_type == CTA_PROTOINFO:
            state = _state(data, pos + 4, pos + length)
        elif attr_type == CTA_ID:
            conn_id = BE32(data, pos + 4)[0]
        elif attr_type == CTA_TIMEOUT:
            timeout = BE32(data, pos + 4)[0]
        elif attr_type == CTA_MARK:
            mark = BE32(data, pos + 4)[0]
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
        length, attr_type = unpack_attr(data, pos)
        if length < NLATTR.size or pos + length > end:
            _bad(pos, length, end)
        attr_type &= NLA_TYPE_MASK
        stop = pos + length
        if attr_type == CTA_TUPLE_IP:
            inner = pos + 4
            while inner < stop:
                size, kind = unpack_attr(data, inner)
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
                size, kind = unpack_attr(data, inner)
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
        length, attr_type = unpack_attr(data, pos)
        if length < NLATTR.size or pos + length > end:
            _bad(pos, length, end)
        attr_type &= NLA_TYPE_MASK
        if attr_type == CTA_COUNTERS_PACKETS or attr_type == CTA_COUNTERS_BYTES:
            if length < NLATTR.size + 8:
                _bad(pos, length, end)
            if attr_type == CTA_COUNTERS_PACKETS:
                packets = BE64(data, pos + 4)[0]
            else:
                octets = BE64(data, pos + 4)[0]
        pos += (length + 3) & ~3  # CTA_COUNTERS_PAD and the 32-bit forms: skipped
    return packets, octets


def _timestamp(data: bytes, pos: int, end: int) -> int:
    while pos < end:
        length, attr_type = unpack_attr(data, pos)
        if length < NLATTR.size or pos + length > end:
            _bad(pos, length, end)
        if attr_type & NLA_TYPE_MASK == CTA_TIMESTAMP_START:
            if length < NLATTR.size + 8:
                _bad(pos, length, end)
            return BE64(data, pos + 4)[0]
        pos += (length + 3) & ~3  # CTA_TIMESTAMP_PAD: skipped
    return 0


def _state(data: bytes, pos: int, end: int) -> str:
    """The state in CTA_PROTOINFO: the first attribute of its TCP, SCTP or DCCP nest."""
    while pos < end:
        length, attr_type = unpack_attr(data, pos)
        if length < NLATTR.size or pos + length > end:
            _bad(pos, length, end)
        names = STATE_NAMES.get(attr_type & NLA_TYPE_MASK)
        if names is not None and length >= 2 * NLATTR.size + 1:
            inner_length, inner_type = unpack_attr(data, pos + 4)
            if inner_type & NLA_TYPE_MASK == CTA_PROTOINFO_STATE and inner_length >= 5 \
                    and pos + 4 + inner_length <= end:
                number = data[pos + 8]
                return names[number] if number < len(names) else str(number)
        pos += (length + 3) & ~3
    return ""
