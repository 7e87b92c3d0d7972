"""Denied packets aggregated per connection and deny rule, exported while packets come: at
most one record per active timeout and only when new packets arrived since the previous one,
then one final idle-timeout record when they have stopped for the idle timeout.

A record's end is the time of the last packet it counts (IPFIX's flowEnd), never earlier
than the previous record's end: within a flow, flowEnd does not go backwards even if the
wall clock does."""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence

import numpy as np

from ..enrich import NO_PODS, Enricher
from ..record import ACTIVE_TIMEOUT, DENY, FORCED_END, IDLE_TIMEOUT, RULE_DROP, FlowRecord
from .packet import DeniedPacket

log = logging.getLogger(__name__)

# Which elements of a record name the rule: the rule's direction, when the pipeline tells it
INGRESS, EGRESS = 1, 0
BOTH = -1  # denySource table: the pipeline tells the rule (reg3), not its direction
NEITHER = -2  # denySource antrea, a table that tells no direction: never guessed

# An entry in the export state: its key (`_STATE_KEY` then the two addresses) and a row.
_STATE_KEY = struct.Struct(">BHHBBIbB")  # protocol, ports, ICMP, rule id, direction, action
STATE_ROW = np.dtype([("first", "<f8"), ("last", "<f8"), ("last_export", "<f8"),
                      ("last_end", "<f8"), ("packets", "<u8"), ("octets", "<u8"),
                      ("exported_packets", "<u8"), ("exported_octets", "<u8")])


class _Denied:
    __slots__ = ("packet", "rule_id", "direction", "action", "first", "last", "last_export",
                 "last_end", "packets", "octets", "exported_packets", "exported_octets", "pods",
                 "identity")

    def __init__(self, packet: DeniedPacket, rule_id: int, direction: int, action: int,
                 now: float):
        self.packet, self.rule_id, self.direction = packet, rule_id, direction
        self.action = action
        # its key in the export state, and its records' identity in the export queues
        self.identity = _STATE_KEY.pack(
            packet.protocol, packet.source_port, packet.destination_port, packet.icmp_type,
            packet.icmp_code, rule_id, direction, action) + packet.source + packet.destination
        self.first = self.last = self.last_export = self.last_end = now
        self.packets = self.octets = self.exported_packets = self.exported_octets = 0
        self.pods = NO_PODS  # as last known (Enricher)


