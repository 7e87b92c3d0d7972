"""The table's part of the export state (`ovsflow.state`): what records were made of each
tracked connection (what the collectors did not receive of them waits in their queues,
saved beside), as rows for the next agent, and those rows taken back. The connections a
narrowed filter left out (forgotten.py) are written too, flagged: the next agent, like a
reload, continues them if its filter takes them again.

Written `chunk` slots at a time as the file is written (the whole table at once would add
tens of MB at 500k); restored part by part as the file's parts are read, each freed once
the table has it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter

import numpy as np

from ..enrich import NO_PODS
from ..ipfix.templates import pick
from ..polled import NO_LABELS, key_rows
from ..state import Parts
from .table import ConnectionTable, identities

# A tracked connection in the export state: the counters are those of its last record;
# flags: 1 its end was exported, 2 quiet (idle record sent), 4 counted, 8 reported (a record
# of it was sent), 16 left out by the filter (forgotten.py).
STATE_ROW = np.dtype([("id", "<u4"), ("expiry", "<f8"), ("start_ms", "<u8"),
                      ("packets", "<u8"), ("octets", "<u8"), ("reply_packets", "<u8"),
                      ("reply_octets", "<u8"), ("last_activity", "<f8"),
                      ("last_export", "<f8"), ("flags", "u1")])
LEFT_OUT = 16


def snapshot(table: ConnectionTable, source: str, forgotten) -> Parts:
    """The keys and `STATE_ROW`s of every tracked connection (of `source`), made as they
    are written, then those of the `forgotten` ones; as of the last poll (its time is the
    section's)."""
    return Parts(source, len(table) + len(forgotten), STATE_ROW, _parts(table, forgotten),
                 table.previous_poll)


def _parts(table: ConnectionTable, forgotten, chunk: int = 16384
           ) -> Iterator[tuple[list[bytes], np.ndarray]]:
    occupied = np.asarray(table.occupied)
    for first in range(0, table.used, chunk):
        part = first + np.flatnonzero(occupied[first:first + chunk])
        yield table.key_bytes(part), rows_of(table, part)
    if len(forgotten):
        yield list(forgotten.keys), forgotten.rows


def rows_of(table: ConnectionTable, slots: np.ndarray) -> np.ndarray:
    """The `STATE_ROW`s of the connections in `slots`."""
    rows = np.empty(len(slots), STATE_ROW)
    for name, column in _state_columns(table):
        rows[name] = np.asarray(column)[slots]
    rows["flags"] = (np.asarray(table.ended)[slots] | np.asarray(table.quiet)[slots] << 1
                     | np.asarray(table.counted)[slots] << 2
                     | np.asarray(table.reported)[slots] << 3)
    return rows


def restore(table: ConnectionTable, keys: Sequence[bytes], rows: np.ndarray, seen: float,
            forgotten, keep: Callable[[np.ndarray], np.ndarray] | None = None) -> int:
    """Track the connections of a previous agent's `snapshot`, last seen at `seen`, as that
    agent left them: the next poll counts deltas from its last records, ends those gone
    since (with the counters of their last records: what they moved after that is unknown)
    and leaves alone those whose end was exported. Those the previous agent's filter left
    out, and those `keep` (this agent's filter, over the keys read as numpy records) does
    not want, go to `forgotten`, as on a reload that narrows the filter. Returns how many
    are tracked."""
    left_out = rows["flags"] & LEFT_OUT != 0
    if keep is not None:
        for _, members, identity in identities(key_rows(keys)):
            left_out[members] |= ~keep(identity)
    if left_out.any():
        forgotten.add(list(pick(keys, np.flatnonzero(left_out).tolist())), rows[left_out])
        kept = np.flatnonzero(~left_out)
        keys, rows = list(pick(keys, kept.tolist())), rows[kept]
    room = table.capacity - len(table)
    keys, rows = list(keys[:room]), rows[:room]
    slots = np.array(table.take_new(keys, range(len(keys)), set()), np.int64)
    tracked = slots >= 0
    if not tracked.all():  # a key twice: its last row counts
        slots, rows = slots[tracked], rows[tracked]
        keys = list(pick(keys, np.flatnonzero(tracked).tolist()))
    np.asarray(table.occupied)[slots] = 1
    for name, column in _state_columns(table):
        np.asarray(column)[slots] = rows[name]
    for polled, name in ((table.packets, "packets"), (table.octets, "octets"),
                         (table.reply_packets, "reply_packets"),
                         (table.reply_octets, "reply_octets")):
        np.asarray(polled)[slots] = rows[name]
    flags = rows["flags"]
    np.asarray(table.ended)[slots] = flags & 1
    np.asarray(table.quiet)[slots] = flags >> 1 & 1
    np.asarray(table.counted)[slots] = flags >> 2 & 1
    np.asarray(table.reported)[slots] = flags >> 3 & 1
    np.asarray(table.span)[slots] = 0
    np.asarray(table.states)[slots] = 0
    np.asarray(table.protocols)[slots] = np.fromiter(map(itemgetter(0), keys), "u1",
                                                     len(keys))  # a key's first byte
    table.labels[slots] = NO_LABELS
    for slot in slots.tolist():
        table.pods[slot] = NO_PODS
    table.previous_poll = seen
    return len(keys)


def continue_from(table: ConnectionTable, slots: np.ndarray, rows: np.ndarray) -> None:
    """Connections just polled as new (`slots`) continue from their rows: deltas count
    from their last records, their start stays, and one that has not moved since its idle
    record stays quiet."""
    moved = np.zeros(len(slots), bool)
    for polled, exported, name in (
            (table.packets, table.exported_packets, "packets"),
            (table.octets, table.exported_octets, "octets"),
            (table.reply_packets, table.exported_reply_packets, "reply_packets"),
            (table.reply_octets, table.exported_reply_octets, "reply_octets")):
        np.asarray(exported)[slots] = rows[name]
        moved |= np.asarray(polled)[slots] != rows[name]
    np.asarray(table.start_ms)[slots] = rows["start_ms"]
    np.asarray(table.last_export)[slots] = rows["last_export"]
    np.asarray(table.reported)[slots] = rows["flags"] >> 3 & 1
    np.asarray(table.quiet)[slots] = rows["flags"] >> 1 & 1 & ~moved
    last_activity = np.asarray(table.last_activity)
    last_activity[slots] = np.where(moved, last_activity[slots], rows["last_activity"])


def _state_columns(table: ConnectionTable) -> list[tuple[str, memoryview]]:
    return [("id", table.ids), ("expiry", table.expiries), ("start_ms", table.start_ms),
            ("packets", table.exported_packets), ("octets", table.exported_octets),
            ("reply_packets", table.exported_reply_packets),
            ("reply_octets", table.exported_reply_octets),
            ("last_activity", table.last_activity), ("last_export", table.last_export)]
