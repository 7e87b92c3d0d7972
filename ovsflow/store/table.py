"""The connection table: the columns kept per tracked connection, and the identity index
that gives each connection its slot.

State lives in columns indexed by a slot number (numpy arrays, reached through memoryviews
where one value is read or written at a time: as fast as `array`), not in an object per
connection: a tracked connection costs ~200 bytes of columns, its identity among them. The
identity (`Connection.key`: zone, original tuple and start, packed alike by every source,
see `connection.identity`) is a `KEY` row; the index (`index.KeyIndex`) finds a poll's
keys among them in bulk, and protocol, ports and addresses are read back from them when
records are made (`identities`).

The store's other rooms (the poll's comparison, what is due, the records, the spans, the
export state's parts) read and write these columns themselves, in bulk: the table is the
data they share, not an interface in front of it, so that no room pays a call per column.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..connection import IDENTITY_FIELDS
from ..enrich import NO_PODS
from ..polled import KEY, KEY_WIDTH, LABELS, Polled, key_bytes, key_rows, rows_equal
from .index import KeyIndex
from .memory import lazy_zeros
from .order import DumpOrder

# Connection.key (see `identity`) as numpy reads it, IPv4 or IPv6
_NUMPY_CODES = {"B": "u1", "H": "u2", "Q": "u8"}
KEYS = {ipv6: np.dtype([(name, ">" + _NUMPY_CODES[code]) for name, code in IDENTITY_FIELDS]
                       + [("source_address", f"V{16 if ipv6 else 4}"),
                          ("destination_address", f"V{16 if ipv6 else 4}")])
        for ipv6 in (False, True)}


def identities(rows: np.ndarray) -> list[tuple[bool, np.ndarray, np.ndarray]]:
    """`KEY` rows read as numpy records of `KEYS`, per family: (IPv6, the positions in
    `rows`, the records)."""
    octets = rows.view(np.uint8).reshape(len(rows), KEY_WIDTH)
    ipv6 = octets[:, -1] == KEYS[True].itemsize
    families = []
    for family, dtype in KEYS.items():
        members = np.arange(len(rows)) if (ipv6 == family).all() else np.flatnonzero(
            ipv6 == family)
        if len(members):
            families.append((family, members, np.ascontiguousarray(
                octets[members, :dtype.itemsize]).view(dtype).ravel()))
    return families


class Identities(Sequence):
    """The table's keys by slot, as `bytes` (None for a free slot): for readers of one key
    at a time (a connection's Pods); in bulk, `ConnectionTable.key_bytes`."""

    def __init__(self, table: ConnectionTable):
        self._table = table

    def __len__(self) -> int:
        return self._table.used

    def __getitem__(self, slot):
        if isinstance(slot, slice):
            return [self[i] for i in range(*slot.indices(len(self)))]
        table = self._table
        if not table.occupied[slot]:
            return None
        row = table.key_octets[slot]
        return row[:row[-1]].tobytes()


class ConnectionTable:
    def __init__(self, capacity: int):
        self.capacity = capacity

        def column(numpy_type: str) -> memoryview:
            return memoryview(lazy_zeros(capacity, numpy_type))
        self.used = 0  # slots ever taken: the columns' live part is [:used]
        self.free: list[int] = []
        # The columns, indexed by slot.
        self.key_rows = lazy_zeros(capacity, KEY)  # the identity (Connection.key); see occupied
        self.key_octets = self.key_rows.view(np.uint8).reshape(capacity, KEY_WIDTH)
        self._key_words = self.key_rows.view(np.uint64).reshape(capacity, -1)
        self.index = KeyIndex(self.key_rows, capacity)  # identity -> slot
        self.order = DumpOrder(capacity)  # each slot's row in the last poll
        self.keys = Identities(self)
        self.protocols = column("u1")  # as the key says: for reads in bulk
        self.states = column("u2")  # codes in polled.STATE_NAMES
        self.labels = lazy_zeros(capacity, LABELS)
        self.pods = _Pods()  # the Pods at the two ends, as last known (Enricher), by slot
        self.ids = column("u4")  # conntrack id
        # counters as last polled, and as last exported
        self.packets, self.octets = column("u8"), column("u8")
        self.reply_packets, self.reply_octets = column("u8"), column("u8")
        self.exported_packets, self.exported_octets = column("u8"), column("u8")
        self.exported_reply_packets, self.exported_reply_octets = column("u8"), column("u8")
        self.last_activity, self.last_export = column("f8"), column("f8")
        # where the source's remaining timeout pointed (poll time + timeout) at the last
        # activity seen, for sources without counters
        self.expiries = column("f8")
        self.occupied = column("u1")  # 1: a connection is there
        self.ended = column("u1")  # 1: its end was exported
        self.quiet = column("u1")  # 1: its idle timeout was exported, no activity since
        self.reported = column("u1")  # 1: a record of it was made
        # What a record needs that stays the same for a conntrack id, besides what its key
        # says (protocol, ports, ICMP fields, addresses: read from the key when needed).
        self.counted = column("u1")
        self.start_ms = column("u8")  # the source's, or else the first poll that saw it
        # the connection's run of strings: an id in Spans (0: to be found), the Pod map's
        # generation it was found at, and the flowType found with it
        self.span, self.span_generation = column("u4"), column("u4")
        self.flow_type = column("u1")
        # The poll (see poll.PollMarks.number) that last filled each slot; then one more,
        # never filled, read for slot -1 (a key not tracked). A byte: polls are numbered 1
        # to 255, and the column is cleared when the numbers start again.
        self.filled_in = lazy_zeros(capacity + 1, "u1")
        self.previous_poll: float | None = None  # when every tracked connection was seen

    def __len__(self) -> int:
        return len(self.index)

    def identities(self, slots: np.ndarray) -> list[tuple[bool, np.ndarray, np.ndarray]]:
        """The keys of `slots` read as numpy records, per family (see `identities`)."""
        return identities(self.key_rows[slots])

    def key_bytes(self, slots: np.ndarray) -> list[bytes]:
        """The keys of `slots` as `bytes` (`connection.identity`)."""
        return key_bytes(self.key_rows[slots])

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The slot of each key of the poll's next rows (`KEY` rows), -1 where none; and
        the hashes of those the index was asked for (the others' 0), for `take_new`. The
        dump's order guesses most (`order.DumpOrder`); the index finds the rest."""
        words = keys.view(np.uint64).reshape(len(keys), -1)
        found = self._guessed(self.order.guess(len(keys)), words)
        missed = np.flatnonzero(found < 0)
        if len(missed) > len(keys) // 8:  # a stretch shifted: the order again, from there
            first = keys[missed[0]:missed[0] + 1]
            slot = int(self.index.find(first, self.index.hashes(first))[0])
            if self.order.anchor(int(missed[0]), slot):
                found[missed] = self._guessed(self.order.guess(len(keys))[missed],
                                              words[missed])
                missed = np.flatnonzero(found < 0)
        hashes = np.zeros(len(keys), np.uint64)
        if len(missed) == len(keys):
            hashes = self.index.hashes(keys)
            found = self.index.find(keys, hashes)
        elif len(missed):
            hashes[missed] = self.index.hashes(keys[missed])
            found[missed] = self.index.find(keys[missed], hashes[missed])
        return found, hashes

    def _guessed(self, guessed: np.ndarray, words: np.ndarray) -> np.ndarray:
        """The guessed slots whose keys are `words` (as 64-bit words), -1 for the others."""
        right = guessed >= 0
        if right.all():  # as usual: no selection
            right = rows_equal(self._key_words.take(guessed, axis=0), words)
        elif right.any():
            right[right] = rows_equal(self._key_words.take(guessed[right], axis=0),
                                      words[right])
        return np.where(right, guessed, -1)

    def take_new(self, keys: np.ndarray | Sequence[bytes], rows: Iterable[int] | np.ndarray,
                 rejected: set[bytes], hashes: np.ndarray | None = None) -> np.ndarray:
        """Slots for the new connections whose keys (`KEY` rows, or identities) are at
        `rows`, their columns to be filled; -1 for a row left out: the table is full (its
        key goes to `rejected`), or its key comes again in a later row (a retried dump: the
        last sighting counts). `hashes`: of all `keys`, given by a caller that found those
        at `rows` not tracked (`find`); without them, a key already tracked keeps its slot
        (a state naming a connection twice)."""
        if not isinstance(keys, np.ndarray):
            keys = key_rows(keys)
        rows = np.fromiter(rows, np.int64) if not isinstance(rows, np.ndarray) else rows
        wanted = keys[rows]
        if hashes is None:
            hashes = self.index.hashes(wanted)
            slots = self.index.find(wanted, hashes)
        else:
            hashes, slots = hashes[rows], np.full(len(rows), -1, np.int64)
        last = _last_of_each(wanted, hashes)
        new = np.flatnonzero(last & (slots < 0))
        slots[~last] = -1
        room = self.capacity - len(self.index)
        if len(new) > room:
            rejected.update(key_bytes(wanted[new[room:]]))
            new = new[:room]
        reused = min(len(new), len(self.free))
        taken = np.empty(len(new), np.int64)
        taken[:reused] = self.free[len(self.free) - reused:][::-1]
        del self.free[len(self.free) - reused:]
        taken[reused:] = np.arange(self.used, self.used + len(new) - reused)
        self.used += len(new) - reused
        self.key_rows[taken] = wanted[new]
        self.index.add(taken, hashes[new])
        slots[new] = taken
        return slots

    def fill(self, slots: np.ndarray, piece: Polled, rows: np.ndarray, now: float,
             poll_number: int) -> np.ndarray:
        """Conntrack entries start in their slots, written column by column. Returns the
        slots whose entries the source says have ended."""
        for column, values in ((self.ids, piece.ids), (self.packets, piece.packets),
                               (self.octets, piece.octets),
                               (self.reply_packets, piece.reply_packets),
                               (self.reply_octets, piece.reply_octets),
                               (self.counted, piece.counted), (self.states, piece.states),
                               (self.protocols, piece.protocols)):
            np.asarray(column)[slots] = values[rows]
        self.labels[slots] = piece.labels[rows]
        if not piece.counted.all():  # (kernel entries never read it: its pages stay free)
            np.asarray(self.expiries)[slots] = piece.timeouts[rows] + now
        start_ms = piece.starts_ns[rows] // 1_000_000
        start_ms[start_ms == 0] = int(now * 1000)
        np.asarray(self.start_ms)[slots] = start_ms
        for column in (self.exported_packets, self.exported_octets,
                       self.exported_reply_packets, self.exported_reply_octets,
                       self.ended, self.quiet, self.reported, self.span):
            np.asarray(column)[slots] = 0
        for column in (self.last_activity, self.last_export):
            np.asarray(column)[slots] = now
        np.asarray(self.occupied)[slots] = 1
        self.filled_in[slots] = poll_number
        return slots[piece.ended[rows]]

    def drop(self, slots: np.ndarray) -> None:
        self.index.remove(slots)
        # a freed slot's key is cleared: the dump order's guess (`find`) must never take
        # it for the connection that left it, polled again (a filter narrowed, widened)
        self._key_words[slots] = 0
        if self.pods:
            for slot in slots.tolist():
                self.pods[slot] = NO_PODS
        np.asarray(self.occupied)[slots] = 0
        self.free += slots.tolist()  # for the next new connections


class _Pods(dict):
    """Slot -> the Pods of its connection, NO_PODS where none are known: only connections
    with a Pod take room (most nodes' tables: none but those of the node's own Pods)."""

    def __missing__(self, slot: int) -> tuple:
        return NO_PODS

    def __setitem__(self, slot: int, pods: tuple) -> None:
        if pods is NO_PODS or pods == NO_PODS:
            self.pop(slot, None)
        else:
            super().__setitem__(slot, pods)


def _last_of_each(keys: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """True for each row whose key no later row has."""
    last = np.ones(len(keys), bool)
    order = np.argsort(hashes)
    same_hash = np.flatnonzero(hashes[order[1:]] == hashes[order[:-1]])
    if len(same_hash):  # rare (a retried dump): the keys themselves, from the last row back
        seen: set[bytes] = set()
        for row in np.unique(np.concatenate((order[same_hash], order[same_hash + 1]))
                             )[::-1].tolist():
            key = keys[row].tobytes()
            last[row] = key not in seen
            seen.add(key)
    return last
