"""The connection store: what each poll means for export.

A poll brings 10k-500k connections of which a few percent are new, gone, changed or due, so
the store is built for the unchanged majority, in time and in memory:

- State lives in columns indexed by a slot number (`array`s of machine numbers, bytearrays
  of flags), not in an object per connection: a tracked connection costs its identity, one
  packed bytes of what a record needs and never changes, and ~90 bytes of columns. The
  polled `Connection` objects are dropped as soon as they are read.
- One dict maps each connection's identity (`Connection.key`: zone and original tuple, as
  the source's own bytes) to its slot. Per polled connection the loop does a dict lookup
  and three comparisons; Python code beyond that runs only for connections that are new,
  reused, changed, ended, gone or due.
- A heap ordered by each slot's next deadline (active or idle timeout, whichever is first)
  says which are due: O(log n) per export, no scan of timers. Deadlines only ever move later
  (activity pushes the idle one, an export the active one, a new entry in the slot starts
  later still), so a popped slot whose deadline moved is pushed again: one heap item per
  slot, whatever comes and goes. An item is one int, the deadline in milliseconds (rounded
  up) above the slot number: a third of the memory of a (float, slot) tuple, and faster
  to compare. The columns hold the exact times; the heap only says when to look.
"""

from __future__ import annotations

import heapq
import logging
import struct
from array import array
from collections.abc import Callable, Iterable

from .connection import Connection
from .enrich import NO_PODS, Enricher
from .record import (
    ACTIVE_TIMEOUT, CONNTRACK, CONNTRACK_UNCOUNTED, END_OF_FLOW, FORCED_END, IDLE_TIMEOUT,
    FlowRecord,
)

log = logging.getLogger(__name__)

# What a record needs of a connection that stays the same for its conntrack id, packed:
# protocol, ports, ICMP type and code, start time, counted; then source and destination.
_FIXED = struct.Struct("=BHHBBQ?")
_ADDRESSES = _FIXED.size


def _fixed(c: Connection) -> bytes:
    return _FIXED.pack(c.protocol, c.source_port, c.destination_port, c.icmp_type,
                       c.icmp_code, c.start_ns, c.counted) + c.source + c.destination


