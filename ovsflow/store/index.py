"""The identity index: each tracked connection's key to its slot, looked up a piece at a time.

A poll brings 10k-500k keys, nearly all of connections already tracked. A `dict` of `bytes`
did this one key at a time: each lookup hashed a key the poll had just made and followed
pointers to compare it (~350 ns a key at 500k connections, the largest cost of a poll after
the kernel's own dump), and kept ~130 bytes of Python objects per connection (the key, its
dict entry, the slot's int). No library looks up fixed-width keys in bulk, so this is an
open-addressing hash table written for numpy, with linear probing:

- the keys are the table's `KEY` rows (seven 64-bit words), hashed a piece at a time;
- a bucket is 64 bits: the slot (plus one; 0 is an empty bucket, `REMOVED` a slot let go)
  and, above it, a tag of 32 other bits of the key's hash;
- a lookup reads the 8 buckets from the key's own at once (one gather of whole windows):
  the first whose tag is the key's, before an empty one, names the candidate slot, whose
  key row is then compared. Most keys are found or known absent in that one round; the few
  whose window is full of other keys (or whose tag matched another key) are looked up one
  by one. ~30 ns a key; 8 bytes a bucket, 2.5 to 5 buckets a key.

A key's probe never wraps around: the buckets end with room for the last windows, and a
key that would not fit before the end has the buckets rebuilt, as when keys take more than
half of them (twice as many buckets then, or more) or removed slots a quarter (they make
the probes of absent keys long).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..polled import KEY_WIDTH, rows_equal
from .memory import lazy_zeros

_WORDS = KEY_WIDTH // 8
WINDOW = 8  # buckets read at once
_TAIL = 1024  # buckets after the last home bucket: where the last keys' probes may go
EMPTY = np.uint64(0)
REMOVED = np.uint64(1 << 32)  # a tag, no slot
_SLOT = np.uint64(0xFFFFFFFF)
_SMALLEST = 1 << 12  # buckets at first
_FEW = 16  # keys looked up one at a time rather than in another round
_PART = 16384  # keys placed at once when the buckets are rebuilt
_MIX = np.uint64(0x9E3779B97F4A7C15)


class KeyIndex:
    def __init__(self, rows: np.ndarray, capacity: int, seed: int | None = None):
        """`rows`: the table's key rows by slot (KEY), which `add` expects filled."""
        self._rows = rows.view(np.uint64).reshape(len(rows), _WORDS)
        self._bucket_of = lazy_zeros(capacity, np.int64 if capacity >= 2**31 else np.int32)
        # odd multipliers, one per word: a random one per process, so that no one can pick
        # connections whose keys share buckets
        self._multipliers = np.random.default_rng(seed).integers(
            1, 2**63, _WORDS, np.uint64, endpoint=True) | np.uint64(1)
        self.count = 0  # keys held
        self._removed = 0  # buckets of removed slots
        self._resize(_SMALLEST)

    def __len__(self) -> int:
        return self.count

    def hashes(self, keys: np.ndarray) -> np.ndarray:
        """64-bit hashes of KEY rows: the top bits choose the bucket, the low 32 are the
        tag."""
        return self._hashes(keys.view(np.uint64).reshape(len(keys), _WORDS))

    def _hashes(self, words: np.ndarray) -> np.ndarray:
        """A multilinear hash of each row's words (wrapping 64-bit sums of products), mixed.
        (A matrix product: a sum along the rows' seven words costs 4x as much.)"""
        mixed = words @ self._multipliers
        mixed ^= mixed >> np.uint64(29)
        mixed *= _MIX
        return mixed ^ (mixed >> np.uint64(32))

    def find(self, keys: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """The slot of each key, -1 where it is not held: a round per window of buckets
        for the keys neither found nor known absent yet, the last few one at a time."""
        found = np.full(len(keys), -1, np.int64)
        if not self.count:
            return found
        wanted = keys.view(np.uint64).reshape(len(keys), _WORDS)
        tags = hashes << np.uint64(32)
        at = (hashes >> self._shift).astype(np.int64)
        pending = np.arange(len(keys))
        one_by_one: list[tuple[int, int]] = []
        while len(pending) > _FEW and at.max() + WINDOW <= len(self._buckets):
            window = self._windows[at]
            hit = _first(((window ^ tags[pending][:, None]) < REMOVED)
                         & (window & _SLOT != 0))
            empty = _first(window == EMPTY)
            candidate = np.flatnonzero((hit != 0) & ((empty == 0) | (hit < empty)))
            slots = (window[candidate, _position(hit[candidate])] & _SLOT).astype(np.int64)
            same = rows_equal(self._rows.take(slots - 1, axis=0),
                              wanted.take(pending[candidate], axis=0))
            found[pending[candidate[same]]] = slots[same] - 1
            other = candidate[~same]  # the tag of another key: rare
            one_by_one += zip(pending[other].tolist(), at[other].tolist())
            going_on = (hit == 0) & (empty == 0)  # on to the next window
            pending, at = pending[going_on], at[going_on] + WINDOW
        for row, bucket in [*zip(pending.tolist(), at.tolist()), *one_by_one]:
            found[row] = self._probe(wanted[row], int(hashes[row]), bucket)
        return found

    def _probe(self, key: np.ndarray, hashed: int, bucket: int) -> int:
        """One key's slot, bucket by bucket; -1 if it is not held."""
        tag, buckets, rows = hashed << 32 & 0xFFFFFFFF00000000, self._buckets, self._rows
        while bucket < len(buckets) and (held := int(buckets[bucket])):
            slot = (held & 0xFFFFFFFF) - 1
            if held & 0xFFFFFFFF00000000 == tag and slot >= 0 and (rows[slot] == key).all():
                return slot
            bucket += 1
        return -1

    def add(self, slots: np.ndarray, hashes: np.ndarray) -> None:
        """Index `slots`, whose keys (distinct, none held yet) are in the rows, hashed."""
        if 2 * (self.count + len(slots)) > self._size or 4 * self._removed > self._size:
            size = self._size  # keys over half the buckets, or removed over a quarter:
            while 3 * (self.count + len(slots)) > size:  # rebuilt, at most a third taken
                size *= 2
            self._resize(size)
        self.count += len(slots)
        unplaced = self._place(slots.astype(np.int64), hashes)
        while len(unplaced):  # a probe ran into the end: more buckets
            self._resize(2 * self._size)
            unplaced = self._place(unplaced, self._hashes(self._rows[unplaced]))

    def remove(self, slots: np.ndarray) -> None:
        self._buckets[self._bucket_of[slots]] = REMOVED
        self.count -= len(slots)
        self._removed += len(slots)

    def _place(self, slots: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """Each slot into the first free bucket from its own (empty or removed); returns
        those that found none before the buckets' end. A round reads each one's window:
        every slot with a free bucket there writes itself into the first, and the slot a
        bucket holds afterwards is placed (of several writing one bucket, one wins); the
        others read their windows again. A slot whose window has no free bucket is placed
        one bucket at a time."""
        buckets = self._buckets
        values = (hashes << np.uint64(32)) | (slots.astype(np.uint64) + np.uint64(1))
        at = (hashes >> self._shift).astype(np.int64)
        while len(slots):
            free = _first(self._windows[at] & _SLOT == 0)
            room = np.flatnonzero(free != 0)
            target = at[room] + _position(free[room])
            before = buckets[target]
            buckets[target] = values[room]
            placed = buckets[target] == values[room]
            self._removed -= int((before[placed] == REMOVED).sum())
            self._bucket_of[slots[room[placed]]] = target[placed]
            going_on = np.ones(len(slots), bool)
            going_on[room[placed]] = False
            for row in np.flatnonzero(free == 0).tolist():  # from the window's end on
                bucket = int(at[row]) + WINDOW
                while bucket < len(buckets) and int(buckets[bucket]) & 0xFFFFFFFF:
                    bucket += 1
                if bucket == len(buckets):
                    return slots[going_on]
                self._removed -= int(buckets[bucket]) == int(REMOVED)
                buckets[bucket] = values[row]
                self._bucket_of[slots[row]] = bucket
                going_on[row] = False
            slots, values, at = slots[going_on], values[going_on], at[going_on]
        return slots

    def _resize(self, size: int) -> None:
        """`size` home buckets (a power of two), every key held placed again."""
        held = (self._buckets[(self._buckets & _SLOT) != 0] & _SLOT).astype(np.int64) - 1 \
            if self.count else np.zeros(0, np.int64)
        while True:
            self._size = size
            self._buckets = np.zeros(size + _TAIL, np.uint64)
            self._windows = sliding_window_view(self._buckets, WINDOW)
            self._shift = np.uint64(64 - (size.bit_length() - 1))
            self._removed = 0
            # a part at a time: what placing takes beside the buckets stays small (~2 MB)
            if not any(len(self._place(part, self._hashes(self._rows[part])))
                       for part in np.array_split(held, len(held) // _PART + 1)):
                return
            size *= 2


def _first(flags: np.ndarray) -> np.ndarray:
    """Per row of WINDOW booleans, the lowest byte set in the row read as a 64-bit
    number (1 << 8 * position of the first True), or 0: one pass, where a search along
    rows of 8 costs 5x as much."""
    packed = np.ascontiguousarray(flags).view(np.uint64).ravel()
    return packed & (~packed + np.uint64(1))


def _position(first: np.ndarray) -> np.ndarray:
    """The position in its window that `_first` found (first != 0)."""
    return (np.log2(first.astype(np.float64)) / 8).astype(np.int64)
