"""ctnetlink's numbers and framing, from the kernel's uapi headers
(include/uapi/linux/netfilter/nfnetlink_conntrack.h, netlink.h)."""

from __future__ import annotations

import struct

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

FIXED_SIZE = frozenset({CTA_STATUS, CTA_ID, CTA_TIMEOUT, CTA_MARK})  # 4-byte values

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
unpack_attr = NLATTR.unpack_from
BE32 = struct.Struct(">I").unpack_from
BE64 = struct.Struct(">Q").unpack_from


class CtnetlinkError(ValueError):
    """A malformed dump message; the text says where."""


class NetlinkError(OSError):
    """The kernel answered the request with an error (errno)."""


RECEIVE_SIZE = 1 << 16  # the kernel fills dump buffers up to the largest size we receive
