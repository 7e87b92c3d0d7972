"""OpenFlow 1.3 and 1.5 messages and the Nicira extensions a controller of Open vSwitch needs,
as bytes in and objects out: no sockets here.

Encoders return whole messages (header included) for a given transaction id and OpenFlow
`version` (the one `negotiate` chose with the switch); `decode` turns one framed message,
of either version, into a dataclass; `MessageReader` frames a byte stream.

Where 1.5 differs from 1.3 for what is here (as Open vSwitch 3.1 implements it):
  - a meter is an action (OFPAT_METER), first in the apply-actions list, not an instruction:
    OVS refuses OFPIT_METER from a 1.5 peer (lib/ofp-actions.c `encode_METER`,
    `decode_openflow11_instructions`); `Instructions.encode` places it per version;
  - a flow stats reply entry is an ofp15_flow_desc with its counters as OXS fields
    (lib/ofp-flow.c `ofputil_decode_flow_stats_reply`, lib/ox-stat.c);
  - registers in matches and packet-in metadata are OXM_OF_PKT_REG pairs (`oxm.register`);
  - a group mod has a bucket array length and a command bucket id (ofp15_group_mod);
  - the flow mod's pad after the flags is `importance` (0 here), the table features
    entry's pad byte is `command` (kept as the switch sent it): the same bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# The codec's face: callers write `messages.X` for what the other modules define too.
from .actions import (  # noqa: F401
    ControllerAction, Instructions, RawAction, apply_actions, decode_actions,
    decode_instructions, goto_table, nx_controller, nx_controller2, output,
)
from .multipart import (  # noqa: F401
    DECODERS, FlowEntry, FlowStats, MeterConfig, MeterStat, MeterStats, TableFeature,
    TableFeatures, flow_stats_request, meter_config_request, meter_stats_request,
    table_features_request,
)
from .oxm import Field, OxmError, decode_fields, decode_match, encode_match, register
from .wire import *  # noqa: F401,F403 - the constants, errors and Message
from .wire import (
    HEADER, NX_VENDOR_ID, NXPINT_BUFFER_ID, NXPINT_COOKIE, NXPINT_FULL_LEN, NXPINT_METADATA,
    NXPINT_PACKET, NXPINT_REASON, NXPINT_TABLE_ID, NXPINT_USERDATA, NXT_PACKET_IN2,
    NXT_SET_CONTROLLER_ID, NXT_SET_PACKET_IN_FORMAT, OFP15, OFP_NO_BUFFER, OFPCML_NO_BUFFER,
    OFPG15_BUCKET_ALL, OFPG_ANY, OFPGT_ALL, OFPMPF_MORE, OFPP_ANY, OFPT_BARRIER_REPLY,
    OFPT_BARRIER_REQUEST, OFPT_ECHO_REPLY, OFPT_ECHO_REQUEST, OFPT_ERROR, OFPT_EXPERIMENTER,
    OFPT_FEATURES_REPLY, OFPT_FEATURES_REQUEST, OFPT_FLOW_MOD, OFPT_GET_CONFIG_REPLY,
    OFPT_GET_CONFIG_REQUEST, OFPT_GROUP_MOD, OFPT_HELLO, OFPT_METER_MOD, OFPT_MULTIPART_REPLY,
    OFPT_PACKET_IN, OFPT_SET_CONFIG, VERSIONS, DecodeError, Message, OpenFlowError,
    int_property, framed, need, nicira,
)

# --- version negotiation


def hello(xid: int, versions: tuple[int, ...] = VERSIONS) -> bytes:
    """HELLO offering `versions` in a version bitmap (OFPHET_VERSIONBITMAP); its header
    carries the highest, as the specification asks."""
    bitmap = sum(1 << v for v in versions)
    return HEADER.pack(max(versions), OFPT_HELLO, 16, xid) + struct.pack("!HHI", 1, 8, bitmap)


def negotiate(offered: tuple[int, ...], hello: Hello) -> int | None:
    """The version to speak after our HELLO offered `offered` and the switch's was `hello`:
    the highest both have in their bitmaps; without a bitmap from the switch, the lower of
    the two headers' versions if we offered it (OpenFlow 1.5.1 §7.1.1 "Connection Setup").
    None: nothing in common."""
    if hello.versions:
        common = set(offered) & set(hello.versions)
        return max(common) if common else None
    version = min(max(offered), hello.version)
    return version if version in offered else None


# --- requests


def echo_request(xid: int, data: bytes = b"", *, version: int) -> bytes:
    return framed(OFPT_ECHO_REQUEST, xid, data, version=version)


def echo_reply(xid: int, data: bytes = b"", *, version: int) -> bytes:
    return framed(OFPT_ECHO_REPLY, xid, data, version=version)


def features_request(xid: int, *, version: int) -> bytes:
    return framed(OFPT_FEATURES_REQUEST, xid, version=version)


def barrier_request(xid: int, *, version: int) -> bytes:
    return framed(OFPT_BARRIER_REQUEST, xid, version=version)


def set_config(xid: int, miss_send_len: int = OFPCML_NO_BUFFER, flags: int = 0, *,
               version: int) -> bytes:
    """Also what makes OVS send packet-ins to a service-socket connection at all."""
    return framed(OFPT_SET_CONFIG, xid, struct.pack("!HH", flags, miss_send_len),
                  version=version)


def get_config_request(xid: int, *, version: int) -> bytes:
    return framed(OFPT_GET_CONFIG_REQUEST, xid, version=version)


def set_packet_in_format(xid: int, packet_in_format: int, *, version: int) -> bytes:
    return nicira(xid, NXT_SET_PACKET_IN_FORMAT, struct.pack("!I", packet_in_format),
                  version=version)


def set_controller_id(xid: int, controller_id: int, *, version: int) -> bytes:
    """This connection's controller id: the packet-ins of `controller(id=N)` actions go to
    every connection whose id is N (several may share one), none to the others."""
    return nicira(xid, NXT_SET_CONTROLLER_ID, b"\0" * 6 + struct.pack("!H", controller_id),
                  version=version)


def flow_mod(xid: int, *, version: int, command: int, table_id: int, priority: int = 0,
             cookie: int = 0, cookie_mask: int = 0, match: list[Field] = (),
             instructions: Instructions | None = None, idle_timeout: int = 0,
             hard_timeout: int = 0, flags: int = 0, out_port: int = OFPP_ANY,
             out_group: int = OFPG_ANY) -> bytes:
    """ofp_flow_mod; in 1.5 the two bytes after `flags` are `importance`, left 0 here."""
    body = struct.pack("!QQBBHHHIIIH2x", cookie, cookie_mask, table_id, command, idle_timeout,
                       hard_timeout, priority, OFP_NO_BUFFER, out_port, out_group, flags)
    encoded = instructions.encode(version) if instructions is not None else b""
    return framed(OFPT_FLOW_MOD, xid, body + encode_match(list(match)) + encoded,
                  version=version)


def meter_mod(xid: int, *, version: int, command: int, meter_id: int, flags: int,
              bands: list[tuple[int, int, int]]) -> bytes:
    """`bands`: (band type, rate, burst size). The same ofp_meter_mod in 1.3 and 1.5."""
    body = struct.pack("!HHI", command, flags, meter_id)
    for band_type, rate, burst in bands:
        body += struct.pack("!HHII4x", band_type, 16, rate, burst)
    return framed(OFPT_METER_MOD, xid, body, version=version)


def group_mod(xid: int, *, version: int, command: int, group_id: int,
              group_type: int = OFPGT_ALL, buckets: bytes = b"") -> bytes:
    """`buckets` encoded for `version` (1.5 buckets differ from 1.3's; deleting needs
    none). 1.5 adds the bucket array's length and a command bucket id (all of them)."""
    if version >= OFP15:
        body = struct.pack("!HBxIH2xI", command, group_type, group_id, len(buckets),
                           OFPG15_BUCKET_ALL)
    else:
        body = struct.pack("!HBxI", command, group_type, group_id)
    return framed(OFPT_GROUP_MOD, xid, body + buckets, version=version)


