"""The connection store: what each poll means for export, in the order it happens.

Its rooms share one `ConnectionTable` (the columns and the identity index):

- `poll.PollComparer` takes a poll's pieces: new connections filled into slots, activity,
  ends and reused keys found by comparing columns in bulk;
- `due.DueRecords` says which connections are due a record and why (ended, gone, idle,
  active; at shutdown, final);
- `records.RecordMaker` writes their records straight from the columns as IPFIX template
  rows, `BATCH` at a time, with what they say beyond numbers from `spans.Spans`;
- `state_parts` writes the table into the export state and restores it from there;
- `forgotten.Forgotten` keeps what the last records of the connections a narrowed filter
  left out said, so that they continue from there when it takes them again.

Records leave `BATCH` at a time as `EncodedRecords`, through `hand_over` (the agent's
passes them to the exporter as the poll goes on) or, without it, as `update`'s result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from ..connection import Connection
from ..enrich import Enricher
from ..polled import Polled
from ..record import EncodedRecords
from ..rooms import room_attribute
from ..state import Parts
from . import state_parts
from .due import DueRecords
from .forgotten import Forgotten
from .poll import PollComparer
from .records import RecordMaker
from .spans import Spans
from .table import ConnectionTable


class ConnectionStore:
    def __init__(self, active_timeout: float, idle_timeout: float,
                 max_connections: int = 500_000, enricher: Enricher | None = None,
                 heartbeat: float = 0.0):
        self.table = ConnectionTable(max_connections)
        self.spans = Spans(self.table, enricher)
        self.due = DueRecords(self.table, active_timeout, idle_timeout, heartbeat)
        self.records = RecordMaker(self.table, self.spans)
        self.poll = PollComparer(self.table, self.spans, self.due, self.records)
        self.forgotten = Forgotten(max_connections)
        # The filter over keys read as numpy records (see `forget`); None: every connection
        self.wanted: Callable[[np.ndarray], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.table)

    # The rooms' settings and counters that the agent, a reload and the metrics know by
    # the store's names
    active_timeout = room_attribute("due", "active_timeout")
    idle_timeout = room_attribute("due", "idle_timeout")
    heartbeat = room_attribute("due", "heartbeat")  # 0: none
    # Where each batch of records goes as soon as it is encoded; None: `update` and `flush`
    # return them.
    hand_over = room_attribute("records", "hand_over")
    # Connections not tracked because the store was full, or because a value was out of its
    # column's range: each counted once, however many polls bring it again.
    rejected = room_attribute("poll", "rejected")
    malformed = room_attribute("poll", "malformed")

    def update(self, connections: Iterable[Connection], now: float) -> list[EncodedRecords]:
        """`update_polled` for connections as objects (the OVS source's parser, tests)."""
        return self.update_polled(self.poll.as_polled(connections), now)

    def update_polled(self, pieces: Iterable[Polled], now: float) -> list[EncodedRecords]:
        """Take one poll's connections (already filtered), piece by piece as the source
        decodes them; make the records now due."""
        made: list[EncodedRecords] = []
        poll = self.poll.begin()
        for piece in pieces:
            if len(piece):
                self.poll.take(piece, now, poll, made)
        self.poll.finish(poll)
        self.forgotten.resume(self.table)
        gone = np.flatnonzero(poll.unseen)
        self.records.emit_together(self.due.of_poll(poll.ended, gone, now), made)
        self.table.drop(gone)
        self.table.previous_poll = now
        return made

    def flush(self, now: float, continued: bool = False) -> list[EncodedRecords]:
        """Final records (the agent is stopping), after a last `update`; `continued`: the
        next agent takes over from the export state (see `DueRecords.at_shutdown`)."""
        made: list[EncodedRecords] = []
        slots, reason = self.due.at_shutdown(continued)
        self.records.emit(slots, reason, now, made)
        return made

    def forget(self, keep: Callable[[np.ndarray], np.ndarray] | None = None) -> int:
        """Stop tracking, without a record, the connections for which `keep` (default:
        `wanted`; over their keys read as numpy records, see `table.KEYS`) says False: a
        reload narrowed the filter, and they go on, they are only no longer wanted. What
        their last records said is kept (`forgotten`): those `keep` takes again continue
        after the next poll. Returns how many were left out now."""
        keep = keep or self.wanted
        slots = np.flatnonzero(np.asarray(self.table.occupied)[:self.table.used])
        dropped = 0
        for _, members, identity in self.table.identities(slots):
            unwanted = slots[members[~keep(identity)]]
            self.forgotten.add(self.table.key_bytes(unwanted),
                               state_parts.rows_of(self.table, unwanted))
            self.table.drop(unwanted)
            dropped += len(unwanted)
        self.forgotten.keep = keep
        return dropped

    def snapshot(self, source: str) -> Parts:
        """What records were made of each tracked connection (of `source`), and of those
        the filter left out, for the export state (see `state_parts`)."""
        return state_parts.snapshot(self.table, source, self.forgotten)

    def restore(self, keys: Sequence[bytes], rows: np.ndarray, seen: float) -> int:
        """Track the connections of a previous agent's `snapshot`, last seen at `seen`
        (see `state_parts.restore`), those `wanted`: the others are left out as a reload
        leaves them. Returns how many are tracked."""
        restored = state_parts.restore(self.table, keys, rows, seen, self.forgotten,
                                       self.wanted)
        self.forgotten.keep = self.wanted or _everything
        return restored


def _everything(keys: np.ndarray) -> np.ndarray:
    return np.ones(len(keys), bool)
