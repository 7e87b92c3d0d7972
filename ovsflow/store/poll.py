"""What a poll means for the table: its pieces matched with the tracked connections and
compared with them in bulk.

A poll brings 10k-500k connections of which a few percent are new, gone, changed or due,
so this is built for the unchanged majority. A poll comes as columns (`polled.Polled`, a
piece per run of receive buffers): its keys are found in the table's index in bulk
(`index.KeyIndex`), and ids, counters, timeouts and states compared with the slots' in a
few array operations. Python statements run per connection only for those that are new or reused
(their slots taken) or gone (their keys let go, by the store).

What it finds: new connections (filled into slots), activity (counters, state and labels
written; a changed state or labels invalidate the span), connections that ended (the
source says so) and connections replaced by another under the same key, whose end record
is made at once, before their slots are filled again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from ..connection import Connection
from ..polled import Malformed, Polled, labels_differ
from ..record import BATCH, EncodedRecords
from .due import DueRecords
from .records import RecordMaker
from .spans import Spans
from .table import ConnectionTable

log = logging.getLogger(__name__)

_ZERO = np.zeros(1, "u1")
# Without counters (OVS userspace conntrack) a packet shows in the remaining timeout: each
# packet sets it back to the state's full timeout, and otherwise it runs down with the
# clock, so the time it points to (poll time + remaining timeout) stays put while the
# connection is quiet and moves on when a packet came. It counts as moved once it is this
# far past where it stood at the connection's last activity: the whole seconds OVS prints,
# and when in a poll the entry was read.
EXPIRY_SLACK = 1.5


@dataclass
class PollMarks:
    """What one poll keeps while its pieces are taken."""

    # 1 for slots tracked before the poll that it has not seen yet; then one more, always
    # 0, where a slot taken during the poll is marked seen
    unseen: np.ndarray
    number: int  # of the poll, 1 to 255: see ConnectionTable.filled_in
    ended: list[np.ndarray] = field(default_factory=list)  # slots whose end is due
    rejected: set[bytes] = field(default_factory=set)  # keys not tracked: the table is full


class PollComparer:
    def __init__(self, table: ConnectionTable, spans: Spans, due: DueRecords,
                 records: RecordMaker):
        self.table, self.spans, self.due, self.records = table, spans, due, records
        # Connections not tracked because the table was full, or because a value was out of
        # its column's range: each counted once, however many polls bring it again.
        self.rejected = 0
        self.malformed = 0
        self._rejected_keys: set[bytes] = set()  # of the previous poll
        self._malformed_keys: set[bytes] = set()
        self._malformed_now: set[bytes] = set()  # of the poll in progress
        self._polls = 0

    def begin(self) -> PollMarks:
        table = self.table
        self._polls = self._polls % 255 + 1
        if self._polls == 1:
            table.filled_in[:table.used] = 0
        table.order.begin()
        return PollMarks(np.concatenate((np.asarray(table.occupied)[:table.used], _ZERO)),
                         self._polls)

    def finish(self, poll: PollMarks) -> None:
        """The connections left out by this poll, counted and logged once each."""
        self.table.order.finish()
        if poll.rejected:
            first_time = len(poll.rejected - self._rejected_keys)
            self.rejected += first_time
            if first_time:
                log.warning("connection store full (%d connections): %d new connections not "
                            "tracked (%d so far); raise conntrack.maxConnections",
                            len(self.table), first_time, self.rejected)
        self._rejected_keys = poll.rejected
        self._malformed_keys, self._malformed_now = self._malformed_now, set()

    def as_polled(self, connections: Iterable[Connection]) -> Iterator[Polled]:
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

    def take(self, piece: Polled, now: float, poll: PollMarks,
             made: list[EncodedRecords]) -> None:
        """Match a piece with the tracked connections by key, then compare in bulk: only
        new and reused connections cost Python statements each. New connections are filled
        first: then every row has its slot, and the comparisons run over the piece's
        columns as they are, with no gather (a row just filled compares as unchanged)."""
        table = self.table
        slots, hashes = table.find(piece.keys)
        again = table.filled_in[slots] == poll.number  # seen earlier in it (a retried dump)
        new_rows = np.flatnonzero(slots < 0)
        if len(new_rows):
            new_slots = table.take_new(piece.keys, new_rows, poll.rejected, hashes)
            slots[new_rows] = new_slots
            taken = new_slots >= 0
            self._fill(new_slots[taken], piece, new_rows[taken], now, poll)
        table.order.saw(slots)
        if len(new_rows) and not taken.all():  # rows left out (see take_new) go
            tracked = slots >= 0
            piece, slots, again = piece.select(tracked), slots[tracked], again[tracked]
        if again.any():  # the last sighting counts
            self._fill(slots[again], piece, again, now, poll)
        poll.unseen[np.minimum(slots, len(poll.unseen) - 1)] = 0
        same_id = np.asarray(table.ids)[slots] == piece.ids
        counted = piece.counted
        ended_flags = np.asarray(table.ended)[slots].view(bool)  # 0 or 1
        polled_packets, packets = piece.packets, np.asarray(table.packets)[slots]
        unchanged = ((packets == polled_packets)
                     & (np.asarray(table.reply_packets)[slots] == piece.reply_packets))
        # Its end was exported and it moves again, or its counters went back: a new
        # connection that got the old one's id (where the key has no start time to tell).
        # Counters going back without an end are a reset (`conntrack -z`).
        reused = ~unchanged & ended_flags & (~piece.ended | (polled_packets < packets))
        if not counted.all():
            # Without counters: activity is a timeout refreshed (EXPIRY_SLACK above)
            uncounted = ~counted & same_id
            expiries = np.asarray(table.expiries)
            expiry = now + piece.timeouts.astype("f8")
            stored = expiries[slots]
            quiet = ((expiry <= stored + EXPIRY_SLACK)
                     & (piece.states == np.asarray(table.states)[slots]))
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
            self.records.emit(*self.due.replaced(slots, now), made)
            self._fill(slots, piece, reused, now, poll)

    def _fill(self, slots: np.ndarray, piece: Polled, rows: np.ndarray, now: float,
              poll: PollMarks) -> None:
        poll.ended.append(self.table.fill(slots, piece, rows, now, poll.number))
        self.spans.first_pods(slots)

    def _activity(self, slots: np.ndarray, piece: Polled, rows: np.ndarray, now: float
                  ) -> None:
        """Connections that moved (`rows`: a mask or positions). State and labels change
        only with packets: read them too."""
        table = self.table
        for column, polled in ((table.packets, piece.packets), (table.octets, piece.octets),
                               (table.reply_packets, piece.reply_packets),
                               (table.reply_octets, piece.reply_octets)):
            np.asarray(column)[slots] = polled[rows]
        states, labels = np.asarray(table.states), table.labels
        polled_states, polled_labels = piece.states[rows], piece.labels[rows]
        changed = (states[slots] != polled_states) | labels_differ(labels[slots], polled_labels)
        if changed.any():
            changed_slots = slots[changed]
            states[changed_slots] = polled_states[changed]
            labels[changed_slots] = polled_labels[changed]
            np.asarray(table.span)[changed_slots] = 0
        np.asarray(table.last_activity)[slots] = now
        np.asarray(table.quiet)[slots] = 0
