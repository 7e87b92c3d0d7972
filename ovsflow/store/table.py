"""The connection table: the columns kept per tracked connection, and the identity index
that gives each connection its slot.

State lives in columns indexed by a slot number (numpy arrays, reached through memoryviews
where one value is read or written at a time: as fast as `array`), not in an object per
connection: a tracked connection costs its identity and ~130 bytes of columns. One dict
maps each connection's identity (`Connection.key`: zone, original tuple and start, packed
alike by every source, see `connection.identity`) to its slot; protocol, ports and
addresses are read back from it when records are made (`identities`).

The store's other rooms (the poll's comparison, what is due, the records, the spans, the
export state's parts) read and write these columns themselves, in bulk: the table is the
data they share, not an interface in front of it, so that no room pays a call per column.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..connection import IDENTITY_FIELDS
from ..enrich import NO_PODS
from ..ipfix.templates import pick
from ..polled import LABELS, Polled

# Connection.key (see `identity`) as numpy reads it, IPv4 or IPv6
_NUMPY_CODES = {"B": "u1", "H": "u2", "Q": "u8"}
KEYS = {ipv6: np.dtype([(name, ">" + _NUMPY_CODES[code]) for name, code in IDENTITY_FIELDS]
                       + [("source_address", f"V{16 if ipv6 else 4}"),
                          ("destination_address", f"V{16 if ipv6 else 4}")])
        for ipv6 in (False, True)}


def identities(keys: Sequence[bytes]) -> list[tuple[bool, np.ndarray, np.ndarray]]:
    """The keys (`connection.identity`) read as numpy records, per family: (IPv6, the
    positions in `keys`, the records)."""
    joined, count = b"".join(keys), len(keys)
    for family, dtype in KEYS.items():
        if len(joined) == count * dtype.itemsize:  # one family only, as usual
            return [(family, np.arange(count), np.frombuffer(joined, dtype))]
    ipv6 = np.fromiter(map(len, keys), np.int64, count) == KEYS[True].itemsize
    families = []
    for family in (False, True):
        members = np.flatnonzero(ipv6 == family)
        families.append((family, members, np.frombuffer(
            b"".join(pick(keys, members.tolist())), KEYS[family])))
    return families


class ConnectionTable:
    def __init__(self, capacity: int):
        self.capacity = capacity

        def column(numpy_type: str) -> memoryview:
            # np.zeros maps zero pages: memory is taken as slots are first used
            return memoryview(np.zeros(capacity, numpy_type))
        self.index: dict[bytes, int] = {}  # identity -> slot
        self.used = 0  # slots ever taken: the columns' live part is [:used]
        self.free: list[int] = []
        # The columns, indexed by slot. A free slot has key None.
        self.keys: list[bytes | None] = []
        self.protocols = column("u1")  # as the key says: for reads in bulk
        self.states = column("u2")  # codes in polled.STATE_NAMES
        self.labels = np.zeros(capacity, LABELS)
        self.pods: list[tuple] = []  # the Pods at the two ends, as last known (Enricher)
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
        self.filled_in = np.zeros(capacity + 1, "u1")
        self.previous_poll: float | None = None  # when every tracked connection was seen

    def __len__(self) -> int:
        return len(self.index)

    def identities(self, slots: np.ndarray) -> list[tuple[bool, np.ndarray, np.ndarray]]:
        """The keys of `slots` read as numpy records, per family (see `identities`)."""
        return identities(pick(self.keys, slots.tolist()))

    def take_new(self, keys: Sequence[bytes], rows: Iterable[int], rejected: set[bytes]
                 ) -> list[int]:
        """Slots for the new connections at `rows`, their columns to be filled; -1 for a
        row left out: the table is full (its key goes to `rejected`), or its key comes
        again in a later row (a retried dump: the last sighting counts)."""
        slots: list[int] = []
        index, free, stored_keys, pods = self.index, self.free, self.keys, self.pods
        room = self.capacity - len(index)
        repeated = False
        for row in rows:
            key = keys[row]
            slot = index.get(key)
            if slot is None:
                if room <= 0:
                    rejected.add(key)
                    slots.append(-1)
                    continue
                room -= 1
                if free:
                    slot = free.pop()
                    stored_keys[slot] = key
                else:
                    slot = self.used
                    self.used += 1
                    stored_keys.append(key)
                    pods.append(NO_PODS)
                index[key] = slot
            else:
                repeated = True
            slots.append(slot)
        if repeated:  # a key in several rows: all but its last are left out
            taken = set()
            for position in range(len(slots) - 1, -1, -1):
                if slots[position] in taken:
                    slots[position] = -1
                else:
                    taken.add(slots[position])
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
        index, keys, pods = self.index, self.keys, self.pods
        for slot in slots.tolist():
            del index[keys[slot]]
            keys[slot] = None
            pods[slot] = NO_PODS
        np.asarray(self.occupied)[slots] = 0
        self.free += slots.tolist()  # for the next new connections
