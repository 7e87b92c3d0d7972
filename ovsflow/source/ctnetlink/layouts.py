"""The fast path's layouts: a message the walk decoded, described so that later messages of
its kind are decoded with one comparison and one unpack."""

from __future__ import annotations

import operator
import struct

from ...connection import IDENTITY_FIELDS, Connection
from .wire import (
    BE32, CTA_COUNTERS_BYTES, CTA_COUNTERS_ORIG, CTA_COUNTERS_PACKETS, CTA_COUNTERS_REPLY,
    CTA_ID, CTA_IP_V4_DST, CTA_IP_V4_SRC, CTA_IP_V6_DST, CTA_IP_V6_SRC, CTA_LABELS, CTA_MARK,
    CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE,
    CTA_PROTO_ICMPV6_CODE, CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT, CTA_PROTOINFO, CTA_PROTOINFO_STATE, CTA_STATUS, CTA_TIMEOUT,
    CTA_TIMESTAMP, CTA_TIMESTAMP_START, CTA_TUPLE_IP, CTA_TUPLE_ORIG, CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY, CTA_ZONE, NFGENMSG, NLA_TYPE_MASK, NLATTR, NLMSGHDR, STATE_NAMES,
    unpack_attr,
)

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
# and of the protocol in the message, the headers and leaves found, for `columns`, and
# the offsets of the original destination port and of the mark (0: none), for `count_dump`)
LAYOUTS: dict[int, list[tuple]] = {}


def _numbered(names: tuple[str, ...]) -> tuple[str, ...]:
    """State names for every value of the state's byte, as the walk names them."""
    return names + tuple(str(number) for number in range(len(names), 256))


def learn(data: bytes, start: int, end: int) -> None:
    """Describe the message the walk just decoded as a layout for its length. Mirrors
    `_connection` attribute for attribute; the tests check both give the same result."""
    headers: list[tuple[int, int]] = []  # (offset, the header as a big-endian u32)
    leaves: list[tuple[int, str, str]] = []  # (offset, struct code, Connection field)
    state_names: list[tuple[str, ...]] = []

    def header(pos: int) -> tuple[int, int, int]:
        length, attr_type = unpack_attr(data, pos)
        headers.append((pos - start, BE32(data, pos)[0]))
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
    known = LAYOUTS.setdefault(end - start + NLMSGHDR.size + NFGENMSG.size, [])
    known.insert(0, layout)
    del known[_MAX_LAYOUTS_PER_LENGTH:]