class ConnectionStore:
    def __init__(self, active_timeout: float, idle_timeout: float,
                 max_connections: int = 500_000, enricher: Enricher | None = None):
        self.active_timeout = active_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.enricher = enricher  # Pods, flowType, rule ids; None: addresses only
        # What `update` and `flush` put records in: a list, or what the agent sets, the
        # exporter's `RecordEncoder`, which encodes them batch by batch as they are made, so
        # that a poll with the whole table due never holds all its records as objects.
        self.new_records: Callable[[], list[FlowRecord]] = list
        self.rejected = 0  # connections not tracked because the store was full
        self._slot_bits = max_connections.bit_length()
        self._clear()

    def _clear(self) -> None:
        self._slots: dict[bytes, int] = {}  # identity -> slot
        # The columns, indexed by slot. A free slot has key None.
        self._keys: list[bytes | None] = []
        self._fixed: list[bytes | None] = []
        self._ids = array("I")  # conntrack id
        self._states: list[str] = []
        self._labels: list[bytes] = []
        self._pods: list[tuple] = []  # the Pods at the two ends, as last known (Enricher)
        # counters as last polled, and as last exported
        self._packets, self._octets = array("Q"), array("Q")
        self._reply_packets, self._reply_octets = array("Q"), array("Q")
        self._exported_packets, self._exported_octets = array("Q"), array("Q")
        self._exported_reply_packets, self._exported_reply_octets = array("Q"), array("Q")
        self._first_seen, self._last_activity, self._last_export = (
            array("d"), array("d"), array("d"))
        self._occupied = bytearray()  # 1: a connection is there
        self._ended = bytearray()  # 1: its end was exported
        self._scheduled = bytearray()  # 1: a heap item waits for this slot
        self._free: list[int] = []
        self._heap: list[int] = []  # deadline in ms << _slot_bits | slot
        self._previous_poll: float | None = None  # when every tracked connection was seen

    def __len__(self) -> int:
        return len(self._slots)

    def update(self, connections: Iterable[Connection], now: float) -> list[FlowRecord]:
        """Take one poll's connections (already filtered); return the records now due."""
        records = self.new_records()
        unseen = bytearray(self._occupied)  # 1 for tracked slots this poll has not seen
        get, ids, scheduled = self._slots.get, self._ids, self._scheduled
        packets, octets = self._packets, self._octets
        reply_packets, reply_octets = self._reply_packets, self._reply_octets
        states, labels, last_activity = self._states, self._labels, self._last_activity
        rejected = 0
        reused: list[tuple[int, Connection]] = []
        moved: list[int] = []  # active again, not scheduled
        ended: list[int] = []
        # The loop runs once per polled connection: only what the unchanged majority needs.
        # (A plain loop: CPython 3.11 runs it faster than `map` over item getters.)
        for c in connections:
            slot = get(c.key)
            if slot is None:  # new, taken at once: a first poll holds no copy of the table
                if len(self._slots) < self.max_connections:
                    self._add(c, now, unseen, ended)
                else:
                    rejected += 1
                continue
            unseen[slot] = 0
            if c.id != ids[slot]:
                reused.append((slot, c))
                continue
            if (c.packets != packets[slot] or c.reply_packets != reply_packets[slot]
                    or not c.counted):  # without counters, present counts as active
                # Activity. State and labels change only with packets: read them too.
                packets[slot], octets[slot] = c.packets, c.octets
                reply_packets[slot], reply_octets[slot] = c.reply_packets, c.reply_octets
                states[slot], labels[slot] = c.state, c.labels
                last_activity[slot] = now
                if not scheduled[slot]:
                    moved.append(slot)
            if c.ended:
                ended.append(slot)
        for slot in moved:
            if not self._ended[slot]:
                self._schedule(slot)
        for slot, c in reused:
            # The same tuple under a new conntrack id: the old entry ended between polls.
            if ids[slot] == c.id:
                continue  # the new entry twice in this poll (a retried dump): taken once
            if not self._ended[slot]:
                end = max(self._previous_poll or 0.0, self._first_seen[slot])
                records.append(self._record(slot, END_OF_FLOW, end))
            self._fill(slot, c, now)
            if not scheduled[slot]:  # else the waiting heap item serves the new entry
                self._schedule(slot)
            if c.ended:
                ended.append(slot)
        if rejected:
            self.rejected += rejected
            log.warning("connection store full (%d connections): %d new connections not "
                        "tracked (%d so far); raise conntrack.maxConnections", len(self),
                        rejected, self.rejected)
        for slot in ended:
            if not self._ended[slot]:
                self._ended[slot] = 1
                records.append(self._record(slot, END_OF_FLOW, now))
        self._remove_gone(unseen, records)
        self._previous_poll = now
        self._expired(now, records)
        return records

    def flush(self, now: float) -> list[FlowRecord]:
        """Final records for every live connection (the agent is stopping)."""
        records = self.new_records()
        for slot in self._slots.values():
            if not self._ended[slot]:
                records.append(self._record(slot, FORCED_END, now))
        self._clear()
        return records

    def _add(self, c: Connection, now: float, unseen: bytearray, ended: list[int]) -> None:
        if self._free:
            slot = self._free.pop()
            self._keys[slot] = c.key
        else:
            slot = len(self._keys)
            self._keys.append(c.key)
            self._fixed.append(None)
            self._states.append("")
            self._labels.append(b"")
            self._pods.append(NO_PODS)
            for column in (self._ids, self._packets, self._octets, self._reply_packets,
                           self._reply_octets, self._exported_packets, self._exported_octets,
                           self._exported_reply_packets, self._exported_reply_octets,
                           self._first_seen, self._last_activity, self._last_export,
                           self._occupied, self._ended, self._scheduled, unseen):
                column.append(0)
        self._slots[c.key] = slot
        self._occupied[slot] = 1
        self._fill(slot, c, now)
        if not self._scheduled[slot]:  # else a free slot's heap item serves it
            self._schedule(slot)
        if c.ended:
            ended.append(slot)

    def _fill(self, slot: int, c: Connection, now: float) -> None:
        """A conntrack entry starts in `slot`."""
        self._fixed[slot] = _fixed(c)
        self._ids[slot] = c.id
        self._states[slot], self._labels[slot] = c.state, c.labels
        self._pods[slot] = NO_PODS
        self._packets[slot], self._octets[slot] = c.packets, c.octets
        self._reply_packets[slot], self._reply_octets[slot] = c.reply_packets, c.reply_octets
        self._exported_packets[slot] = self._exported_octets[slot] = 0
        self._exported_reply_packets[slot] = self._exported_reply_octets[slot] = 0
        self._first_seen[slot] = self._last_activity[slot] = self._last_export[slot] = now
        self._ended[slot] = 0

    def _remove_gone(self, unseen: bytearray, records: list[FlowRecord]) -> None:
        """Connections absent from this poll ended in between: one last record each, with
        the counters and the time of the previous poll, the last that saw them."""
        slot = unseen.find(1)
        while slot >= 0:
            if not self._ended[slot]:
                records.append(self._record(slot, END_OF_FLOW, self._previous_poll))
            del self._slots[self._keys[slot]]
            self._keys[slot] = self._fixed[slot] = None
            self._labels[slot], self._pods[slot] = b"", NO_PODS
            self._occupied[slot] = 0
            self._free.append(slot)  # a heap item for it serves the next connection there
            slot = unseen.find(1, slot + 1)

    def _schedule(self, slot: int) -> None:
        active = self._last_export[slot] + self.active_timeout
        idle = self._last_activity[slot] + self.idle_timeout
        deadline = active if active < idle else idle
        heapq.heappush(self._heap, -int(-deadline * 1000 // 1) << self._slot_bits | slot)
        self._scheduled[slot] = 1

    def _expired(self, now: float, records: list[FlowRecord]) -> None:
        heap, keys, ended, scheduled = self._heap, self._keys, self._ended, self._scheduled
        last_activity, last_export = self._last_activity, self._last_export
        active_timeout, idle_timeout = self.active_timeout, self.idle_timeout
        pop, push, record = heapq.heappop, heapq.heappush, self._record
        bits = self._slot_bits
        slot_mask = (1 << bits) - 1
        # Items due by the ms: deadlines were rounded up, so none pops before its time and
        # none pushed again below comes back in this loop.
        due = (int(now * 1000 // 1) + 1) << bits
        while heap and heap[0] < due:
            slot = pop(heap) & slot_mask
            if keys[slot] is None or ended[slot]:
                scheduled[slot] = 0
                continue
            active = last_export[slot] + active_timeout
            idle = last_activity[slot] + idle_timeout
            deadline = active if active < idle else idle
            if deadline <= now:
                if idle <= now:  # exported and left unscheduled until it moves again
                    records.append(record(slot, IDLE_TIMEOUT, now))
                    scheduled[slot] = 0
                    continue
                records.append(record(slot, ACTIVE_TIMEOUT, now))
                deadline = now + active_timeout
                if idle < deadline:
                    deadline = idle
            # moved by activity or by this export
            push(heap, -int(-deadline * 1000 // 1) << bits | slot)

    def _record(self, slot: int, reason: int, end: float) -> FlowRecord:
        """The record of the connection in `slot` now. Deltas are counted since its previous
        record. A counter lower than last exported means the counters were reset in between
        (an operator's `conntrack -L -z` zeroes them all at once): then the deltas are the
        new totals, what the connection moved since the reset, never negative (as Antrea)."""
        fixed = self._fixed[slot]
        protocol, source_port, destination_port, icmp_type, icmp_code, start_ns, counted = \
            _FIXED.unpack_from(fixed)
        length = (len(fixed) - _ADDRESSES) >> 1
        start_ms = start_ns // 1_000_000 if start_ns else int(self._first_seen[slot] * 1000)
        end_ms = int(end * 1000)
        packets, octets = self._packets[slot], self._octets[slot]
        reply_packets, reply_octets = self._reply_packets[slot], self._reply_octets[slot]
        last_packets, last_octets = self._exported_packets[slot], self._exported_octets[slot]
        last_reply_packets = self._exported_reply_packets[slot]
        last_reply_octets = self._exported_reply_octets[slot]
        if (packets < last_packets or octets < last_octets
                or reply_packets < last_reply_packets or reply_octets < last_reply_octets):
            last_packets = last_octets = last_reply_packets = last_reply_octets = 0
        self._exported_packets[slot], self._exported_octets[slot] = packets, octets
        self._exported_reply_packets[slot] = reply_packets
        self._exported_reply_octets[slot] = reply_octets
        self._last_export[slot] = end
        source, destination = fixed[_ADDRESSES:_ADDRESSES + length], fixed[_ADDRESSES + length:]
        record = FlowRecord(
            CONNTRACK if counted else CONNTRACK_UNCOUNTED, source, destination, protocol,
            source_port, destination_port, icmp_type, icmp_code, start_ms, end_ms,
            start_ms // 1000, end_ms // 1000, reason, packets, octets, packets - last_packets,
            octets - last_octets, reply_packets, reply_octets, reply_packets - last_reply_packets,
            reply_octets - last_reply_octets, self._ids[slot], 0,
            self._states[slot] if protocol == 6 else "", labels=self._labels[slot])
        enricher = self.enricher
        if enricher is not None:
            pods = self._pods[slot] = enricher.pods(source, destination, self._pods[slot])
            enricher(record, pods)
        return record
