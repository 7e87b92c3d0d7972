"""The connection store: what each poll means for export.

A poll brings 10k-500k connections of which a few percent are new, gone, changed or due, so
the store is built for the unchanged majority, in time and in memory:

- State lives in columns indexed by a slot number (numpy arrays, reached through
  memoryviews where one value is read or written at a time: as fast as `array`), not in an
  object per connection: a tracked connection costs its identity and ~130 bytes of columns.
- One dict maps each connection's identity (`Connection.key`: zone, original tuple and
  start, packed alike by every source, see `connection.identity`) to its slot; protocol,
  ports and addresses are read back from it when records are made.
- A poll comes as columns (`polled.Polled`, a piece per run of receive buffers): its keys
  are looked up in the dict in one `map`, and ids, counters, timeouts and states compared
  with the slots' in a few array operations. Python statements run per connection only for
  those that are new or reused (their slots taken) or gone (their keys let go).
- Which connections are due (active or idle timeout) is found with a few array operations
  over all slots, and due records are written in bulk, straight from the columns, as rows
  of their IPFIX templates (`RecordTemplate.encode_columns`): no object per record. What
  a record needs beyond numbers, its run of strings (Pod, node and rule names, TCP state),
  is encoded once per distinct value and kept by id per connection until the connection's
  state or labels change or the Pod map does.

Records leave `BATCH` at a time as `EncodedRecords`, through `hand_over` (the agent's
passes them to the exporter as the poll goes on) or, without it, as `update`'s result.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from operator import itemgetter

import numpy as np

from .connection import IDENTITY_FIELDS, IDENTITY_SIZE, Connection
from .enrich import FLOW_TYPE_UNKNOWN, NO_PODS, Enricher, flow_type
from .ipfix.templates import RECORD_TEMPLATES, pick
from .polled import LABELS, NO_LABELS, STATE_NAMES, Malformed, Polled, labels_differ
from .state import Parts
from .record import (
    ACTIVE_TIMEOUT, BATCH, CONNTRACK, CONNTRACK_UNCOUNTED, END_OF_FLOW, FORCED_END,
    IDLE_TIMEOUT, EncodedRecords, FlowRecord,
)

log = logging.getLogger(__name__)

# (counted, IPv6) -> the template of such a connection's records
_TEMPLATES = {(counted, ipv6): RECORD_TEMPLATES[CONNTRACK if counted else CONNTRACK_UNCOUNTED,
                                                 ipv6]
              for counted in (False, True) for ipv6 in (False, True)}
# The four share their run of strings: one encoded span serves them all.
_SPAN = _TEMPLATES[True, False]
assert all(t.span.fields == _SPAN.span.fields for t in _TEMPLATES.values())
MAX_SPANS = 65536  # distinct encoded spans kept; past this they are made again as needed
# Connection.key (see `identity`) as numpy reads it, IPv4 or IPv6
_NUMPY_CODES = {"B": "u1", "H": "u2", "Q": "u8"}
_KEYS = {ipv6: np.dtype([(name, ">" + _NUMPY_CODES[code])
                         for name, code in IDENTITY_FIELDS]
                        + [("source_address", f"V{16 if ipv6 else 4}"),
                           ("destination_address", f"V{16 if ipv6 else 4}")])
         for ipv6 in (False, True)}
_SECONDS_LIMIT = 0xFFFFFFFF  # dateTimeSeconds is 32 bits
_ZERO = np.zeros(1, "u1")
# A tracked connection in the export state (`snapshot`): the counters are those last
# exported; flags: 1 its end was exported, 2 quiet (idle record sent), 4 counted, 8 reported
# (a record of it was sent).
STATE_ROW = np.dtype([("id", "<u4"), ("expiry", "<f8"), ("start_ms", "<u8"),
                      ("packets", "<u8"), ("octets", "<u8"), ("reply_packets", "<u8"),
                      ("reply_octets", "<u8"), ("last_activity", "<f8"),
                      ("last_export", "<f8"), ("flags", "u1")])
# Without counters (OVS userspace conntrack) a packet shows in the remaining timeout: each
# packet sets it back to the state's full timeout, and otherwise it runs down with the
# clock, so the time it points to (poll time + remaining timeout) stays put while the
# connection is quiet and moves on when a packet came. It counts as moved once it is this
# far past where it stood at the connection's last activity: the whole seconds OVS prints,
# and when in a poll the entry was read.
EXPIRY_SLACK = 1.5


def _identities(keys: Sequence[bytes]) -> list[tuple[bool, np.ndarray, np.ndarray]]:
    """The keys (`connection.identity`) read as numpy records, per family: (IPv6, the
    positions in `keys`, the records)."""
    joined, count = b"".join(keys), len(keys)
    for family, dtype in _KEYS.items():
        if len(joined) == count * dtype.itemsize:  # one family only, as usual
            return [(family, np.arange(count), np.frombuffer(joined, dtype))]
    ipv6 = np.fromiter(map(len, keys), np.int64, count) == _KEYS[True].itemsize
    families = []
    for family in (False, True):
        members = np.flatnonzero(ipv6 == family)
        families.append((family, members, np.frombuffer(
            b"".join(pick(keys, members.tolist())), _KEYS[family])))
    return families


@dataclass
class _Poll:
    """What one `update_polled` keeps while it takes the pieces of a poll."""

    # 1 for slots tracked before the poll that it has not seen yet; then one more, always
    # 0, where a slot taken during the poll is marked seen
    unseen: np.ndarray
    number: int  # of the poll, 1 to 255: see ConnectionStore._filled_in
    ended: list[np.ndarray] = field(default_factory=list)  # slots whose end is due
    rejected: set[bytes] = field(default_factory=set)  # keys not tracked: the store is full


class ConnectionStore:
    def __init__(self, active_timeout: float, idle_timeout: float,
                 max_connections: int = 500_000, enricher: Enricher | None = None):
        self.active_timeout = active_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.enricher = enricher  # Pods, flowType, rule ids; None: addresses only
        # Where each batch of records goes as soon as it is encoded; None: `update` and
        # `flush` return them.
        self.hand_over: Callable[[EncodedRecords], None] | None = None
        # Connections not tracked because the store was full, or because a value was out of
        # its column's range: each counted once, however many polls bring it again.
        self.rejected = 0
        self.malformed = 0
        self._rejected_keys: set[bytes] = set()  # of the previous poll
        self._malformed_keys: set[bytes] = set()
        self._malformed_now: set[bytes] = set()  # of the poll in progress
        self._clear()

    def _clear(self) -> None:
        capacity = self.max_connections

        def column(numpy_type: str) -> memoryview:
            # np.zeros maps zero pages: memory is taken as slots are first used
            return memoryview(np.zeros(capacity, numpy_type))
        self._slots: dict[bytes, int] = {}  # identity -> slot
        self._used = 0  # slots ever taken: the columns' live part is [:_used]
        self._free: list[int] = []
        # The columns, indexed by slot. A free slot has key None.
        self._keys: list[bytes | None] = []
        self._protocols = column("u1")  # as the key says: for reads in bulk
        self._states = column("u2")  # codes in polled.STATE_NAMES
        self._labels = np.zeros(capacity, LABELS)
        self._pods: list[tuple] = []  # the Pods at the two ends, as last known (Enricher)
        self._ids = column("u4")  # conntrack id
        # counters as last polled, and as last exported
        self._packets, self._octets = column("u8"), column("u8")
        self._reply_packets, self._reply_octets = column("u8"), column("u8")
        self._exported_packets, self._exported_octets = column("u8"), column("u8")
        self._exported_reply_packets, self._exported_reply_octets = column("u8"), column("u8")
        self._last_activity, self._last_export = column("f8"), column("f8")
        # where the source's remaining timeout pointed (poll time + timeout) at the last
        # activity seen, for sources without counters
        self._expiries = column("f8")
        self._occupied = column("u1")  # 1: a connection is there
        self._ended = column("u1")  # 1: its end was exported
        self._quiet = column("u1")  # 1: its idle timeout was exported, no activity since
        self._reported = column("u1")  # 1: a record of it was made
        # What a record needs that stays the same for a conntrack id, besides what its key
        # says (protocol, ports, ICMP fields, addresses: read from the key when needed).
        self._counted = column("u1")
        self._start_ms = column("u8")  # the source's, or else the first poll that saw it
        # the connection's run of strings: an id in _spans (0: to be found), the Pod map's
        # generation it was found at, and the flowType found with it
        self._span, self._span_generation = column("u4"), column("u4")
        self._flow_type = column("u1")
        # The poll (see _Poll.number) that last filled each slot; then one more, never
        # filled, read for slot -1 (a key not tracked). A byte: polls are numbered 1 to
        # 255, and the column is cleared when the numbers start again.
        self._filled_in = np.zeros(capacity + 1, "u1")
        self._polls = 0
        self._spans: list[bytes] = [b""]
        self._span_lengths = np.zeros(1024, "u4")  # of _spans, by id: a gather per batch
        self._span_ids: dict[tuple, int] = {}
        # One object per distinct pair of Pods, however many connections hold it. Cleared
        # with the spans.
        self._values: dict = {}
        self._settings = 0  # the enricher's, when the spans were found
        self._previous_poll: float | None = None  # when every tracked connection was seen

    def __len__(self) -> int:
        return len(self._slots)

    def update(self, connections: Iterable[Connection], now: float) -> list[EncodedRecords]:
        """`update_polled` for connections as objects (the OVS source's parser, tests)."""
        return self.update_polled(self._as_polled(connections), now)

    def update_polled(self, pieces: Iterable[Polled], now: float) -> list[EncodedRecords]:
        """Take one poll's connections (already filtered), piece by piece as the source
        decodes them; make the records now due."""
        made: list[EncodedRecords] = []
        self._polls = self._polls % 255 + 1
        if self._polls == 1:
            self._filled_in[:self._used] = 0
        poll = _Poll(np.concatenate((np.asarray(self._occupied)[:self._used], _ZERO)),
                     self._polls)
        for piece in pieces:
            if len(piece):
                self._take_piece(piece, now, poll, made)
        if poll.rejected:
            first_time = len(poll.rejected - self._rejected_keys)
            self.rejected += first_time
            if first_time:
                log.warning("connection store full (%d connections): %d new connections not "
                            "tracked (%d so far); raise conntrack.maxConnections", len(self),
                            first_time, self.rejected)
        self._rejected_keys = poll.rejected
        self._malformed_keys, self._malformed_now = self._malformed_now, set()
        due: list[tuple[np.ndarray, int, float]] = []  # slots, end reason, end time
        ended = np.concatenate(poll.ended) if poll.ended else np.zeros(0, np.int64)
        if len(ended):
            slots = np.unique(ended)
            slots = slots[np.asarray(self._ended)[slots] == 0]
            np.asarray(self._ended)[slots] = 1
            due.append((slots, END_OF_FLOW, now))
        # Connections absent from this poll ended in between: one last record each, with
        # the counters and the time of the previous poll, the last that saw them.
        gone = np.flatnonzero(poll.unseen)
        due.append((gone[np.asarray(self._ended)[gone] == 0], END_OF_FLOW,
                    self._previous_poll or now))
        due += self._expired(now, gone)
        self._emit_together(due, made)
        self._drop(gone)
        self._previous_poll = now
        return made

    def _as_polled(self, connections: Iterable[Connection]) -> Iterator[Polled]:
        """BATCH connections a piece; one with a value out of its column's range (a port
        over 65535, say, from a source gone wrong) is counted, logged once and left out,
        and the poll goes on."""
        remaining = iter(connections)
        while piece := list(islice(remaining, BATCH)):
            while piece:
                try:
                    yield Polled.from_connections(piece)
                    break
                except Malformed as err:
                    c = err.connection
                    self._malformed_now.add(c.key)
                    if c.key not in self._malformed_keys:
                        self.malformed += 1
                        log.warning("connection not tracked, a value out of range (%s; %d so "
                                    "far): %r", err, self.malformed, c)
                    piece = [other for other in piece if other is not c]

    def _take_piece(self, piece: Polled, now: float, poll: _Poll,
                    made: list[EncodedRecords]) -> None:
        """Match a piece with the tracked connections by key, then compare in bulk: only
        new and reused connections cost Python statements each. New connections are filled
        first: then every row has its slot, and the comparisons run over the piece's
        columns as they are, with no gather (a row just filled compares as unchanged)."""
        count = len(piece)
        slots = np.fromiter(map(self._slots.get, piece.keys, repeat(-1, count)), np.int64,
                            count)
        again = self._filled_in[slots] == poll.number  # seen earlier in it (a retried dump)
        new_rows = np.flatnonzero(slots < 0)
        if len(new_rows):
            new_slots = np.array(self._take_new(piece.keys, new_rows.tolist(),
                                                poll.rejected), np.int64)
            slots[new_rows] = new_slots
            taken = new_slots >= 0
            self._fill(new_slots[taken], piece, new_rows[taken], now, poll)
            if not taken.all():  # rows left out (see _take_new) go
                tracked = slots >= 0
                piece, slots, again = piece.select(tracked), slots[tracked], again[tracked]
        if again.any():  # the last sighting counts
            self._fill(slots[again], piece, again, now, poll)
        poll.unseen[np.minimum(slots, len(poll.unseen) - 1)] = 0
        same_id = np.asarray(self._ids)[slots] == piece.ids
        counted = piece.counted
        ended_flags = np.asarray(self._ended)[slots].view(bool)  # 0 or 1
        polled_packets, packets = piece.packets, np.asarray(self._packets)[slots]
        unchanged = ((packets == polled_packets)
                     & (np.asarray(self._reply_packets)[slots] == piece.reply_packets))
        # Its end was exported and it moves again, or its counters went back: a new
        # connection that got the old one's id (where the key has no start time to tell).
        # Counters going back without an end are a reset (`conntrack -z`).
        reused = ~unchanged & ended_flags & (~piece.ended | (polled_packets < packets))
        if not counted.all():
            # Without counters: activity is a timeout refreshed (EXPIRY_SLACK above)
            uncounted = ~counted & same_id
            expiries = np.asarray(self._expiries)
            expiry = now + piece.timeouts.astype("f8")
            stored = expiries[slots]
            quiet = ((expiry <= stored + EXPIRY_SLACK)
                     & (piece.states == np.asarray(self._states)[slots]))
            shorter = uncounted & quiet & (expiry < stored - EXPIRY_SLACK)  # a shorter policy
            moved = uncounted & ~quiet
            chosen = shorter | moved
            expiries[slots[chosen]] = expiry[chosen]
            unchanged = np.where(counted, unchanged, quiet)
            reused = np.where(counted, reused, moved & ended_flags & ~piece.ended)
        reused |= ~same_id  # the same tuple under a new conntrack id: ended between polls
        poll.ended.append(slots[piece.ended & ~reused])  # unchanged or active
        active = ~unchanged & ~reused
        if active.any():
            self._activity(slots[active], piece, active, now)
        if reused.any():
            slots = slots[reused]
            # ended at the latest in the previous poll, the last that saw it (once, should a
            # retried dump bring it twice)
            old = np.unique(slots)
            self._emit(old[np.asarray(self._ended)[old] == 0], END_OF_FLOW,
                       self._previous_poll or now, made)
            self._fill(slots, piece, reused, now, poll)

    def _activity(self, slots: np.ndarray, piece: Polled, rows: np.ndarray, now: float
                  ) -> None:
        """Connections that moved (`rows`: a mask or positions). State and labels change
        only with packets: read them too."""
        for column, polled in ((self._packets, piece.packets), (self._octets, piece.octets),
                               (self._reply_packets, piece.reply_packets),
                               (self._reply_octets, piece.reply_octets)):
            np.asarray(column)[slots] = polled[rows]
        states, labels = np.asarray(self._states), self._labels
        polled_states, polled_labels = piece.states[rows], piece.labels[rows]
        changed = (states[slots] != polled_states) | labels_differ(labels[slots], polled_labels)
        if changed.any():
            changed_slots = slots[changed]
            states[changed_slots] = polled_states[changed]
            labels[changed_slots] = polled_labels[changed]
            np.asarray(self._span)[changed_slots] = 0
        np.asarray(self._last_activity)[slots] = now
        np.asarray(self._quiet)[slots] = 0

    def flush(self, now: float, continued: bool = False) -> list[EncodedRecords]:
        """Final records (the agent is stopping), after a last `update`. `continued`: the
        next agent takes over from the export state, so a live connection is not ended: it
        gets an active-timeout record if it moved since its last one or has had none yet (no
        next agent may come). Otherwise every live connection ends here (forced end)."""
        made: list[EncodedRecords] = []
        used = self._used
        live = np.asarray(self._occupied)[:used] & (np.asarray(self._ended)[:used] ^ 1)
        if not continued:
            self._emit(np.flatnonzero(live), FORCED_END, now, made)
            return made
        moved = (np.asarray(self._last_activity)[:used] > np.asarray(self._last_export)[:used])
        for polled, exported in ((self._packets, self._exported_packets),
                                 (self._reply_packets, self._exported_reply_packets)):
            moved |= np.asarray(polled)[:used] != np.asarray(exported)[:used]
        moved |= np.asarray(self._reported)[:used] == 0
        moved &= (live & (np.asarray(self._quiet)[:used] ^ 1)).astype(bool)
        self._emit(np.flatnonzero(moved), ACTIVE_TIMEOUT, now, made)
        return made

    def forget(self, keep: Callable[[np.ndarray], np.ndarray]) -> int:
        """Stop tracking, without a record, the connections for which `keep` (over their
        keys read as numpy records, see `_KEYS`) says False: a reload narrowed the filter,
        and they go on, they are only no longer wanted. Returns how many."""
        slots = np.flatnonzero(np.asarray(self._occupied)[:self._used])
        dropped = 0
        for _, members, identity in _identities(pick(self._keys, slots.tolist())):
            unwanted = slots[members[~keep(identity)]]
            self._drop(unwanted)
            dropped += len(unwanted)
        return dropped

    def snapshot(self, source: str) -> Parts:
        """What the collector has been told of each tracked connection (of `source`): keys
        and rows of `STATE_ROW` (see `restore`), made `chunk` slots at a time as they are
        written (the whole table at once would add tens of MB at 500k)."""
        return Parts(source, len(self._slots), STATE_ROW, self._state_parts())

    def _state_parts(self, chunk: int = 16384) -> Iterator[tuple[list[bytes], np.ndarray]]:
        occupied = np.asarray(self._occupied)
        for first in range(0, self._used, chunk):
            part = first + np.flatnonzero(occupied[first:first + chunk])
            rows = np.empty(len(part), STATE_ROW)
            for name, column in self._state_columns():
                rows[name] = np.asarray(column)[part]
            rows["flags"] = (np.asarray(self._ended)[part] | np.asarray(self._quiet)[part] << 1
                             | np.asarray(self._counted)[part] << 2
                             | np.asarray(self._reported)[part] << 3)
            yield list(pick(self._keys, part.tolist())), rows

    def restore(self, keys: Sequence[bytes], rows: np.ndarray, seen: float) -> int:
        """Track the connections of a previous agent's `snapshot`, last seen at `seen`,
        as that agent left them: the next poll counts deltas from what was exported, ends
        those gone since (with what was last exported: what they moved after that is
        unknown) and leaves alone those whose end was exported. Returns how many."""
        room = self.max_connections - len(self._slots)
        keys, rows = list(keys[:room]), rows[:room]
        slots = np.array(self._take_new(keys, range(len(keys)), set()), np.int64)
        tracked = slots >= 0
        if not tracked.all():  # a key twice: its last row counts
            slots, rows = slots[tracked], rows[tracked]
            keys = list(pick(keys, np.flatnonzero(tracked).tolist()))
        np.asarray(self._occupied)[slots] = 1
        for name, column in self._state_columns():
            np.asarray(column)[slots] = rows[name]
        for polled, name in ((self._packets, "packets"), (self._octets, "octets"),
                             (self._reply_packets, "reply_packets"),
                             (self._reply_octets, "reply_octets")):
            np.asarray(polled)[slots] = rows[name]
        flags = rows["flags"]
        np.asarray(self._ended)[slots] = flags & 1
        np.asarray(self._quiet)[slots] = flags >> 1 & 1
        np.asarray(self._counted)[slots] = flags >> 2 & 1
        np.asarray(self._reported)[slots] = flags >> 3 & 1
        np.asarray(self._span)[slots] = 0
        np.asarray(self._states)[slots] = 0
        np.asarray(self._protocols)[slots] = np.fromiter(map(itemgetter(0), keys), "u1",
                                                         len(keys))  # a key's first byte
        self._labels[slots] = NO_LABELS
        for slot in slots.tolist():
            self._pods[slot] = NO_PODS
        self._previous_poll = seen
        return len(keys)

    def _state_columns(self) -> list[tuple[str, memoryview]]:
        return [("id", self._ids), ("expiry", self._expiries), ("start_ms", self._start_ms),
                ("packets", self._exported_packets), ("octets", self._exported_octets),
                ("reply_packets", self._exported_reply_packets),
                ("reply_octets", self._exported_reply_octets),
                ("last_activity", self._last_activity), ("last_export", self._last_export)]

    def _take_new(self, keys: Sequence[bytes], rows: Iterable[int], rejected: set[bytes]
                  ) -> list[int]:
        """Slots for the new connections at `rows`, their columns to be filled; -1 for a
        row left out: the store is full (its key goes to `rejected`), or its key comes
        again in a later row (a retried dump: the last sighting counts)."""
        slots: list[int] = []
        index, free, stored_keys, pods = self._slots, self._free, self._keys, self._pods
        room = self.max_connections - len(index)
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
                    slot = self._used
                    self._used += 1
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

    def _fill(self, slots: np.ndarray, piece: Polled, rows: np.ndarray, now: float,
              poll: _Poll) -> None:
        """Conntrack entries start in their slots, written column by column."""
        for column, values in ((self._ids, piece.ids), (self._packets, piece.packets),
                               (self._octets, piece.octets),
                               (self._reply_packets, piece.reply_packets),
                               (self._reply_octets, piece.reply_octets),
                               (self._counted, piece.counted), (self._states, piece.states),
                               (self._protocols, piece.protocols)):
            np.asarray(column)[slots] = values[rows]
        self._labels[slots] = piece.labels[rows]
        np.asarray(self._expiries)[slots] = piece.timeouts[rows] + now
        start_ms = piece.starts_ns[rows] // 1_000_000
        start_ms[start_ms == 0] = int(now * 1000)
        np.asarray(self._start_ms)[slots] = start_ms
        for column in (self._exported_packets, self._exported_octets,
                       self._exported_reply_packets, self._exported_reply_octets,
                       self._ended, self._quiet, self._reported, self._span):
            np.asarray(column)[slots] = 0
        for column in (self._last_activity, self._last_export):
            np.asarray(column)[slots] = now
        np.asarray(self._occupied)[slots] = 1
        self._filled_in[slots] = poll.number
        poll.ended.append(slots[piece.ended[rows]])
        # The Pods at the two ends as the connection is first seen: a Pod that takes over
        # an address later is not credited with it.
        enricher, pods = self.enricher, self._pods
        if enricher is None or not enricher.has_pod_map:
            return  # no slot ever holds Pods
        if not enricher.knows_pods:
            for slot in slots.tolist():
                pods[slot] = NO_PODS
            return
        keys, shared = self._keys, self._shared
        for slot in slots.tolist():
            key = keys[slot]
            length = (len(key) - IDENTITY_SIZE) >> 1
            pods[slot] = shared(enricher.pods(key[IDENTITY_SIZE:IDENTITY_SIZE + length],
                                              key[IDENTITY_SIZE + length:]))

    def _shared(self, value):
        return self._values.setdefault(value, value)

    def _drop(self, slots: np.ndarray) -> None:
        index, keys, pods = self._slots, self._keys, self._pods
        for slot in slots.tolist():
            del index[keys[slot]]
            keys[slot] = None
            pods[slot] = NO_PODS
        np.asarray(self._occupied)[slots] = 0
        self._free += slots.tolist()  # for the next new connections

    def _expired(self, now: float, gone: np.ndarray) -> list[tuple[np.ndarray, int, float]]:
        """The live connections, `gone` aside, due at their idle or active timeout. Idle
        first: a connection both idle and at its active timeout ends as idle, and stays
        quiet until it moves again."""
        used = self._used
        live = (np.asarray(self._occupied)[:used]
                & ((np.asarray(self._ended)[:used] | np.asarray(self._quiet)[:used]) ^ 1)
                ).astype(bool)
        live[gone] = False
        idle = live & (np.asarray(self._last_activity)[:used] + self.idle_timeout <= now)
        active = live & ~idle & (np.asarray(self._last_export)[:used] + self.active_timeout
                                 <= now)
        idle_slots = np.flatnonzero(idle)
        np.asarray(self._quiet)[idle_slots] = 1
        return [(idle_slots, IDLE_TIMEOUT, now), (np.flatnonzero(active), ACTIVE_TIMEOUT, now)]

    def _emit_together(self, due: list[tuple[np.ndarray, int, float]],
                       made: list[EncodedRecords]) -> None:
        """A poll's records of every kind (slots, end reason, end time), made as one run:
        numpy's cost per call is paid once per batch, not once per kind."""
        due = [group for group in due if len(group[0])]
        if len(due) <= 1:
            for slots, reason, end in due:
                self._emit(slots, reason, end, made)
            return
        counts = [len(slots) for slots, _, _ in due]
        self._emit(np.concatenate([slots for slots, _, _ in due]),
                   np.repeat(np.array([reason for _, reason, _ in due], "u1"), counts),
                   np.repeat([end for _, _, end in due], counts), made)

    def _emit(self, slots: np.ndarray, reason: int | np.ndarray, end: float | np.ndarray,
              made: list[EncodedRecords]) -> None:
        """The records of the connections in `slots`, ending at `end` for `reason` (one
        each, or one for all), `BATCH` at a time."""
        for first in range(0, len(slots), BATCH):
            batch = self._records(*(value if np.ndim(value) == 0 else value[first:first + BATCH]
                                    for value in (slots, reason, end)))
            if self.hand_over is None:
                made.append(batch)
            else:
                self.hand_over(batch)

    def _records(self, slots: np.ndarray, reason: int | np.ndarray, end: float | np.ndarray
                 ) -> EncodedRecords:
        """Deltas are counted since each connection's previous record. A counter lower than
        last exported means the counters were reset in between (an operator's `conntrack -L
        -z` zeroes them all at once): then the deltas are the new totals, what the
        connection moved since the reset, never negative (as Antrea)."""
        self._find_spans(slots)
        column: dict[str, np.ndarray | int] = {}
        counters = [(total, delta, np.asarray(polled)[slots], np.asarray(exported))
                    for total, delta, polled, exported in (
                        ("packets", "packet_delta", self._packets, self._exported_packets),
                        ("octets", "octet_delta", self._octets, self._exported_octets),
                        ("reverse_packets", "reverse_packet_delta", self._reply_packets,
                         self._exported_reply_packets),
                        ("reverse_octets", "reverse_octet_delta", self._reply_octets,
                         self._exported_reply_octets))]
        previous = [exported[slots] for _, _, _, exported in counters]
        reset = np.zeros(len(slots), bool)
        for (_, _, polled, _), last in zip(counters, previous):
            reset |= polled < last
        any_reset = reset.any()
        for (total, delta, polled, exported), last in zip(counters, previous):
            if any_reset:
                last[reset] = 0
            column[total], column[delta] = polled, polled - last
            exported[slots] = polled
        np.asarray(self._last_export)[slots] = end
        np.asarray(self._reported)[slots] = 1
        start_ms = np.asarray(self._start_ms)[slots]
        end_ms = int(end * 1000) if np.ndim(end) == 0 else (end * 1000).astype("u8")
        column.update(
            start_ms=start_ms, end_ms=end_ms, start_seconds=start_ms // 1000,
            end_seconds=end_ms // 1000, end_reason=reason,
            flow_id=np.asarray(self._ids)[slots], flow_type=np.asarray(self._flow_type)[slots])
        batch = EncodedRecords()
        fits = column["start_seconds"] <= _SECONDS_LIMIT  # a start time from a bad clock
        if not fits.all():
            batch.rejected += [("flowStartSeconds", seconds)
                               for seconds in column["start_seconds"][~fits].tolist()]
        counted = np.asarray(self._counted)[slots].astype(bool)
        span_ids = np.asarray(self._span)[slots]
        span_lengths = self._span_lengths[:len(self._spans)]
        protocol_counts = np.bincount(np.asarray(self._protocols)[slots], minlength=256)
        protocols = np.flatnonzero(protocol_counts)
        batch.protocols.update(dict(zip(protocols.tolist(),
                                        protocol_counts[protocols].tolist())))
        for family, members, identity in _identities(pick(self._keys, slots.tolist())):
            for with_counters in (False, True):
                chosen = np.flatnonzero((counted[members] == with_counters) & fits[members])
                if not len(chosen):
                    continue
                at = members[chosen]
                whole = len(at) == len(slots)  # one family and template, as usual: as they are
                columns = dict(column) if whole else {
                    name: values[at] if isinstance(values, np.ndarray) else values
                    for name, values in column.items()}
                for name in identity.dtype.names:
                    columns[name] = identity[name] if whole else identity[name][chosen]
                columns["icmp_type_code"] = (columns["icmp_type"].astype("u2") << 8
                                             | columns["icmp_code"])
                record_template = _TEMPLATES[with_counters, family]
                data, starts = record_template.encode_columns(
                    columns, span_ids if whole else span_ids[at], self._spans, span_lengths)
                batch.groups.append((record_template.template, data,
                                     array("I", starts.astype("u4").tobytes())))
        return batch

    def _find_spans(self, slots: np.ndarray) -> None:
        """The run of strings (and flowType) of the connections in `slots` whose state or
        labels changed, or whose Pods may have, since it was last found."""
        enricher = self.enricher
        generation, settings = (enricher.generation, enricher.settings) if enricher else (0, 0)
        if (len(self._spans) > MAX_SPANS or len(self._values) > MAX_SPANS
                or settings != self._settings):
            self._spans, self._span_ids, self._values = [b""], {}, {}
            self._span_lengths = np.zeros(1024, "u4")
            self._settings = settings
            np.asarray(self._span)[:self._used] = 0
        stale = slots[(np.asarray(self._span)[slots] == 0)
                      | (np.asarray(self._span_generation)[slots] != generation)]
        if not len(stale):
            return
        keys, known, span, span_generation = self._keys, self._pods, self._span, \
            self._span_generation
        if enricher is None or not enricher.knows_pods:
            # None found now; none kept either without a Pod map, or when all are NO_PODS
            if (enricher is None or not enricher.has_pod_map
                    or pick(known, stale.tolist()).count(NO_PODS) == len(stale)):
                self._find_spans_without_pods(stale, generation)
                return
        labels = [b"" if value == NO_LABELS else value
                  for value in self._labels[stale].tolist()]
        for slot, code, label in zip(stale.tolist(), np.asarray(self._states)[stale].tolist(),
                                     labels):
            key = keys[slot]
            pods = NO_PODS
            if enricher is not None:
                length = (len(key) - IDENTITY_SIZE) >> 1
                source = key[IDENTITY_SIZE:IDENTITY_SIZE + length]
                destination = key[IDENTITY_SIZE + length:]
                pods = enricher.pods(source, destination, known[slot])
                if span[slot] and pods == known[slot]:  # the Pod map changed, not for it
                    span_generation[slot] = generation
                    continue
                pods = known[slot] = self._shared(pods)
                self._flow_type[slot] = flow_type(*pods, source, destination,
                                                  enricher.pod_networks)
            span[slot] = self._span_id(pods, label, STATE_NAMES[code] if key[0] == 6 else "")
            span_generation[slot] = generation

    def _find_spans_without_pods(self, stale: np.ndarray, generation: int) -> None:
        """`_find_spans` where no Pod is known or can be found: the run of strings is the
        TCP state and the labels. Without labels (most connections) each distinct state is
        looked up once, not once per connection; the flowType is unknown."""
        states = np.where(np.asarray(self._protocols)[stale] == 6,
                          np.asarray(self._states)[stale], 0)
        labels = self._labels[stale]
        labelled = labels_differ(labels, np.zeros_like(labels))
        span_ids = np.empty(len(stale), "u4")
        plain = ~labelled
        plain_states = states[plain]
        by_state = np.zeros(int(plain_states.max(initial=0)) + 1, "u4")
        for code in np.flatnonzero(np.bincount(plain_states)).tolist():
            by_state[code] = self._span_id(NO_PODS, b"", STATE_NAMES[code])
        span_ids[plain] = by_state[plain_states]
        if labelled.any():
            span_ids[labelled] = [self._span_id(NO_PODS, label, STATE_NAMES[code])
                                  for code, label in zip(states[labelled].tolist(),
                                                         labels[labelled].tolist())]
        np.asarray(self._span)[stale] = span_ids
        np.asarray(self._span_generation)[stale] = generation
        np.asarray(self._flow_type)[stale] = FLOW_TYPE_UNKNOWN

    def _span_id(self, pods: tuple, labels: bytes, state: str) -> int:
        """The id in `_spans` of this run of strings, encoded the first time it is seen."""
        values = (pods, labels, state)
        span_id = self._span_ids.get(values)
        if span_id is None:
            encoded = self._encode_span(*values)  # registered only once encoded
            span_id = self._span_ids[values] = len(self._spans)
            self._spans.append(encoded)
            if span_id == len(self._span_lengths):
                self._span_lengths = np.resize(self._span_lengths, 2 * span_id)
            self._span_lengths[span_id] = len(encoded)
        return span_id

    def _encode_span(self, pods: tuple, labels: bytes, state: str) -> bytes:
        """Filled as a deny record is, by the enricher (a record object once per distinct
        run of strings, not per record)."""
        record = FlowRecord(CONNTRACK, b"", b"", 0, tcp_state=state, labels=labels)
        if self.enricher is not None:
            self.enricher.name(record, pods)
        return _SPAN.span.encode_record(_SPAN.span_values(record))
