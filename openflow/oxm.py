"""OXM/NXM match fields (OpenFlow 1.3 §7.2.3, 1.5 §7.2.3, and Open vSwitch's Nicira classes).

A match is a list of `Field`s; each field is (class, field number, value bytes, mask bytes).
The named constructors cover what a controller commonly matches on; decoding keeps unknown
fields (OVS sends many) instead of failing on them.

Registers come in two shapes: over OpenFlow 1.3 Open vSwitch sends 32-bit NXM_NX_REG<n>;
over 1.5 it sends them in pairs as 64-bit OXM_OF_PKT_REG<n/2> (class OFPXMC_PACKET_REGS,
OVS lib/nx-match.c `nx_put_raw`: "if (oxm < OFP15_VERSION) ... MFF_REG0 + i ... else ...
MFF_XREG0 + i"), reg<2k> in the high half, zero halves masked out. `register` reads either.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

OFPXMC_NXM_0, OFPXMC_NXM_1, OFPXMC_OPENFLOW_BASIC = 0x0000, 0x0001, 0x8000
OFPXMC_PACKET_REGS, OFPXMC_EXPERIMENTER = 0x8001, 0xFFFF

# (class, field) -> name, for the fields ovsflow and most controllers read
_NAMES = {
    (OFPXMC_OPENFLOW_BASIC, 0): "in_port", (OFPXMC_OPENFLOW_BASIC, 2): "metadata",
    (OFPXMC_OPENFLOW_BASIC, 3): "eth_dst", (OFPXMC_OPENFLOW_BASIC, 4): "eth_src",
    (OFPXMC_OPENFLOW_BASIC, 5): "eth_type", (OFPXMC_OPENFLOW_BASIC, 10): "ip_proto",
    (OFPXMC_OPENFLOW_BASIC, 11): "ipv4_src", (OFPXMC_OPENFLOW_BASIC, 12): "ipv4_dst",
    (OFPXMC_OPENFLOW_BASIC, 13): "tcp_src", (OFPXMC_OPENFLOW_BASIC, 14): "tcp_dst",
    (OFPXMC_OPENFLOW_BASIC, 15): "udp_src", (OFPXMC_OPENFLOW_BASIC, 16): "udp_dst",
    (OFPXMC_OPENFLOW_BASIC, 17): "sctp_src", (OFPXMC_OPENFLOW_BASIC, 18): "sctp_dst",
    (OFPXMC_OPENFLOW_BASIC, 19): "icmpv4_type", (OFPXMC_OPENFLOW_BASIC, 20): "icmpv4_code",
    (OFPXMC_OPENFLOW_BASIC, 26): "ipv6_src", (OFPXMC_OPENFLOW_BASIC, 27): "ipv6_dst",
    (OFPXMC_OPENFLOW_BASIC, 29): "icmpv6_type", (OFPXMC_OPENFLOW_BASIC, 30): "icmpv6_code",
    **{(OFPXMC_NXM_1, n): f"reg{n}" for n in range(16)},
    **{(OFPXMC_PACKET_REGS, n): f"xreg{n}" for n in range(8)},
    (OFPXMC_NXM_1, 105): "ct_state", (OFPXMC_NXM_1, 106): "ct_zone",
    (OFPXMC_NXM_1, 107): "ct_mark", (OFPXMC_NXM_1, 108): "ct_label",
    (OFPXMC_NXM_1, 119): "ct_nw_proto", (OFPXMC_NXM_1, 120): "ct_nw_src",
    (OFPXMC_NXM_1, 121): "ct_nw_dst", (OFPXMC_NXM_1, 122): "ct_ipv6_src",
    (OFPXMC_NXM_1, 123): "ct_ipv6_dst", (OFPXMC_NXM_1, 124): "ct_tp_src",
    (OFPXMC_NXM_1, 125): "ct_tp_dst",
}
_BY_NAME = {name: key for key, name in _NAMES.items()}


class OxmError(ValueError):
    pass


@dataclass(frozen=True)
class Field:
    oxm_class: int
    field: int
    value: bytes
    mask: bytes | None = None

    @property
    def name(self) -> str:
        return _NAMES.get((self.oxm_class, self.field),
                          f"oxm_{self.oxm_class:#06x}_{self.field}")

    def int(self) -> int:
        return int.from_bytes(self.value, "big")

    def encode(self) -> bytes:
        payload = self.value + (self.mask or b"")
        header = (self.oxm_class << 16) | (self.field << 9) | (bool(self.mask) << 8) | \
            len(payload)
        return struct.pack("!I", header) + payload


def field(name: str, value: int | bytes, mask: int | bytes | None = None,
          width: int | None = None) -> Field:
    """A named field; integers are encoded in `width` bytes (the field's natural width)."""
    oxm_class, number = _BY_NAME[name]
    size = width or _WIDTHS.get(name, 4)
    as_bytes = value if isinstance(value, bytes) else value.to_bytes(size, "big")
    mask_bytes = mask if mask is None or isinstance(mask, bytes) else mask.to_bytes(size, "big")
    return Field(oxm_class, number, as_bytes, mask_bytes)


_WIDTHS = {"in_port": 4, "eth_type": 2, "ip_proto": 1, "ipv4_src": 4, "ipv4_dst": 4,
           "tcp_src": 2, "tcp_dst": 2, "udp_src": 2, "udp_dst": 2, "ipv6_src": 16,
           "ipv6_dst": 16, "ct_zone": 2, "metadata": 8, **{f"xreg{n}": 8 for n in range(8)}}


def register_field(number: int, value: int, mask: int | None = None, *,
                   version: int) -> Field:
    """A match on reg<number> (0-15) as Open vSwitch itself encodes it for `version` (an
    OpenFlow wire version): NXM_NX_REG<n> before 1.5, the half of OXM_OF_PKT_REG<n/2> from
    1.5 on (OVS accepts either in both)."""
    if version < 6:
        return field(f"reg{number}", value, mask)
    shift = 32 if number % 2 == 0 else 0
    return Field(OFPXMC_PACKET_REGS, number // 2, (value << shift).to_bytes(8, "big"),
                 ((0xFFFFFFFF if mask is None else mask) << shift).to_bytes(8, "big"))


def register(fields: list[Field], number: int) -> int:
    """Register `number` (0-15) as the fields carry it, in either shape; 0 when absent (Open
    vSwitch leaves zero registers out of a packet-in) or masked out."""
    for f in fields:
        if f.oxm_class == OFPXMC_NXM_1 and f.field == number and len(f.value) == 4:
            mask = int.from_bytes(f.mask, "big") if f.mask else 0xFFFFFFFF
            return f.int() & mask
        if f.oxm_class == OFPXMC_PACKET_REGS and f.field == number // 2 and len(f.value) == 8:
            mask = int.from_bytes(f.mask, "big") if f.mask else (1 << 64) - 1
            shift = 32 if number % 2 == 0 else 0
            return (f.int() & mask) >> shift & 0xFFFFFFFF
    return 0


def encode_match(fields: list[Field]) -> bytes:
    """ofp_match of type OXM, padded to 8 bytes."""
    body = b"".join(f.encode() for f in fields)
    length = 4 + len(body)
    return struct.pack("!HH", 1, length) + body + b"\0" * (-length % 8)


def decode_fields(data: bytes) -> list[Field]:
    fields, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 4:
            raise OxmError(f"{len(data) - pos} bytes left where an OXM header was expected")
        header = struct.unpack_from("!I", data, pos)[0]
        oxm_class, number = header >> 16, (header >> 9) & 0x7F
        has_mask, length = (header >> 8) & 1, header & 0xFF
        pos += 4
        if pos + length > len(data):
            raise OxmError(f"OXM field {oxm_class:#06x}:{number} claims {length} bytes, "
                           f"{len(data) - pos} left")
        payload = data[pos:pos + length]
        pos += length
        if oxm_class == OFPXMC_EXPERIMENTER:
            payload = payload[4:]  # experimenter id
        if has_mask:
            half = len(payload) // 2
            fields.append(Field(oxm_class, number, payload[:half], payload[half:]))
        else:
            fields.append(Field(oxm_class, number, payload))
    return fields


def decode_match(data: bytes, offset: int) -> tuple[list[Field], int]:
    """An ofp_match at `offset`: its fields and the offset just past its padding."""
    if len(data) - offset < 4:
        raise OxmError("truncated ofp_match header")
    match_type, length = struct.unpack_from("!HH", data, offset)
    if match_type != 1 or length < 4 or offset + length > len(data):
        raise OxmError(f"ofp_match of type {match_type}, length {length} does not fit")
    fields = decode_fields(data[offset + 4:offset + length])
    return fields, offset + length + (-length % 8)
