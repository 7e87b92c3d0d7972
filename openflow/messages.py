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
from dataclasses import dataclass, field

from .oxm import Field, OxmError, decode_fields, decode_match, encode_match, register

OFP13, OFP15 = 0x04, 0x06
VERSIONS = (OFP13, OFP15)  # what this codec speaks
VERSION_NAMES = {1: "1.0", 2: "1.1", 3: "1.2", 4: "1.3", 5: "1.4", 6: "1.5"}
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
OFPG15_BUCKET_ALL = 0xFFFFFFFF
OFPIT_GOTO_TABLE, OFPIT_APPLY_ACTIONS, OFPIT_METER = 1, 4, 6
OFPAT_OUTPUT, OFPAT_METER, OFPAT_EXPERIMENTER = 0, 29, 0xFFFF
OFPP_CONTROLLER, OFPP_ANY = 0xFFFFFFFD, 0xFFFFFFFF
OFPG_ALL, OFPG_ANY, OFP_NO_BUFFER = 0xFFFFFFFC, 0xFFFFFFFF, 0xFFFFFFFF
OFPM_ALL = 0xFFFFFFFF
OFPCML_NO_BUFFER = 0xFFFF
OFPR_NO_MATCH, OFPR_ACTION = 0, 1
# 1.5 calls them OFPMP_FLOW_DESC and OFPMP_METER_STATS, OFPMP_METER_DESC: the same numbers
OFPMP_FLOW, OFPMP_METER, OFPMP_METER_CONFIG, OFPMP_TABLE_FEATURES = 1, 9, 10, 12
OFPXSC_OPENFLOW_BASIC = 0x8002  # OXS class of the 1.5 flow statistics (lib/ox-stat.c)
OFPXST_DURATION, OFPXST_IDLE_TIME, OFPXST_PACKET_COUNT, OFPXST_BYTE_COUNT = 0, 1, 4, 5
UNKNOWN_COUNT = (1 << 64) - 1  # a counter the switch does not keep
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
    14: "BAD_PROPERTY", 15: "ASYNC_CONFIG_FAILED", 16: "FLOW_MONITOR_FAILED",
    17: "BUNDLE_FAILED", 0xFFFF: "EXPERIMENTER",
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


def _message(message_type: int, xid: int, body: bytes = b"", *, version: int) -> bytes:
    if version not in VERSIONS:
        raise ValueError(f"OpenFlow version {version:#04x} is not one this codec speaks")
    return HEADER.pack(version, message_type, HEADER.size + len(body), xid) + body


def _nicira(xid: int, subtype: int, body: bytes, *, version: int) -> bytes:
    return _message(OFPT_EXPERIMENTER, xid, struct.pack("!II", NX_VENDOR_ID, subtype) + body,
                    version=version)


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
    return _message(OFPT_ECHO_REQUEST, xid, data, version=version)


def echo_reply(xid: int, data: bytes = b"", *, version: int) -> bytes:
    return _message(OFPT_ECHO_REPLY, xid, data, version=version)


def features_request(xid: int, *, version: int) -> bytes:
    return _message(OFPT_FEATURES_REQUEST, xid, version=version)


def barrier_request(xid: int, *, version: int) -> bytes:
    return _message(OFPT_BARRIER_REQUEST, xid, version=version)


def set_config(xid: int, miss_send_len: int = OFPCML_NO_BUFFER, flags: int = 0, *,
               version: int) -> bytes:
    """Also what makes OVS send packet-ins to a service-socket connection at all."""
    return _message(OFPT_SET_CONFIG, xid, struct.pack("!HH", flags, miss_send_len),
                    version=version)


def get_config_request(xid: int, *, version: int) -> bytes:
    return _message(OFPT_GET_CONFIG_REQUEST, xid, version=version)


def set_packet_in_format(xid: int, packet_in_format: int, *, version: int) -> bytes:
    return _nicira(xid, NXT_SET_PACKET_IN_FORMAT, struct.pack("!I", packet_in_format),
                   version=version)


