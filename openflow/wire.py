"""What every OpenFlow message of this codec shares: the version numbers, the header, the
constants of OpenFlow 1.3/1.5 and of the Nicira extensions, the errors, and the small
helpers the encoders and decoders of `messages`, `actions` and `multipart` are built on."""

from __future__ import annotations

import struct
from dataclasses import dataclass

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


def framed(message_type: int, xid: int, body: bytes = b"", *, version: int) -> bytes:
    if version not in VERSIONS:
        raise ValueError(f"OpenFlow version {version:#04x} is not one this codec speaks")
    return HEADER.pack(version, message_type, HEADER.size + len(body), xid) + body


def nicira(xid: int, subtype: int, body: bytes, *, version: int) -> bytes:
    return framed(OFPT_EXPERIMENTER, xid, struct.pack("!II", NX_VENDOR_ID, subtype) + body,
                  version=version)


@dataclass
class Message:
    xid: int


def need(body: bytes, size: int, what: str) -> None:
    if len(body) < size:
        raise DecodeError(f"{what} needs {size} bytes, has {len(body)}")


def int_property(values: dict[int, bytes], prop: int, width: int, default: int) -> int:
    """An integer property: its first `width` bytes (OVS counts the padding of a u8 or u16
    property in its length)."""
    raw = values.get(prop)
    if raw is None:
        return default
    if len(raw) < width:
        raise DecodeError(f"property {prop} has {len(raw)} bytes, needs {width}")
    return int.from_bytes(raw[:width], "big")