class DenyStore:
    def __init__(self, active_timeout: float, idle_timeout: float, max_entries: int,
                 enricher: Enricher | None = None):
        self.active_timeout, self.idle_timeout = active_timeout, idle_timeout
        self.enricher = enricher  # Pods and flowType; None: addresses only
        self.max_entries = max_entries
        self.rejected = 0
        self._entries: dict[tuple, _Denied] = {}
        # (start, end) -> the share of denied packets the packet-in meter let through then
        self.sampling: Callable[[float, float], float] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, packet: DeniedPacket, rule_id: int, now: float, direction: int = BOTH,
            action: int = RULE_DROP) -> None:
        """One denied packet. `direction`: INGRESS or EGRESS, the direction of the rule that
        denied it, when the pipeline tells it; BOTH (the ingress and egress elements carry
        the rule) or NEITHER; `action`: RULE_DROP or RULE_REJECT. `rule_id` 0: none."""
        key = (packet.source, packet.destination, packet.protocol, packet.source_port,
               packet.destination_port, packet.icmp_type, packet.icmp_code, rule_id,
               direction, action)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.max_entries:
                self.rejected += 1
                if self.rejected % 1000 == 1:
                    log.warning("deny store full (%d): %d denied packets not aggregated so far;"
                                " raise ovs.maxDenyConnections", self.max_entries, self.rejected)
                return
            entry = self._entries[key] = _Denied(packet, rule_id, direction, action, now)
            if self.enricher is not None:  # the Pods as first seen (see Enricher.pods)
                entry.pods = self.enricher.pods(packet.source, packet.destination)
        entry.packets += 1
        entry.octets += packet.ip_length
        entry.last = now

    def expired(self, now: float) -> list[FlowRecord]:
        """Idle entries end with one record and are removed; active ones with new packets
        since their last record get an active-timeout record; quiet ones get nothing."""
        records, idle = [], []
        for key, entry in self._entries.items():
            if now - entry.last >= self.idle_timeout:
                records.append(self._record(entry, IDLE_TIMEOUT, now))
                idle.append(key)
            elif (entry.packets > entry.exported_packets
                  and now - entry.last_export >= self.active_timeout):
                records.append(self._record(entry, ACTIVE_TIMEOUT, now))
        for key in idle:
            del self._entries[key]
        return records

    def flush(self, now: float, continued: bool = False) -> list[FlowRecord]:
        """Final records (the agent is stopping). `continued`: the next agent takes the
        entries over from the export state, so only those with packets not yet exported get
        a record, an active-timeout one; otherwise every entry ends here (forced end)."""
        if continued:
            return [self._record(entry, ACTIVE_TIMEOUT, now) for entry in
                    self._entries.values() if entry.packets > entry.exported_packets]
        return [self._record(entry, FORCED_END, now) for entry in self._entries.values()]

    def snapshot(self) -> tuple[list[bytes], np.ndarray]:
        """Each entry's key and `STATE_ROW`, for the export state."""
        entries = list(self._entries.values())
        rows = np.array([(e.first, e.last, e.last_export, e.last_end, e.packets, e.octets,
                          e.exported_packets, e.exported_octets) for e in entries], STATE_ROW)
        return [e.identity for e in entries], rows

    def restore(self, keys: Sequence[bytes], rows: np.ndarray) -> int:
        """Continue a previous agent's entries (`snapshot`): same start, the packets it
        had not exported yet still to be exported. Returns how many."""
        restored = 0
        for key, row in zip(keys, rows.tolist()):
            if len(self._entries) >= self.max_entries:
                break
            (protocol, source_port, destination_port, icmp_type, icmp_code, rule_id, direction,
             action) = _STATE_KEY.unpack_from(key)
            length = (len(key) - _STATE_KEY.size) // 2
            if length not in (4, 16) or direction not in (INGRESS, EGRESS, BOTH, NEITHER):
                continue
            source = key[_STATE_KEY.size:_STATE_KEY.size + length]
            destination = key[_STATE_KEY.size + length:]
            packet = DeniedPacket(source, destination, protocol, source_port, destination_port,
                                  icmp_type, icmp_code, 0)
            entry = _Denied(packet, rule_id, direction, action, row[0])
            (entry.first, entry.last, entry.last_export, entry.last_end, entry.packets,
             entry.octets, entry.exported_packets, entry.exported_octets) = row
            if self.enricher is not None:
                entry.pods = self.enricher.pods(source, destination)
            self._entries[(source, destination, protocol, source_port, destination_port,
                           icmp_type, icmp_code, rule_id, direction, action)] = entry
            restored += 1
        return restored

    def _record(self, entry: _Denied, reason: int, now: float) -> FlowRecord:
        p = entry.packet
        entry.last_end = end = max(entry.last, entry.last_end)
        start_ms, end_ms = int(entry.first * 1000), int(end * 1000)
        rule = str(entry.rule_id) if entry.rule_id else ""
        ingress = entry.direction in (INGRESS, BOTH)
        egress = entry.direction in (EGRESS, BOTH)
        record = FlowRecord(
            DENY, p.source, p.destination, p.protocol, p.source_port, p.destination_port,
            p.icmp_type, p.icmp_code, start_ms, end_ms, start_ms // 1000, end_ms // 1000,
            reason, entry.packets, entry.octets, entry.packets - entry.exported_packets,
            entry.octets - entry.exported_octets,
            ingress_rule_action=entry.action if ingress else 0,
            egress_rule_action=entry.action if egress else 0,
            ingress_rule_name=rule if ingress else "", egress_rule_name=rule if egress else "",
            sampling_probability=self.sampling(entry.last_export, now) if self.sampling else 1.0,
            identity=entry.identity)
        entry.exported_packets, entry.exported_octets = entry.packets, entry.octets
        entry.last_export = now
        if self.enricher is not None:
            entry.pods = self.enricher.pods(p.source, p.destination, entry.pods)
            self.enricher(record, entry.pods)
        return record