def set_controller_id(xid: int, controller_id: int, *, version: int) -> bytes:
    """This connection's controller id: the packet-ins of `controller(id=N)` actions go to
    every connection whose id is N (several may share one), none to the others."""
    return _nicira(xid, NXT_SET_CONTROLLER_ID, b"\0" * 6 + struct.pack("!H", controller_id),
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
    return _message(OFPT_FLOW_MOD, xid, body + encode_match(list(match)) + encoded,
                    version=version)


def meter_mod(xid: int, *, version: int, command: int, meter_id: int, flags: int,
              bands: list[tuple[int, int, int]]) -> bytes:
    """`bands`: (band type, rate, burst size). The same ofp_meter_mod in 1.3 and 1.5."""
    body = struct.pack("!HHI", command, flags, meter_id)
    for band_type, rate, burst in bands:
        body += struct.pack("!HHII4x", band_type, 16, rate, burst)
    return _message(OFPT_METER_MOD, xid, body, version=version)


def group_mod(xid: int, *, version: int, command: int, group_id: int,
              group_type: int = OFPGT_ALL, buckets: bytes = b"") -> bytes:
    """`buckets` encoded for `version` (1.5 buckets differ from 1.3's; deleting needs
    none). 1.5 adds the bucket array's length and a command bucket id (all of them)."""
    if version >= OFP15:
        body = struct.pack("!HBxIH2xI", command, group_type, group_id, len(buckets),
                           OFPG15_BUCKET_ALL)
    else:
        body = struct.pack("!HBxI", command, group_type, group_id)
    return _message(OFPT_GROUP_MOD, xid, body + buckets, version=version)


def _multipart(xid: int, multipart_type: int, body: bytes = b"", flags: int = 0, *,
               version: int) -> bytes:
    return _message(OFPT_MULTIPART_REQUEST, xid,
                    struct.pack("!HH4x", multipart_type, flags) + body, version=version)


def meter_stats_request(xid: int, meter_id: int = OFPM_ALL, *, version: int) -> bytes:
    return _multipart(xid, OFPMP_METER, struct.pack("!I4x", meter_id), version=version)


def meter_config_request(xid: int, meter_id: int = OFPM_ALL, *, version: int) -> bytes:
    return _multipart(xid, OFPMP_METER_CONFIG, struct.pack("!I4x", meter_id),
                      version=version)


def flow_stats_request(xid: int, table_id: int = OFPTT_ALL, cookie: int = 0,
                       cookie_mask: int = 0, match: list[Field] = (), *,
                       version: int) -> bytes:
    """The flows of one table (or all), narrowed by cookie and by `match` (the switch
    returns the flows at least as specific as it: OFPFC_DELETE's loose matching). The switch
    does the filtering; the request is the same in 1.3 and 1.5, the reply is not."""
    body = struct.pack("!B3xII4xQQ", table_id, OFPP_ANY, OFPG_ANY, cookie, cookie_mask)
    return _multipart(xid, OFPMP_FLOW, body + encode_match(list(match)), version=version)


def table_features_request(xid: int, tables: list[bytes] = (), flags: int = 0, *,
                           version: int) -> bytes:
    """Without `tables`: read every table's features. With them (each an encoded
    ofp_table_features, e.g. `TableFeature.renamed`): set them, as a controller names its
    tables (OFPMPF_MORE in `flags` when more parts follow)."""
    return _multipart(xid, OFPMP_TABLE_FEATURES, b"".join(tables), flags, version=version)


# --- instructions and actions (the same bytes in both versions, but for the meter)


def apply_actions(*actions: bytes) -> bytes:
    body = b"".join(actions)
    return struct.pack("!HH4x", OFPIT_APPLY_ACTIONS, 8 + len(body)) + body


def goto_table(table_id: int) -> bytes:
    return struct.pack("!HHB3x", OFPIT_GOTO_TABLE, 8, table_id)


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


@dataclass(frozen=True)
class MeterStat:
    """One meter's ofp_meter_stats (the same in 1.3 and 1.5)."""

    flow_count: int  # flows using the meter (1.5: ref_count)
    packet_in_count: int  # packets that reached the meter
    byte_in_count: int
    duration_sec: int
    duration_nsec: int
    bands: tuple[tuple[int, int], ...]  # (packets, bytes) each band took, in band order

    @property
    def packets_dropped(self) -> int:
        """Packets over the meter's rate: what its bands took (a drop band drops them)."""
        return sum(packets for packets, _ in self.bands)


@dataclass
class MeterStats(Message):
    meters: dict[int, MeterStat] = field(default_factory=dict)
    more: bool = False  # further parts of this multipart reply follow


@dataclass(frozen=True)
class ControllerAction:
    """NXAST_CONTROLLER or NXAST_CONTROLLER2: a packet-in to the connections with this id."""

    controller_id: int
    max_len: int
    reason: int
    userdata: bytes = b""

    def encode(self) -> bytes:
        """NXAST_CONTROLLER where it can say it all (as OVS does), NXAST_CONTROLLER2 for
        userdata."""
        if self.userdata:
            return nx_controller2(self.max_len, self.controller_id, self.userdata, self.reason)
        return nx_controller(self.max_len, self.controller_id, self.reason)


@dataclass(frozen=True)
class RawAction:
    """Any other action, as its bytes: compared, not interpreted."""

    data: bytes

    def encode(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class Instructions:
    """A flow's instructions, the same object in both versions: the meter of 1.3's
    OFPIT_METER or of the OFPAT_METER action that leads 1.5's apply-actions list is
    `meter_id`, and `encode` puts it back where `version` wants it."""

    meter_id: int | None = None
    actions: tuple[ControllerAction | RawAction, ...] = ()  # of OFPIT_APPLY_ACTIONS
    goto_table: int | None = None
    other: tuple[bytes, ...] = ()  # any other instruction, as its bytes

    def encode(self, version: int) -> bytes:
        actions = b"".join(action.encode() for action in self.actions)
        encoded = b""
        if self.meter_id is not None:
            if version >= OFP15:
                actions = struct.pack("!HHI", OFPAT_METER, 8, self.meter_id) + actions
            else:
                encoded = struct.pack("!HHI", OFPIT_METER, 8, self.meter_id)
        if actions:
            encoded += apply_actions(actions)
        encoded += b"".join(self.other)
        if self.goto_table is not None:
            encoded += goto_table(self.goto_table)
        return encoded


@dataclass
class FlowEntry:
    """One flow of a flow stats reply. Counters the switch does not give are None (1.5's
    OXS fields are each optional; all ones means unknown in 1.3)."""

    table_id: int
    priority: int
    cookie: int
    match: list[Field]
    instructions: Instructions
    packet_count: int | None = None
    byte_count: int | None = None
    duration_sec: int | None = None
    duration_nsec: int | None = None
    idle_age: int | None = None  # seconds since a packet last hit it (1.5 OXS only)
    idle_timeout: int = 0
    hard_timeout: int = 0
    flags: int = 0
    importance: int = 0


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


def _entries(body: bytes, minimum: int, what: str):
    """(offset, length) of each entry of a multipart reply body whose entries start with
    their u16 length."""
    pos = 0
    while pos < len(body):
        _need(body[pos:], minimum, what)
        length = struct.unpack_from("!H", body, pos)[0]
        if length < minimum or pos + length > len(body):
            raise DecodeError(f"{what} of length {length} does not fit")
        yield pos, length
        pos += length


def _meter_stats(xid: int, body: bytes, version: int) -> MeterStats:
    stats = MeterStats(xid)
    pos = 0
    while pos < len(body):
        _need(body[pos:], 40, "meter stats entry")
        (meter_id, length, flow_count, packet_in_count, byte_in_count, duration_sec,
         duration_nsec) = struct.unpack_from("!IH6xIQQII", body, pos)
        if length < 40 or pos + length > len(body) or (length - 40) % 16:
            raise DecodeError(f"meter stats entry of length {length} does not fit")
        bands = tuple(struct.unpack_from("!QQ", body, band)
                      for band in range(pos + 40, pos + length, 16))
        stats.meters[meter_id] = MeterStat(flow_count, packet_in_count, byte_in_count,
                                           duration_sec, duration_nsec, bands)
        pos += length
    return stats


def _known(count: int) -> int | None:
    return None if count == UNKNOWN_COUNT else count


def _flow_stats(xid: int, body: bytes, version: int) -> FlowStats:
    stats = FlowStats(xid)
    if version >= OFP15:
        for pos, length in _entries(body, 24, "flow desc entry"):
            stats.flows.append(_flow_desc15(body[pos:pos + length]))
        return stats
    for pos, length in _entries(body, 56, "flow stats entry"):
        (_, table_id, duration_sec, duration_nsec, priority, idle_timeout, hard_timeout,
         flags, importance, cookie, packet_count,
         byte_count) = struct.unpack_from("!HBxIIHHHHH2xQQQ", body, pos)
        entry = body[pos:pos + length]
        match, instructions_at = decode_match(entry, 48)
        stats.flows.append(FlowEntry(
            table_id, priority, cookie, match, decode_instructions(entry[instructions_at:]),
            _known(packet_count), _known(byte_count), duration_sec, duration_nsec, None,
            idle_timeout, hard_timeout, flags, importance))
    return stats


def _flow_desc15(entry: bytes) -> FlowEntry:
    """An ofp15_flow_desc: header, match, OXS statistics (ofp_oxs_stat), instructions."""
    (table_id, priority, idle_timeout, hard_timeout, flags, importance,
     cookie) = struct.unpack_from("!4xBxHHHHHQ", entry)
    match, stats_at = decode_match(entry, 24)
    _need(entry[stats_at:], 4, "OXS statistics")
    stats_length = struct.unpack_from("!2xH", entry, stats_at)[0]
    padded = stats_length + (-stats_length % 8)
    if stats_length < 4 or stats_at + padded > len(entry):
        raise DecodeError(f"OXS statistics of length {stats_length} do not fit")
    oxs = _oxs_fields(entry[stats_at + 4:stats_at + stats_length])
    duration = oxs.get(OFPXST_DURATION)
    idle = oxs.get(OFPXST_IDLE_TIME)
    return FlowEntry(
        table_id, priority, cookie, match, decode_instructions(entry[stats_at + padded:]),
        oxs.get(OFPXST_PACKET_COUNT), oxs.get(OFPXST_BYTE_COUNT),
        None if duration is None else duration >> 32,
        None if duration is None else duration & 0xFFFFFFFF,
        None if idle is None else idle >> 32, idle_timeout, hard_timeout, flags, importance)


def _oxs_fields(data: bytes) -> dict[int, int]:
    """OXS fields of the basic class, field -> value (durations: seconds << 32 | ns, as OVS
    writes them); other classes are skipped."""
    fields, pos = {}, 0
    while pos < len(data):
        _need(data[pos:], 4, "OXS field header")
        header = struct.unpack_from("!I", data, pos)[0]
        oxs_class, number, length = header >> 16, (header >> 9) & 0x7F, header & 0xFF
        if pos + 4 + length > len(data):
            raise DecodeError(f"OXS field {oxs_class:#06x}:{number} claims {length} bytes, "
                              f"{len(data) - pos - 4} left")
        if oxs_class == OFPXSC_OPENFLOW_BASIC:
            fields[number] = int.from_bytes(data[pos + 4:pos + 4 + length], "big")
        pos += 4 + length
    return fields


def decode_instructions(data: bytes) -> Instructions:
    """Either version's instructions (see `Instructions`)."""
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
            if actions and isinstance(actions[0], RawAction) and \
                    struct.unpack_from("!HH", actions[0].data) == (OFPAT_METER, 8):
                meter_id = struct.unpack_from("!I", actions[0].data, 4)[0]
                actions = actions[1:]
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


def _meter_config(xid: int, body: bytes, version: int) -> MeterConfig:
    config = MeterConfig(xid)
    for pos, length in _entries(body, 8, "meter config entry"):
        flags, meter_id = struct.unpack_from("!HI", body, pos + 2)
        bands = tuple(struct.unpack_from("!HxxII", body, band)
                      for band in range(pos + 8, pos + length - 15, 16))
        config.meters[meter_id] = (flags, bands)
    return config


def _table_features(xid: int, body: bytes, version: int) -> TableFeatures:
    features = TableFeatures(xid)
    for pos, length in _entries(body, 64, "table features entry"):
        table_id = body[pos + 2]
        name = body[pos + 8:pos + 40].split(b"\0", 1)[0].decode("utf-8", "replace")
        features.tables.append(TableFeature(table_id, name, body[pos:pos + length]))
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
