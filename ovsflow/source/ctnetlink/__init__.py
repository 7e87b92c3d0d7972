"""ctnetlink (nf_conntrack over netfilter netlink) without I/O: dump requests to bytes,
dump replies from bytes to `Connection` objects (or only counted by zone and protocol).

This is the poll's hot path, so it is a compact hand-written decoder: pyroute2's generic
netlink parser managed ~2-3k entries/s here (25x slower than `conntrack -L`); walking the
attributes with struct and bytes indexing, and keeping only the fields ovsflow exports, is
an order of magnitude faster. pyroute2 still serves where speed does not matter (the feature
probe in `kernel.py`, and as an independent reference decoder in the tests).

The rooms: `wire` (the kernel's numbers), `requests`, `dump` (a reply's buffers), `walk`
(one message, attribute by attribute), `layouts` (what the walk learned, for the fast path)
and `columns` (a whole buffer into numpy columns, for the kernel poll).
"""

from .dump import count_dump, parse_dump
from .requests import TCP_STATES, delete_request, dump_request, new_request
from .wire import (
    NETLINK_NETFILTER, NLMSG_DONE, NLMSG_ERROR, NLMSGHDR, STATE_NAMES, CtnetlinkError, NetlinkError,
)

__all__ = [
    "NETLINK_NETFILTER", "NLMSGHDR", "NLMSG_DONE", "NLMSG_ERROR", "STATE_NAMES", "TCP_STATES",
    "CtnetlinkError", "NetlinkError", "count_dump", "delete_request", "dump_request",
    "new_request", "parse_dump",
]