# --- decoded messages


@dataclass
class Hello(Message):
    versions: tuple[int, ...]  # from its version bitmap; () when it had none
    version: int  # its header's


@dataclass
class Error(Message):
    error: OpenFlowError


@dataclass
class EchoRequest(Message):
    data: bytes


@dataclass
class EchoReply(Message):
    data: bytes


@dataclass
class FeaturesReply(Message):
    datapath_id: int
    n_buffers: int
    n_tables: int


@dataclass
class BarrierReply(Message):
    pass


@dataclass
class PacketIn(Message):
    """OFPT_PACKET_IN, or NXT_PACKET_IN2 (which alone carries `userdata`)."""

    reason: int
    table_id: int
    cookie: int
    match: list[Field]
    data: bytes
    total_len: int
    buffer_id: int = OFP_NO_BUFFER
    userdata: bytes = b""

    def field(self, name: str) -> Field | None:
        return next((f for f in self.match if f.name == name), None)

    def register(self, number: int) -> int:
        """reg<number> of the packet's metadata, in either version's shape; 0 when the
        switch left it out (Open vSwitch does for a zero register)."""
        return register(self.match, number)


@dataclass
class GetConfigReply(Message):
    flags: int
    miss_send_len: int


@dataclass
class Other(Message):
    type: int
    body: bytes


