"""ctnetlink requests as bytes: a (filtered) dump, and an entry created or deleted (how tests,
benchmarks and the filter probe fill conntrack fast)."""

from __future__ import annotations

import socket
import struct

from .wire import (
    CTA_FILTER, CTA_FILTER_F_CTA_PROTO_DST_PORT, CTA_FILTER_F_CTA_PROTO_NUM,
    CTA_FILTER_ORIG_FLAGS, CTA_IP_V4_DST, CTA_IP_V4_SRC, CTA_IP_V6_DST, CTA_IP_V6_SRC, CTA_MARK,
    CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE,
    CTA_PROTO_ICMPV6_CODE, CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT, CTA_PROTOINFO, CTA_PROTOINFO_STATE, CTA_PROTOINFO_TCP, CTA_TIMEOUT,
    CTA_TUPLE_IP, CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_TUPLE_REPLY, CTA_ZONE,
    IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_NEW, NFGENMSG, NFNETLINK_V0,
    NFNL_SUBSYS_CTNETLINK, NLA_F_NESTED, NLATTR, NLM_F_DUMP, NLM_F_REQUEST, NLMSGHDR,
    STATE_NAMES,
)


def attribute(attr_type: int, payload: bytes) -> bytes:
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
    DCCP and UDP-Lite entries come back on every port). `kernel_filters.probe_filters` finds out
    which."""
    attrs = b""
    if zone is not None:
        attrs += attribute(CTA_ZONE, struct.pack(">H", zone))
    if protocol is not None:
        flags, proto = CTA_FILTER_F_CTA_PROTO_NUM, attribute(CTA_PROTO_NUM, bytes((protocol,)))
        if port is not None:
            flags |= CTA_FILTER_F_CTA_PROTO_DST_PORT
            proto += attribute(CTA_PROTO_DST_PORT, struct.pack(">H", port))
        attrs += attribute(CTA_FILTER | NLA_F_NESTED, attribute(
            CTA_FILTER_ORIG_FLAGS, struct.pack("=I", flags)))
        attrs += attribute(CTA_TUPLE_ORIG | NLA_F_NESTED,
                           attribute(CTA_TUPLE_PROTO | NLA_F_NESTED, proto))
    return _message(IPCTNL_MSG_CT_GET, NLM_F_DUMP, sequence, family, attrs)


NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x4, 0x200, 0x400
TCP_STATES = {name: number for number, name in enumerate(STATE_NAMES[CTA_PROTOINFO_TCP])}


def _tuple_attr(attr_type: int, protocol: int, src: bytes, dst: bytes, sport: int,
                dport: int, icmp: tuple[int, int, int] | None) -> bytes:
    v4 = len(src) == 4
    ip = attribute(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, src) + \
        attribute(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, dst)
    proto = attribute(CTA_PROTO_NUM, bytes((protocol,)))
    if icmp is not None:
        icmp_id, icmp_type, icmp_code = icmp
        kinds = (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE) if v4 else \
            (CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE)
        proto += attribute(kinds[0], struct.pack(">H", icmp_id)) + \
            attribute(kinds[1], bytes((icmp_type,))) + attribute(kinds[2], bytes((icmp_code,)))
    else:
        proto += attribute(CTA_PROTO_SRC_PORT, struct.pack(">H", sport)) + \
            attribute(CTA_PROTO_DST_PORT, struct.pack(">H", dport))
    return attribute(attr_type | NLA_F_NESTED, attribute(CTA_TUPLE_IP | NLA_F_NESTED, ip) +
                     attribute(CTA_TUPLE_PROTO | NLA_F_NESTED, proto))


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
    return attribute(CTA_ZONE, struct.pack(">H", zone)) if zone else b""  # zone 0: no attribute


def new_request(sequence: int, protocol: int, src: bytes, dst: bytes, sport: int, dport: int,
                *, zone: int = 0, timeout: int = 600, tcp_state: str = "ESTABLISHED",
                mark: int = 0) -> bytes:
    """IPCTNL_MSG_CT_NEW creating one entry and its reply tuple; for ICMP an echo with id
    `sport`. How tests and benchmarks fill conntrack fast, many messages per send
    (`conntrack -I` manages ~800/s), and how the filter probe makes its entry."""
    orig, reply = _tuples(protocol, src, dst, sport, dport)
    attrs = orig + reply + attribute(CTA_TIMEOUT, struct.pack(">I", timeout)) + _zone_attr(zone)
    if mark:
        attrs += attribute(CTA_MARK, struct.pack(">I", mark))
    if protocol == 6:
        attrs += attribute(CTA_PROTOINFO | NLA_F_NESTED, attribute(
            CTA_PROTOINFO_TCP | NLA_F_NESTED,
            attribute(CTA_PROTOINFO_STATE, bytes((TCP_STATES[tcp_state],)))))
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
