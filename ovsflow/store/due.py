"""Which tracked connections are due a record, and why (the record's flowEndReason).

A record is sent only when it says something. A connection gets its first record
`active_timeout` after it is first seen, then one each `active_timeout` while it moves
(active timeout: its counters or its state changed since its previous record), one when it
has moved no packet for `idle_timeout` (idle timeout; then none until it moves again: it
is *quiet*), and a last one when it ends (end of flow): when its source says so, when it is
gone from a poll (with the counters and the time of the previous poll, the last that saw
it), or when its tuple comes back as another connection. A connection that did not move
since its previous record gets none at its active timeout; with a `heartbeat`, every live
connection, quiet ones too, gets a record at least that often (active timeout). When the
agent stops, every live connection gets a final record (forced end), or, when the next
agent continues from the export state, only those that moved since their last one (the
rule of the active timeout, applied at once).

Each decision is a few array operations over the table's columns, never a loop per
connection, and comes as a `DueGroup` for `RecordMaker.emit`.
"""

from __future__ import annotations

import numpy as np

from ..record import ACTIVE_TIMEOUT, END_OF_FLOW, FORCED_END, IDLE_TIMEOUT
from .table import ConnectionTable

# Slots due a record, their end reason and their end time (one each, or one for all)
DueGroup = tuple[np.ndarray, int | np.ndarray, float | np.ndarray]
_PART = 16384


class DueRecords:
    def __init__(self, table: ConnectionTable, active_timeout: float, idle_timeout: float,
                 heartbeat: float = 0.0):
        self.table = table
        self.active_timeout = active_timeout
        self.idle_timeout = idle_timeout
        self.heartbeat = heartbeat  # 0: none

    def of_poll(self, ended: list[np.ndarray], gone: np.ndarray, now: float
                ) -> list[DueGroup]:
        """A poll's records: the connections its source said `ended` (each once), those
        `gone` from it, and those at their idle or active timeout."""
        table = self.table
        exported_end = np.asarray(table.ended)
        due: list[DueGroup] = []
        slots = np.concatenate(ended) if ended else np.zeros(0, np.int64)
        if len(slots):
            slots = np.unique(slots)
            slots = slots[exported_end[slots] == 0]
            exported_end[slots] = 1
            due.append((slots, END_OF_FLOW, now))
        # Connections absent from this poll ended in between: one last record each, with
        # the counters and the time of the previous poll, the last that saw them.
        due.append((gone[exported_end[gone] == 0], END_OF_FLOW, table.previous_poll or now))
        due += self._expired(now, gone)
        return due

    def replaced(self, slots: np.ndarray, now: float) -> DueGroup:
        """Connections whose key a poll brings as another connection (a new conntrack id,
        or counters that went back): ended at the latest in the previous poll, the last
        that saw them (once, should a retried dump bring one twice)."""
        old = np.unique(slots)
        return (old[np.asarray(self.table.ended)[old] == 0], END_OF_FLOW,
                self.table.previous_poll or now)

    def _expired(self, now: float, gone: np.ndarray) -> list[DueGroup]:
        """The live connections, `gone` aside, due at their idle or active timeout, or at
        the heartbeat. Idle first: a connection both idle and at its active timeout ends as
        idle, and stays quiet until it moves again. (Masks over the table, compared with
        the clock: a wave of due records costs a few bytes per connection beside them.)"""
        table = self.table
        used = table.used
        alive = (np.asarray(table.occupied)[:used] & (np.asarray(table.ended)[:used] ^ 1)
                 ).view(bool)
        alive[gone] = False
        live = alive & (np.asarray(table.quiet)[:used] == 0)
        idle = live & (np.asarray(table.last_activity)[:used] <= now - self.idle_timeout)
        last_export = np.asarray(table.last_export)[:used]
        due = live & ~idle & (last_export <= now - self.active_timeout)
        candidates = np.flatnonzero(due)
        due[candidates[~self.moved(candidates)]] = False
        if self.heartbeat:
            due |= alive & ~idle & (last_export <= now - self.heartbeat)
        idle_slots = np.flatnonzero(idle)
        np.asarray(table.quiet)[idle_slots] = 1
        return [(idle_slots, IDLE_TIMEOUT, now), (np.flatnonzero(due), ACTIVE_TIMEOUT, now)]

    def moved(self, slots: np.ndarray) -> np.ndarray:
        """Whether each connection of `slots` has something to say since its last record:
        it moved since (its counters or its state changed: the poll marked its activity
        after the record was made, or its counters are not those the record carried), or
        it has had no record yet. (`_PART` slots at a time: the columns they read stay
        small beside the table.)"""
        table = self.table
        moved = np.empty(len(slots), bool)
        for first in range(0, len(slots), _PART):
            part = slots[first:first + _PART]
            found = (np.asarray(table.last_activity)[part]
                     > np.asarray(table.last_export)[part])
            for polled, exported in ((table.packets, table.exported_packets),
                                     (table.reply_packets, table.exported_reply_packets)):
                found |= np.asarray(polled)[part] != np.asarray(exported)[part]
            moved[first:first + _PART] = found | (np.asarray(table.reported)[part] == 0)
        return moved

    def at_shutdown(self, continued: bool) -> tuple[np.ndarray, int]:
        """The final records' slots and end reason (the agent is stopping). `continued`:
        the next agent takes over from the export state, so a live connection is not ended:
        it gets an active-timeout record if it moved since its last one or has had none yet
        (no next agent may come). Otherwise every live connection ends (forced end)."""
        table = self.table
        used = table.used
        live = np.asarray(table.occupied)[:used] & (np.asarray(table.ended)[:used] ^ 1)
        if not continued:
            return np.flatnonzero(live), FORCED_END
        slots = np.flatnonzero(live & (np.asarray(table.quiet)[:used] ^ 1))
        return slots[self.moved(slots)], ACTIVE_TIMEOUT
