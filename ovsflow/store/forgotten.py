"""Connections the filter left out, and what their last records said.

A reload that narrows the protocols or zones stops following the connections the filter
now leaves out, without an end record: they go on, they are only no longer wanted. Their
rows (`state_parts.STATE_ROW`: the counters of their last records, start, flags) are kept
here, and written with the export state. When the filter takes one again — a reload that
widens it, or an agent started with a wider filter — it continues from there: its next
record's deltas count from its last record, so that a collector's sum is conntrack's total
however often the filter narrows and widens, and its start stays. One that ended while
left out is let go without a record when the filter takes it again and it is no longer
there: what it moved while left out was never seen. Whether by a reload or across a
restart, the same rule (docs/ipfix.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..ipfix.templates import pick
from ..polled import key_rows
from .state_parts import LEFT_OUT, STATE_ROW, continue_from
from .table import ConnectionTable, identities


class Forgotten:
    def __init__(self, capacity: int):
        self.capacity = capacity  # the newest kept, when more are left out than this
        self.keys: list[bytes] = []
        self.rows = np.zeros(0, STATE_ROW)
        # The filter, once it has changed: the next poll looks for those it takes again
        self.keep: Callable[[np.ndarray], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: Sequence[bytes], rows: np.ndarray) -> None:
        """Left out, with their rows; those whose end was recorded are done, not kept."""
        live = np.flatnonzero(rows["flags"] & 1 == 0)
        keys, rows = list(pick(keys, live.tolist())), rows[live].copy()
        rows["flags"] |= LEFT_OUT
        replaced = set(keys)
        kept = np.array([key not in replaced for key in self.keys], bool)
        self.keys = list(pick(self.keys, np.flatnonzero(kept).tolist())) + keys
        self.rows = np.concatenate([self.rows[kept], rows])
        if len(self.keys) > self.capacity:
            self.keys, self.rows = self.keys[-self.capacity:], self.rows[-self.capacity:]

    def resume(self, table: ConnectionTable) -> int:
        """After a poll, once the filter has changed: those it takes again and the poll
        brought (as new connections, with the same conntrack id) continue from their rows;
        those it takes again that the poll did not bring ended while left out, and go.
        Returns how many continue."""
        keep, self.keep = self.keep, None
        if keep is None or not self.keys:
            return 0
        wanted = np.zeros(len(self.keys), bool)
        rows = key_rows(self.keys)
        for _, members, identity in identities(rows):
            wanted[members] = keep(identity)
        chosen = np.flatnonzero(wanted)
        slots = table.index.find(rows[chosen], table.index.hashes(rows[chosen]))
        rows = self.rows[chosen]
        found = slots >= 0
        found[found] = np.asarray(table.ids)[slots[found]] == rows["id"][found]
        continue_from(table, slots[found], rows[found])
        left = np.flatnonzero(~wanted)
        self.keys, self.rows = list(pick(self.keys, left.tolist())), self.rows[left]
        return int(np.count_nonzero(found))
