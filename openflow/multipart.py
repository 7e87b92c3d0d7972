"""Multipart requests and replies: flow stats, meter stats and configuration, table
features. The requests are the same in 1.3 and 1.5; a 1.5 flow stats entry is an
ofp15_flow_desc whose counters are OXS fields (lib/ofp-flow.c, lib/ox-stat.c)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .actions import Instructions, decode_instructions
from .oxm import Field, decode_match, encode_match
from .wire import (
    OFP15, OFPG_ANY, OFPM_ALL, OFPMP_FLOW, OFPMP_METER, OFPMP_METER_CONFIG,
    OFPMP_TABLE_FEATURES, OFPP_ANY, OFPT_MULTIPART_REQUEST, OFPTT_ALL, OFPXSC_OPENFLOW_BASIC,
    OFPXST_BYTE_COUNT, OFPXST_DURATION, OFPXST_IDLE_TIME, OFPXST_PACKET_COUNT, UNKNOWN_COUNT,
    DecodeError, Message, framed, need,
)


def _multipart(xid: int, multipart_type: int, body: bytes = b"", flags: int = 0, *,
               version: int) -> bytes:
    return framed(OFPT_MULTIPART_REQUEST, xid,
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


def _entries(body: bytes, minimum: int, what: str):
    """(offset, length) of each entry of a multipart reply body whose entries start with
    their u16 length."""
    pos = 0
    while pos < len(body):
        need(body[pos:], minimum, what)
        length = struct.unpack_from("!H", body, pos)[0]
        if length < minimum or pos + length > len(body):
            raise DecodeError(f"{what} of length {length} does not fit")
        yield pos, length
        pos += length


def _meter_stats(xid: int, body: bytes, version: int) -> MeterStats:
    stats = MeterStats(xid)
    pos = 0
    while pos < len(body):
        need(body[pos:], 40, "meter stats entry")
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
    need(entry[stats_at:], 4, "OXS statistics")
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
        need(data[pos:], 4, "OXS field header")
        header = struct.unpack_from("!I", data, pos)[0]
        oxs_class, number, length = header >> 16, (header >> 9) & 0x7F, header & 0xFF
        if pos + 4 + length > len(data):
            raise DecodeError(f"OXS field {oxs_class:#06x}:{number} claims {length} bytes, "
                              f"{len(data) - pos - 4} left")
        if oxs_class == OFPXSC_OPENFLOW_BASIC:
            fields[number] = int.from_bytes(data[pos + 4:pos + 4 + length], "big")
        pos += 4 + length
    return fields


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


# multipart type -> decoder of its reply body (`messages.decode` dispatches here)
DECODERS = {OFPMP_FLOW: _flow_stats, OFPMP_METER: _meter_stats,
            OFPMP_METER_CONFIG: _meter_config, OFPMP_TABLE_FEATURES: _table_features}