def decode(message: bytes) -> Message:
    """One framed message (as `MessageReader` yields them), of the version its header says."""
    if len(message) < HEADER.size:
        raise DecodeError(f"message of {len(message)} bytes is shorter than a header")
    version, message_type, length, xid = HEADER.unpack_from(message)
    if length != len(message):
        raise DecodeError(f"header says {length} bytes, message has {len(message)}")
    body = message[HEADER.size:]
    try:
        if message_type == OFPT_HELLO:
            return Hello(xid, _hello_versions(body), version)
        if message_type == OFPT_ERROR:
            need(body, 4, "OFPT_ERROR")
            error_type, code = struct.unpack_from("!HH", body)
            return Error(xid, OpenFlowError(error_type, code, body[4:], xid))
        if message_type == OFPT_ECHO_REQUEST:
            return EchoRequest(xid, body)
        if message_type == OFPT_ECHO_REPLY:
            return EchoReply(xid, body)
        if message_type == OFPT_FEATURES_REPLY:
            need(body, 24, "OFPT_FEATURES_REPLY")
            datapath_id, n_buffers, n_tables = struct.unpack_from("!QIB", body)
            return FeaturesReply(xid, datapath_id, n_buffers, n_tables)
        if message_type == OFPT_BARRIER_REPLY:
            return BarrierReply(xid)
        if message_type == OFPT_PACKET_IN:
            return _packet_in(xid, body)
        if message_type == OFPT_EXPERIMENTER and len(body) >= 8:
            vendor, subtype = struct.unpack_from("!II", body)
            if vendor == NX_VENDOR_ID and subtype == NXT_PACKET_IN2:
                return _packet_in2(xid, body[8:])
        if message_type == OFPT_GET_CONFIG_REPLY:
            need(body, 4, "OFPT_GET_CONFIG_REPLY")
            return GetConfigReply(xid, *struct.unpack_from("!HH", body))
        if message_type == OFPT_MULTIPART_REPLY and len(body) >= 8:
            multipart_type, flags = struct.unpack_from("!HH", body)
            decoder = DECODERS.get(multipart_type)
            if decoder is not None:
                reply = decoder(xid, body[8:], version)
                reply.more = bool(flags & OFPMPF_MORE)
                return reply
    except (OxmError, struct.error) as err:
        raise DecodeError(f"message type {message_type} (xid {xid}): {err}") from None
    return Other(xid, message_type, body)


def _hello_versions(body: bytes) -> tuple[int, ...]:
    pos = 0
    while len(body) - pos >= 4:
        element_type, length = struct.unpack_from("!HH", body, pos)
        if length < 4:
            break
        if element_type == 1:
            versions = []
            for index in range((min(length, len(body) - pos) - 4) // 4):
                bits = struct.unpack_from("!I", body, pos + 4 + 4 * index)[0]
                versions += [index * 32 + b for b in range(32) if bits >> b & 1]
            return tuple(versions)
        pos += (length + 7) // 8 * 8
    return ()


def _packet_in(xid: int, body: bytes) -> PacketIn:
    need(body, 16, "OFPT_PACKET_IN")
    buffer_id, total_len, reason, table_id, cookie = struct.unpack_from("!IHBBQ", body)
    match, pos = decode_match(body, 16)
    return PacketIn(xid, reason, table_id, cookie, match, body[pos + 2:], total_len, buffer_id)


def _packet_in2(xid: int, body: bytes) -> PacketIn:
    values: dict[int, bytes] = {}
    pos = 0
    while len(body) - pos >= 4:
        prop_type, length = struct.unpack_from("!HH", body, pos)
        if length < 4 or pos + length > len(body):
            raise DecodeError(f"NXT_PACKET_IN2 property {prop_type} has length {length}")
        # the packet property keeps its own padding out of `length`
        values[prop_type] = body[pos + 4:pos + length]
        pos += (length + 7) // 8 * 8
    if NXPINT_PACKET not in values:
        raise DecodeError("NXT_PACKET_IN2 without a packet")

    cookie_raw = values.get(NXPINT_COOKIE)
    return PacketIn(
        xid, reason=int_property(values, NXPINT_REASON, 1, 0),
        table_id=int_property(values, NXPINT_TABLE_ID, 1, 0),
        cookie=int.from_bytes(cookie_raw[4:12], "big") if cookie_raw else 0,
        match=decode_fields(values.get(NXPINT_METADATA, b"")), data=values[NXPINT_PACKET],
        total_len=int_property(values, NXPINT_FULL_LEN, 4, len(values[NXPINT_PACKET])),
        buffer_id=int_property(values, NXPINT_BUFFER_ID, 4, OFP_NO_BUFFER),
        userdata=values.get(NXPINT_USERDATA, b""))


class MessageReader:
    """Cuts a byte stream into messages by their header's length."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= HEADER.size:
            length = struct.unpack_from("!H", self._buffer, 2)[0]
            if length < HEADER.size:
                raise DecodeError(f"stream out of step: a header claims {length} bytes")
            if len(self._buffer) < length:
                break
            messages.append(bytes(self._buffer[:length]))
            del self._buffer[:length]
        return messages
