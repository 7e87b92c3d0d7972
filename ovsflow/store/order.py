"""The dump's order: which slot each row of a poll is likely to be, from the poll before.

The kernel dumps its conntrack table bucket by bucket, and a table that changes a little
between two polls comes back in nearly the same order: the connections that stay keep
theirs, and those that come and go shift the rest by a few rows. So the row a poll brings
at some position is, most of the time, the connection the previous poll brought there
(give or take the shift since): its slot is a guess checked by comparing whole keys, one
sequential read of the table's key rows, instead of a hash and a probe of the index at a
random place (`KeyIndex.find`, the largest cost of a steady poll's store update). Rows the
guess misses (new connections, a shifted stretch) are looked up in the index. A guess is
never trusted: only a key equal to the slot's own is taken.

After each piece the guess is set again from the last row found: where that connection
was in the previous poll says how far the order has shifted; within a piece, once, from
its first row the guess missed, when it missed many.
"""

from __future__ import annotations

import numpy as np

from .memory import lazy_zeros


class DumpOrder:
    def __init__(self, capacity: int):
        self._slot = np.int64 if capacity >= 2**31 else np.int32  # 4 bytes a row, usually
        self._previous = np.zeros(0, self._slot)  # the slots, as the previous poll came
        # where each slot was in it (valid where _previous says so back)
        self._position = lazy_zeros(capacity, self._slot)
        self._seen: list[np.ndarray] = []  # this poll's, piece by piece
        self._rows = 0  # rows of this poll so far
        self._shift = 0  # where this poll's rows are in the previous poll's, minus their own

    def begin(self) -> None:
        self._seen, self._rows, self._shift = [], 0, 0

    def guess(self, count: int) -> np.ndarray:
        """The slots the next `count` rows are likely to hold (-1: no guess)."""
        first = self._rows + self._shift
        guessed = np.full(count, -1, np.int64)
        if 0 <= first < len(self._previous):
            known = self._previous[first:first + count]
            guessed[:len(known)] = known
        elif first < 0 < first + count:
            guessed[-first:] = self._previous[:first + count]
        return guessed

    def anchor(self, row: int, slot: int) -> bool:
        """The next rows' `row` is `slot`'s connection (found in the index): the guesses
        follow from where the previous poll had it, if it had it."""
        if slot < 0:
            return False
        at = int(self._position[slot])
        if at >= len(self._previous) or self._previous[at] != slot:
            return False
        self._shift = at - (self._rows + row)
        return True

    def saw(self, slots: np.ndarray) -> None:
        """The slots of the next rows (-1 for a row not tracked), as found."""
        self._seen.append(slots.astype(self._slot))
        found = np.flatnonzero(slots >= 0)
        for row in found[::-1][:4].tolist():  # the last row found that the previous poll had
            slot = int(slots[row])
            at = int(self._position[slot])
            if at < len(self._previous) and self._previous[at] == slot:
                self._shift = at - (self._rows + row)
                break
        self._rows += len(slots)

    def finish(self) -> None:
        """This poll's order, for the next one's guesses."""
        order = np.concatenate(self._seen) if self._seen else np.zeros(0, self._slot)
        self._seen = []
        tracked = np.flatnonzero(order >= 0)
        self._position[order[tracked]] = tracked
        self._previous = order
