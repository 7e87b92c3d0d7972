"""OpenFlow 1.3 messages and the Nicira extensions a controller of Open vSwitch needs, as
bytes in and objects out: no sockets here.

Encoders return whole messages (header included) for a given transaction id; `decode`
turns one framed message into a dataclass; `MessageReader` frames a byte stream.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .oxm import Field, OxmError, decode_fields, decode_match, encode_match

OFP_VERSION = 0x04  # OpenFlow 1.3
HEADER = struct.Struct("!BBHI")  # version, type, length, xid

OFPT_HELLO, OFPT_ERROR, OFPT_ECHO_REQUEST, OFPT_ECHO_REPLY = 0, 1, 2, 3
OFPT_EXPERIMENTER, OFPT_FEATURES_REQUEST, OFPT_FEATURES_REPLY = 4, 5, 6
OFPT_GET_CONFIG_REQUEST, OFPT_GET_CONFIG_REPLY, OFPT_SET_CONFIG = 7, 8, 9
OFPT_PACKET_IN, OFPT_FLOW_MOD, OFPT_GROUP_MOD = 10, 14, 15
OFPT_MULTIPART_REQUEST, OFPT_MULTIPART_REPLY = 18, 19
OFPT_BARRIER_REQUEST, OFPT_BARRIER_REPLY, OFPT_METER_MOD = 20, 21, 29

OFPFC_ADD, OFPFC_MODIFY, OFPFC_MODIFY_STRICT, OFPFC_DELETE, OFPFC_DELETE_STRICT = range(5)
OFPMC_ADD, OFPMC_MODIFY, OFPMC_DELETE = 0, 1, 2
OFPMF_KBPS, OFPMF_PKTPS, OFPMF_BURST, OFPMF_STATS = 1, 2, 4, 8
OFPMBT_DROP = 1
OFPGC_ADD, OFPGC_MODIFY, OFPGC_DELETE = 0, 1, 2
OFPGT_ALL = 0
OFPIT_GOTO_TABLE, OFPIT_APPLY_ACTIONS, OFPIT_METER = 1, 4, 6
OFPAT_OUTPUT, OFPAT_EXPERIMENTER = 0, 0xFFFF
OFPP_CONTROLLER, OFPP_ANY = 0xFFFFFFFD, 0xFFFFFFFF
OFPG_ALL, OFPG_ANY, OFP_NO_BUFFER = 0xFFFFFFFC, 0xFFFFFFFF, 0xFFFFFFFF
OFPM_ALL = 0xFFFFFFFF
OFPCML_NO_BUFFER = 0xFFFF
OFPR_NO_MATCH, OFPR_ACTION = 0, 1
OFPMP_FLOW, OFPMP_METER, OFPMP_METER_CONFIG, OFPMP_TABLE_FEATURES = 1, 9, 10, 12
OFPMPF_MORE = 1  # OFPMPF_REQ_MORE in requests, OFPMPF_REPLY_MORE in replies
OFPTT_ALL = 0xFF

NX_VENDOR_ID = 0x00002320
NXT_SET_PACKET_IN_FORMAT, NXT_SET_CONTROLLER_ID, NXT_PACKET_IN2 = 16, 20, 30
NXPIF_STANDARD, NXPIF_NXT_PACKET_IN, NXPIF_NXT_PACKET_IN2 = 0, 1, 2
NXAST_CONTROLLER, NXAST_CONTROLLER2 = 20, 37
NXAC2PT_MAX_LEN, NXAC2PT_CONTROLLER_ID, NXAC2PT_REASON, NXAC2PT_USERDATA = 0, 1, 2, 3
NXPINT_PACKET, NXPINT_FULL_LEN, NXPINT_BUFFER_ID, NXPINT_TABLE_ID = 0, 1, 2, 3
NXPINT_COOKIE, NXPINT_REASON, NXPINT_METADATA, NXPINT_USERDATA = 4, 5, 6, 7

ERROR_TYPES = {
    0: "HELLO_FAILED", 1: "BAD_REQUEST", 2: "BAD_ACTION", 3: "BAD_INSTRUCTION",
    4: "BAD_MATCH", 5: "FLOW_MOD_FAILED", 6: "GROUP_MOD_FAILED", 7: "PORT_MOD_FAILED",
    8: "TABLE_MOD_FAILED", 9: "QUEUE_OP_FAILED", 10: "SWITCH_CONFIG_FAILED",
    11: "ROLE_REQUEST_FAILED", 12: "METER_MOD_FAILED", 13: "TABLE_FEATURES_FAILED",
    0xFFFF: "EXPERIMENTER",
}
ERROR_CODES = {
    0: ("INCOMPATIBLE", "EPERM"),
    1: ("BAD_VERSION", "BAD_TYPE", "BAD_MULTIPART", "BAD_EXPERIMENTER", "BAD_EXP_TYPE",
        "EPERM", "BAD_LEN", "BUFFER_EMPTY", "BUFFER_UNKNOWN", "BAD_TABLE_ID", "IS_SLAVE",
        "BAD_PORT", "BAD_PACKET", "MULTIPART_BUFFER_OVERFLOW"),
    2: ("BAD_TYPE", "BAD_LEN", "BAD_EXPERIMENTER", "BAD_EXP_TYPE", "BAD_OUT_PORT",
        "BAD_ARGUMENT", "EPERM", "TOO_MANY", "BAD_QUEUE", "BAD_OUT_GROUP", "MATCH_INCONSISTENT",
        "UNSUPPORTED_ORDER", "BAD_TAG", "BAD_SET_TYPE", "BAD_SET_LEN", "BAD_SET_ARGUMENT"),
    3: ("UNKNOWN_INST", "UNSUP_INST", "BAD_TABLE_ID", "UNSUP_METADATA",
        "UNSUP_METADATA_MASK", "BAD_EXPERIMENTER", "BAD_EXP_TYPE", "BAD_LEN", "EPERM"),
    4: ("BAD_TYPE", "BAD_LEN", "BAD_TAG", "BAD_DL_ADDR_MASK", "BAD_NW_ADDR_MASK",
        "BAD_WILDCARDS", "BAD_FIELD", "BAD_VALUE", "BAD_MASK", "BAD_PREREQ", "DUP_FIELD",
        "EPERM"),
    5: ("UNKNOWN", "TABLE_FULL", "BAD_TABLE_ID", "OVERLAP", "EPERM", "BAD_TIMEOUT",
        "BAD_COMMAND", "BAD_FLAGS"),
    12: ("UNKNOWN", "METER_EXISTS", "INVALID_METER", "UNKNOWN_METER", "BAD_COMMAND",
         "BAD_FLAGS", "BAD_RATE", "BAD_BURST", "BAD_BAND", "BAD_BAND_VALUE", "OUT_OF_METERS",
         "OUT_OF_BANDS"),
}


class DecodeError(ValueError):
    """A malformed OpenFlow message; the text says what was wrong."""


class OpenFlowError(Exception):
    """The switch answered a request with OFPT_ERROR."""

    def __init__(self, error_type: int, code: int, data: bytes = b"", xid: int = 0):
        self.type, self.code, self.data, self.xid = error_type, code, data, xid
        name = ERROR_TYPES.get(error_type, str(error_type))
        codes = ERROR_CODES.get(error_type, ())
        code_name = codes[code] if code < len(codes) else str(code)
        super().__init__(f"OpenFlow error {name}/{code_name} (type {error_type}, code {code})"
                         f" for the request with xid {xid}")


def _message(message_type: int, xid: int, body: bytes = b"") -> bytes:
    return HEADER.pack(OFP_VERSION, message_type, HEADER.size + len(body), xid) + body


def _nicira(xid: int, subtype: int, body: bytes) -> bytes:
    return _message(OFPT_EXPERIMENTER, xid, struct.pack("!II", NX_VENDOR_ID, subtype) + body)


# --- requests


def hello(xid: int, versions: tuple[int, ...] = (OFP_VERSION,)) -> bytes:
    """HELLO with a version bitmap element (OFPHET_VERSIONBITMAP)."""
    bitmap = sum(1 << v for v in versions)
    return _message(OFPT_HELLO, xid, struct.pack("!HHI", 1, 8, bitmap))


def echo_request(xid: int, data: bytes = b"") -> bytes:
    return _message(OFPT_ECHO_REQUEST, xid, data)


def echo_reply(xid: int, data: bytes = b"") -> bytes:
    return _message(OFPT_ECHO_REPLY, xid, data)


def features_request(xid: int) -> bytes:
    return _message(OFPT_FEATURES_REQUEST, xid)


def barrier_request(xid: int) -> bytes:
    return _message(OFPT_BARRIER_REQUEST, xid)


def set_config(xid: int, miss_send_len: int = OFPCML_NO_BUFFER, flags: int = 0) -> bytes:
    """Also what makes OVS send packet-ins to a service-socket connection at all."""
    return _message(OFPT_SET_CONFIG, xid, struct.pack("!HH", flags, miss_send_len))


def set_packet_in_format(xid: int, packet_in_format: int) -> bytes:
    return _nicira(xid, NXT_SET_PACKET_IN_FORMAT, struct.pack("!I", packet_in_format))


def set_controller_id(xid: int, controller_id: int) -> bytes:
    """Packet-ins of controller(id=N) actions then go to this connection alone."""
    return _nicira(xid, NXT_SET_CONTROLLER_ID, b"\0" * 6 + struct.pack("!H", controller_id))


def flow_mod(xid: int, *, command: int, table_id: int, priority: int = 0, cookie: int = 0,
             cookie_mask: int = 0, match: list[Field] = (), instructions: bytes = b"",
             idle_timeout: int = 0, hard_timeout: int = 0, flags: int = 0,
             out_port: int = OFPP_ANY, out_group: int = OFPG_ANY) -> bytes:
    body = struct.pack("!QQBBHHHIIIH2x", cookie, cookie_mask, table_id, command, idle_timeout,
                       hard_timeout, priority, OFP_NO_BUFFER, out_port, out_group, flags)
    return _message(OFPT_FLOW_MOD, xid, body + encode_match(list(match)) + instructions)


def meter_mod(xid: int, *, command: int, meter_id: int, flags: int,
              bands: list[tuple[int, int, int]]) -> bytes:
    """`bands`: (band type, rate, burst size)."""
    body = struct.pack("!HHI", command, flags, meter_id)
    for band_type, rate, burst in bands:
        body += struct.pack("!HHII4x", band_type, 16, rate, burst)
    return _message(OFPT_METER_MOD, xid, body)


def _multipart(xid: int, multipart_type: int, body: bytes = b"", flags: int = 0) -> bytes:
    return _message(OFPT_MULTIPART_REQUEST, xid,
                    struct.pack("!HH4x", multipart_type, flags) + body)


def meter_stats_request(xid: int, meter_id: int) -> bytes:
    return _multipart(xid, OFPMP_METER, struct.pack("!I4x", meter_id))


def meter_config_request(xid: int, meter_id: int = OFPM_ALL) -> bytes:
    return _multipart(xid, OFPMP_METER_CONFIG, struct.pack("!I4x", meter_id))


def flow_stats_request(xid: int, table_id: int = OFPTT_ALL, cookie: int = 0,
                       cookie_mask: int = 0, match: list[Field] = ()) -> bytes:
    """The flows of one table (or all), narrowed by cookie: the switch does the filtering."""
    body = struct.pack("!B3xII4xQQ", table_id, OFPP_ANY, OFPG_ANY, cookie, cookie_mask)
    return _multipart(xid, OFPMP_FLOW, body + encode_match(list(match)))


def table_features_request(xid: int, tables: list[bytes] = (), flags: int = 0) -> bytes:
    """Without `tables`: read every table's features. With them (each an encoded
    ofp_table_features, e.g. `TableFeature.raw` with a new name): set them, as a controller
    names its tables (OFPMPF_MORE in `flags` when more parts follow)."""
    return _multipart(xid, OFPMP_TABLE_FEATURES, b"".join(tables), flags)


def get_config_request(xid: int) -> bytes:
    return _message(OFPT_GET_CONFIG_REQUEST, xid)


def group_mod(xid: int, *, command: int, group_id: int, group_type: int = OFPGT_ALL,
              buckets: bytes = b"") -> bytes:
    return _message(OFPT_GROUP_MOD, xid,
                    struct.pack("!HBxI", command, group_type, group_id) + buckets)


# --- instructions and actions


def apply_actions(*actions: bytes) -> bytes:
    body = b"".join(actions)
    return struct.pack("!HH4x", OFPIT_APPLY_ACTIONS, 8 + len(body)) + body


def goto_table(table_id: int) -> bytes:
    return struct.pack("!HHB3x", OFPIT_GOTO_TABLE, 8, table_id)


def meter(meter_id: int) -> bytes:
    return struct.pack("!HHI", OFPIT_METER, 8, meter_id)


def output(port: int, max_len: int = OFPCML_NO_BUFFER) -> bytes:
    return struct.pack("!HHIH6x", OFPAT_OUTPUT, 16, port, max_len)


def nx_controller(max_len: int, controller_id: int, reason: int = OFPR_ACTION) -> bytes:
    """NXAST_CONTROLLER: output to the controller connections with this id only."""
    return struct.pack("!HHIHHHBx", OFPAT_EXPERIMENTER, 16, NX_VENDOR_ID, NXAST_CONTROLLER,
                       max_len, controller_id, reason)


def nx_controller2(max_len: int, controller_id: int, userdata: bytes = b"",
                   reason: int = OFPR_ACTION) -> bytes:
    """NXAST_CONTROLLER2: like NXAST_CONTROLLER, plus userdata delivered in NXT_PACKET_IN2."""
    def prop(prop_type: int, payload: bytes) -> bytes:
        length = 4 + len(payload)
        return struct.pack("!HH", prop_type, length) + payload + b"\0" * (-length % 8)

    props = (prop(NXAC2PT_MAX_LEN, struct.pack("!H", max_len))
             + prop(NXAC2PT_CONTROLLER_ID, struct.pack("!H", controller_id))
             + prop(NXAC2PT_REASON, bytes((reason,))))
    if userdata:
        props += prop(NXAC2PT_USERDATA, userdata)
    return struct.pack("!HHIH6x", OFPAT_EXPERIMENTER, 16 + len(props), NX_VENDOR_ID,
                       NXAST_CONTROLLER2) + props


# --- decoded messages


@dataclass
class Message:
    xid: int


@dataclass
class Hello(Message):
    versions: tuple[int, ...]
    version: int


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


@dataclass
class MeterStats(Message):
    meters: dict[int, dict[str, int]] = field(default_factory=dict)
    more: bool = False  # further parts of this multipart reply follow


@dataclass(frozen=True)
class ControllerAction:
    """NXAST_CONTROLLER or NXAST_CONTROLLER2: a packet-in to the connections with this id."""

    controller_id: int
    max_len: int
    reason: int
    userdata: bytes = b""


@dataclass(frozen=True)
class RawAction:
    """Any other action, as its bytes: compared, not interpreted."""

    data: bytes


@dataclass(frozen=True)
class Instructions:
    meter_id: int | None = None
    actions: tuple[ControllerAction | RawAction, ...] = ()  # of OFPIT_APPLY_ACTIONS
    goto_table: int | None = None
    other: tuple[bytes, ...] = ()  # any other instruction, as its bytes


@dataclass
class FlowEntry:
    table_id: int
    priority: int
    cookie: int
    match: list[Field]
    instructions: Instructions
    packet_count: int = 0


@dataclass
class FlowStats(Message):
    flows: list[FlowEntry] = field(default_factory=list)
    more: bool = False


@dataclass
class MeterConfig(Message):
    """meter id -> (flags, ((band type, rate, burst size), ...))"""

    meters: dict[int, tuple[int, tuple[tuple[int, int, int], ...]]] = \
        field(default_factory=dict)
    more: bool = False


@dataclass(frozen=True)
class TableFeature:
    table_id: int
    name: str
    raw: bytes  # the whole ofp_table_features, properties included

    def renamed(self, name: str) -> bytes:
        """`raw` with another name (at most 31 bytes), as a set request wants it."""
        encoded = name.encode()[:31].ljust(32, b"\0")
        return self.raw[:8] + encoded + self.raw[40:]


@dataclass
class TableFeatures(Message):
    tables: list[TableFeature] = field(default_factory=list)
    more: bool = False


@dataclass
class GetConfigReply(Message):
    flags: int
    miss_send_len: int


@dataclass
class Other(Message):
    type: int
    body: bytes


def _need(body: bytes, size: int, what: str) -> None:
    if len(body) < size:
        raise DecodeError(f"{what} needs {size} bytes, has {len(body)}")


def decode(message: bytes) -> Message:
    """One framed message (as `MessageReader` yields them)."""
    if len(message) < HEADER.size:
        raise DecodeError(f"message of {len(message)} bytes is shorter than a header")
    version, message_type, length, xid = HEADER.unpack_from(message)
    if length != len(message):
        raise DecodeError(f"header says {length} bytes, message has {len(message)}")
    body = message[HEADER.size:]
    try:
        if message_type == OFPT_HELLO:
            versions = _hello_versions(body) or (version,)
            return Hello(xid, versions, version)
        if message_type == OFPT_ERROR:
            _need(body, 4, "OFPT_ERROR")
            error_type, code = struct.unpack_from("!HH", body)
            return Error(xid, OpenFlowError(error_type, code, body[4:], xid))
        if message_type == OFPT_ECHO_REQUEST:
            return EchoRequest(xid, body)
        if message_type == OFPT_ECHO_REPLY:
            return EchoReply(xid, body)
        if message_type == OFPT_FEATURES_REPLY:
            _need(body, 24, "OFPT_FEATURES_REPLY")
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
            _need(body, 4, "OFPT_GET_CONFIG_REPLY")
            return GetConfigReply(xid, *struct.unpack_from("!HH", body))
        if message_type == OFPT_MULTIPART_REPLY and len(body) >= 8:
            multipart_type, flags = struct.unpack_from("!HH", body)
            decoder = _MULTIPART_DECODERS.get(multipart_type)
            if decoder is not None:
                reply = decoder(xid, body[8:])
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
            for index in range((length - 4) // 4):
                bits = struct.unpack_from("!I", body, pos + 4 + 4 * index)[0]
                versions += [index * 32 + b for b in range(32) if bits >> b & 1]
            return tuple(versions)
        pos += (length + 7) // 8 * 8
    return ()


def _packet_in(xid: int, body: bytes) -> PacketIn:
    _need(body, 16, "OFPT_PACKET_IN")
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
        xid, reason=_property(values, NXPINT_REASON, 1, 0),
        table_id=_property(values, NXPINT_TABLE_ID, 1, 0),
        cookie=int.from_bytes(cookie_raw[4:12], "big") if cookie_raw else 0,
        match=decode_fields(values.get(NXPINT_METADATA, b"")), data=values[NXPINT_PACKET],
        total_len=_property(values, NXPINT_FULL_LEN, 4, len(values[NXPINT_PACKET])),
        buffer_id=_property(values, NXPINT_BUFFER_ID, 4, OFP_NO_BUFFER),
        userdata=values.get(NXPINT_USERDATA, b""))


def _property(values: dict[int, bytes], prop: int, width: int, default: int) -> int:
    """An integer property: its first `width` bytes (OVS counts the padding of a u8 or u16
    property in its length)."""
    raw = values.get(prop)
    if raw is None:
        return default
    if len(raw) < width:
        raise DecodeError(f"property {prop} has {len(raw)} bytes, needs {width}")
    return int.from_bytes(raw[:width], "big")


def _meter_stats(xid: int, body: bytes) -> MeterStats:
    stats = MeterStats(xid)
    pos = 0
    while len(body) - pos >= 40:
        meter_id, length, _, packet_in_count, byte_in_count, _, _ = struct.unpack_from(
            "!IH6xIQQII", body, pos)
        bands = []
        for band_pos in range(pos + 40, pos + length, 16):
            bands.append(struct.unpack_from("!QQ", body, band_pos))
        stats.meters[meter_id] = {"packets_in": packet_in_count, "bytes_in": byte_in_count,
                                  "packets_dropped": sum(b[0] for b in bands)}
        if length < 40:
            break
        pos += length
    return stats


def _flow_stats(xid: int, body: bytes) -> FlowStats:
    stats = FlowStats(xid)
    pos = 0
    while len(body) - pos >= 48:
        (length, table_id, _, _, priority, _, _, _, cookie, packet_count,
         _) = struct.unpack_from("!HBxIIHHHH4xQQQ", body, pos)
        if length < 56 or pos + length > len(body):
            raise DecodeError(f"flow stats entry of length {length} does not fit")
        match, instructions_at = decode_match(body[pos:pos + length], 48)
        stats.flows.append(FlowEntry(table_id, priority, cookie, match,
                                     decode_instructions(body[pos + instructions_at:
                                                              pos + length]), packet_count))
        pos += length
    return stats


def decode_instructions(data: bytes) -> Instructions:
    meter_id = goto = None
    actions: tuple = ()
    other = []
    pos = 0
    while len(data) - pos >= 4:
        kind, length = struct.unpack_from("!HH", data, pos)
        if length < 8 or pos + length > len(data):
            raise DecodeError(f"instruction {kind} of length {length} does not fit")
        if kind == OFPIT_METER:
            meter_id = struct.unpack_from("!I", data, pos + 4)[0]
        elif kind == OFPIT_GOTO_TABLE:
            goto = data[pos + 4]
        elif kind == OFPIT_APPLY_ACTIONS:
            actions = decode_actions(data[pos + 8:pos + length])
        else:
            other.append(data[pos:pos + length])
        pos += length
    return Instructions(meter_id, actions, goto, tuple(other))


def decode_actions(data: bytes) -> tuple[ControllerAction | RawAction, ...]:
    actions = []
    pos = 0
    while len(data) - pos >= 4:
        kind, length = struct.unpack_from("!HH", data, pos)
        if length < 8 or length % 8 or pos + length > len(data):
            raise DecodeError(f"action {kind} of length {length} does not fit")
        action = data[pos:pos + length]
        actions.append(_controller_action(action) or RawAction(action))
        pos += length
    return tuple(actions)


def _controller_action(action: bytes) -> ControllerAction | None:
    if len(action) < 16 or struct.unpack_from("!HxxI", action) != (OFPAT_EXPERIMENTER,
                                                                    NX_VENDOR_ID):
        return None
    subtype = struct.unpack_from("!H", action, 8)[0]
    if subtype == NXAST_CONTROLLER:
        max_len, controller_id, reason = struct.unpack_from("!HHB", action, 10)
        return ControllerAction(controller_id, max_len, reason)
    if subtype != NXAST_CONTROLLER2:
        return None
    values: dict[int, bytes] = {}
    pos = 16
    while len(action) - pos >= 4:
        prop_type, length = struct.unpack_from("!HH", action, pos)
        if length < 4 or pos + length > len(action):
            raise DecodeError(f"NXAST_CONTROLLER2 property {prop_type} of length {length}")
        values[prop_type] = action[pos + 4:pos + length]
        pos += (length + 7) // 8 * 8

    return ControllerAction(_property(values, NXAC2PT_CONTROLLER_ID, 2, 0),
                            _property(values, NXAC2PT_MAX_LEN, 2, OFPCML_NO_BUFFER),
                            _property(values, NXAC2PT_REASON, 1, OFPR_ACTION),
                            values.get(NXAC2PT_USERDATA, b""))


def _meter_config(xid: int, body: bytes) -> MeterConfig:
    config = MeterConfig(xid)
    pos = 0
    while len(body) - pos >= 8:
        length, flags, meter_id = struct.unpack_from("!HHI", body, pos)
        if length < 8 or pos + length > len(body):
            raise DecodeError(f"meter config entry of length {length} does not fit")
        bands = tuple(struct.unpack_from("!HxxII", body, band)
                      for band in range(pos + 8, pos + length - 15, 16))
        config.meters[meter_id] = (flags, bands)
        pos += length
    return config


def _table_features(xid: int, body: bytes) -> TableFeatures:
    features = TableFeatures(xid)
    pos = 0
    while len(body) - pos >= 64:
        length, table_id = struct.unpack_from("!HB", body, pos)
        if length < 64 or pos + length > len(body):
            raise DecodeError(f"table features entry of length {length} does not fit")
        name = body[pos + 8:pos + 40].split(b"\0", 1)[0].decode("utf-8", "replace")
        features.tables.append(TableFeature(table_id, name, body[pos:pos + length]))
        pos += length
    return features


_MULTIPART_DECODERS = {OFPMP_FLOW: _flow_stats, OFPMP_METER: _meter_stats,
                       OFPMP_METER_CONFIG: _meter_config, OFPMP_TABLE_FEATURES: _table_features}


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
