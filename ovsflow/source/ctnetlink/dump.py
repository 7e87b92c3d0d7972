"""A dump reply's receive buffers: its entries found, each decoded by a learned layout (one
comparison, one unpack) or else by the attribute walk; or only counted."""

from __future__ import annotations

import os
import struct
from typing import NoReturn

from ...connection import ENDED_STATES, Connection
from .layouts import LAYOUTS
from .walk import walk
from .wire import (
    IPCTNL_MSG_CT_NEW, IPS_DYING, NFGENMSG, NFNL_SUBSYS_CTNETLINK, NLMSG_DONE, NLMSG_ERROR,
    NLMSGHDR, CtnetlinkError, NetlinkError,
)

LENGTH_TYPE = struct.Struct("=IH").unpack_from
CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW


def parse_dump(data: bytes, connections: list[Connection]) -> bool:
    """Append the connections in one receive buffer (one or more netlink messages) to
    `connections`. Returns True when the dump is complete (NLMSG_DONE)."""
    starts, lengths, done = entries(data)
    layouts, append, from_bytes = LAYOUTS, connections.append, int.from_bytes
    new, ended_states = tuple.__new__, ENDED_STATES
    for pos, length in zip(starts, lengths):
        start = pos + NLMSGHDR.size + NFGENMSG.size
        # the fast path (see learn), inlined: this loop runs once per connection
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
            append(walk(data, pos, start, length))
    return done


def entries(data: bytes) -> tuple[list[int], list[int], bool]:
    """Where the conntrack entries' messages in one receive buffer start, their lengths,
    and whether the dump is complete (NLMSG_DONE); an error reply raises NetlinkError."""
    starts: list[int] = []
    lengths: list[int] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < NLMSGHDR.size:
            _bad_header(pos, 0, end)
        length, message_type = LENGTH_TYPE(data, pos)
        if length < NLMSGHDR.size or pos + length > end:
            _bad_header(pos, length, end)
        if message_type == CT_NEW:
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
    message walk is `entries`', repeated rather than shared: the count is timed against
    `conntrack -L`, and a walk before the count costs each entry another loop turn.)"""
    pos, end = 0, len(data)
    layouts, from_bytes, get = LAYOUTS, int.from_bytes, counts.get
    while pos < end:
        if end - pos < NLMSGHDR.size:
            _bad_header(pos, 0, end)
        length, message_type = LENGTH_TYPE(data, pos)
        if length < NLMSGHDR.size or pos + length > end:
            _bad_header(pos, length, end)
        if message_type == CT_NEW:
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
                connection = walk(data, pos, start, length)
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
