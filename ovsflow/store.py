"""The connection store: what each poll means for export.

Keyed by (zone, original tuple). Each poll updates counters and state; a heap ordered by each
connection's next expiry (active or idle timeout, whichever is first) says which connections
are due, so a poll costs O(connections seen) plus O(log n) per export, not a scan of
timers. Deadlines only ever move later (activity pushes the idle one, an export the active
one), so a popped entry whose deadline moved is simply pushed again: one heap item per entry.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable

from .record import (
    ACTIVE_TIMEOUT, CONNTRACK, CONNTRACK_UNCOUNTED, END_OF_FLOW, FORCED_END, IDLE_TIMEOUT,
    FlowRecord,
)
from .connection import Connection
from .source.ctnetlink import IPS_DYING

log = logging.getLogger(__name__)

# States after which a connection carries no more traffic worth waiting for: kernel and
# OVS userspace names.
ENDED_STATES = frozenset({"TIME_WAIT", "CLOSE", "CLOSED"})


class _Entry:
    __slots__ = ("connection", "first_seen", "last_seen", "last_activity", "last_export",
                 "exported_packets", "exported_octets", "exported_reply_packets",
                 "exported_reply_octets", "ended", "scheduled")

    def __init__(self, connection: Connection, now: float):
        self.connection = connection
        self.first_seen = self.last_seen = self.last_activity = self.last_export = now
        self.exported_packets = self.exported_octets = 0
        self.exported_reply_packets = self.exported_reply_octets = 0
        self.ended = False
        self.scheduled = False


class ConnectionStore:
    def __init__(self, active_timeout: float, idle_timeout: float,
                 max_connections: int = 500_000):
        self.active_timeout = active_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.rejected = 0  # connections not tracked because the store was full
        self._entries: dict[tuple, _Entry] = {}
        self._heap: list[tuple[float, int, tuple]] = []
        self._sequence = 0  # heap tie-breaker: keys are not comparable across kinds

    def __len__(self) -> int:
        return len(self._entries)

    def update(self, connections: Iterable[Connection], now: float) -> list[FlowRecord]:
        """Take one poll's connections (already filtered); return the records now due."""
        entries, get = self._entries, self._entries.get
        records: list[FlowRecord] = []
        seen: list[tuple] = []
        keep = seen.append
        rejected = 0
        for c in connections:
            # the connection's identity: zone and original tuple
            key = (c.zone, c.protocol, c.source, c.destination, c.source_port,
                   c.destination_port, c.icmp_id, c.icmp_type)
            keep(key)
            entry = get(key)
            if entry is not None and c.id != entry.connection.id:
                # The same tuple, a new conntrack entry: the old one ended between polls.
                if not entry.ended:
                    records.append(self._record(entry, END_OF_FLOW, entry.last_seen))
                entry = None
            if entry is None:
                if len(entries) >= self.max_connections:
                    rejected += 1
                    continue
                entry = entries[key] = _Entry(c, now)
                self._schedule(entry, key)
            else:
                previous = entry.connection
                if (not c.counted or c.packets != previous.packets
                        or c.reply_packets != previous.reply_packets):
                    entry.last_activity = now
                    if not entry.scheduled and not entry.ended:
                        self._schedule(entry, key)
                entry.connection = c
                entry.last_seen = now
            if not entry.ended and (c.state in ENDED_STATES or c.status & IPS_DYING):
                entry.ended = True
                records.append(self._record(entry, END_OF_FLOW, now))
        if rejected:
            self.rejected += rejected
            log.warning("connection store full (%d connections): %d new connections not "
                        "tracked (%d so far); raise conntrack.maxConnections", len(entries),
                        rejected, self.rejected)
        records += self._remove_gone(entries.keys() - set(seen))
        records += self._expired(now)
        return records

    def flush(self, now: float) -> list[FlowRecord]:
        """Final records for every live connection (the agent is stopping)."""
        records = [self._record(entry, FORCED_END, now)
                   for entry in self._entries.values() if not entry.ended]
        self._entries.clear()
        self._heap.clear()
        return records

    def _remove_gone(self, gone: set[tuple]) -> list[FlowRecord]:
        """Connections absent from this poll ended in between: one last record each, with
        the counters last seen."""
        records = []
        for key in gone:
            entry = self._entries.pop(key)
            if not entry.ended:
                records.append(self._record(entry, END_OF_FLOW, entry.last_seen))
        return records

    def _deadline(self, entry: _Entry) -> float:
        active = entry.last_export + self.active_timeout
        idle = entry.last_activity + self.idle_timeout
        return active if active < idle else idle

    def _schedule(self, entry: _Entry, key: tuple) -> None:
        self._sequence += 1
        heapq.heappush(self._heap, (self._deadline(entry), self._sequence, key))
        entry.scheduled = True

    def _expired(self, now: float) -> list[FlowRecord]:
        heap, records = self._heap, []
        while heap and heap[0][0] <= now:
            _, _, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is None or entry.ended:
                continue
            entry.scheduled = False
            if self._deadline(entry) > now:  # activity or an export moved it
                self._schedule(entry, key)
            elif now - entry.last_activity >= self.idle_timeout:
                # Exported and left unscheduled until it moves again.
                records.append(self._record(entry, IDLE_TIMEOUT, now))
            else:
                records.append(self._record(entry, ACTIVE_TIMEOUT, now))
                self._schedule(entry, key)
        return records

    def _record(self, entry: _Entry, reason: int, end: float) -> FlowRecord:
        c = entry.connection
        start_ms = c.start_ns // 1_000_000 if c.start_ns else int(entry.first_seen * 1000)
        end_ms = int(end * 1000)
        record = FlowRecord(
            CONNTRACK if c.counted else CONNTRACK_UNCOUNTED, c.source, c.destination,
            c.protocol, c.source_port, c.destination_port, c.icmp_type, c.icmp_code,
            start_ms, end_ms, start_ms // 1000, end_ms // 1000, reason,
            c.packets, c.octets, c.packets - entry.exported_packets,
            c.octets - entry.exported_octets, c.reply_packets, c.reply_octets,
            c.reply_packets - entry.exported_reply_packets,
            c.reply_octets - entry.exported_reply_octets, c.id,
            tcp_state=c.state if c.protocol == 6 else "")
        entry.exported_packets, entry.exported_octets = c.packets, c.octets
        entry.exported_reply_packets, entry.exported_reply_octets = c.reply_packets, c.reply_octets
        entry.last_export = end
        return record
