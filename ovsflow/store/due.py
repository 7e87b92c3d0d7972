"""Which tracked connections are due a record, and why (the record's flowEndReason).

A connection gets a record every `active_timeout` while it lives (active timeout), one when
it has moved no packet for `idle_timeout` (idle timeout; then none until it moves again:
it is *quiet*), and a last one when it ends (end of flow): when its source says so, when
it is gone from a poll (with the counters and the time of the previous poll, the last that
saw it), or when its tuple comes back as another connection. When the agent stops, every
live connection gets a final record (forced end), or, when the next agent continues from
the export state, only those that moved since their last one.

Each decision is a few array operations over the table's columns, never a loop per
connection, and comes as a `DueGroup` for `RecordMaker.emit`.
"""

from __future__ import annotations

import numpy as np

from ..record import ACTIVE_TIMEOUT, END_OF_FLOW, FORCED_END, IDLE_TIMEOUT
from .table import ConnectionTable

# Slots due a record, their end reason and their end time (one each, or one for all)
DueGroup = tuple[np.ndarray, int | np.ndarray, float | np.ndarray]


class DueRecords:
    def __init__(self, table: ConnectionTable, active_timeout: float, idle_timeout: float):
        self.table = table
        self.active_timeout = active_timeout
        self.idle_timeout = idle_timeout

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
        """The live connections, `gone` aside, due at their idle or active timeout. Idle
        first: a connection both idle and at its active timeout ends as idle, and stays
        quiet until it moves again."""
        table = self.table
        used = table.used
        live = (np.asarray(table.occupied)[:used]
                & ((np.asarray(table.ended)[:used] | np.asarray(table.quiet)[:used]) ^ 1)
                ).astype(bool)
        live[gone] = False
        idle = live & (np.asarray(table.last_activity)[:used] + self.idle_timeout <= now)
        active = live & ~idle & (np.asarray(table.last_export)[:used] + self.active_timeout
                                 <= now)
        idle_slots = np.flatnonzero(idle)
        np.asarray(table.quiet)[idle_slots] = 1
        return [(idle_slots, IDLE_TIMEOUT, now), (np.flatnonzero(active), ACTIVE_TIMEOUT, now)]

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
        moved = (np.asarray(table.last_activity)[:used] > np.asarray(table.last_export)[:used])
        for polled, exported in ((table.packets, table.exported_packets),
                                 (table.reply_packets, table.exported_reply_packets)):
            moved |= np.asarray(polled)[:used] != np.asarray(exported)[:used]
        moved |= np.asarray(table.reported)[:used] == 0
        moved &= (live & (np.asarray(table.quiet)[:used] ^ 1)).astype(bool)
        return np.flatnonzero(moved), ACTIVE_TIMEOUT
