"""The table's part of the export state (`ovsflow.state`): what the collector has been told
of each tracked connection, as rows for the next agent, and those rows taken back.

Written `chunk` slots at a time as the file is written (the whole table at once would add
tens of MB at 500k); restored part by part as the file's parts are read, each freed once
the table has it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from operator import itemgetter

import numpy as np

from ..enrich import NO_PODS
from ..ipfix.templates import pick
from ..polled import NO_LABELS
from ..state import Parts
from .table import ConnectionTable

# A tracked connection in the export state: the counters are those last exported; flags:
# 1 its end was exported, 2 quiet (idle record sent), 4 counted, 8 reported (a record of it
# was sent).
STATE_ROW = np.dtype([("id", "<u4"), ("expiry", "<f8"), ("start_ms", "<u8"),
                      ("packets", "<u8"), ("octets", "<u8"), ("reply_packets", "<u8"),
                      ("reply_octets", "<u8"), ("last_activity", "<f8"),
                      ("last_export", "<f8"), ("flags", "u1")])


def snapshot(table: ConnectionTable, source: str) -> Parts:
    """The keys and `STATE_ROW`s of every tracked connection (of `source`), made as they
    are written."""
    return Parts(source, len(table), STATE_ROW, _parts(table))


def _parts(table: ConnectionTable, chunk: int = 16384
           ) -> Iterator[tuple[list[bytes], np.ndarray]]:
    occupied = np.asarray(table.occupied)
    for first in range(0, table.used, chunk):
        part = first + np.flatnonzero(occupied[first:first + chunk])
        rows = np.empty(len(part), STATE_ROW)
        for name, column in _state_columns(table):
            rows[name] = np.asarray(column)[part]
        rows["flags"] = (np.asarray(table.ended)[part] | np.asarray(table.quiet)[part] << 1
                         | np.asarray(table.counted)[part] << 2
                         | np.asarray(table.reported)[part] << 3)
        yield table.key_bytes(part), rows


def restore(table: ConnectionTable, keys: Sequence[bytes], rows: np.ndarray, seen: float
            ) -> int:
    """Track the connections of a previous agent's `snapshot`, last seen at `seen`, as that
    agent left them: the next poll counts deltas from what was exported, ends those gone
    since (with what was last exported: what they moved after that is unknown) and leaves
    alone those whose end was exported. Returns how many."""
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


def _state_columns(table: ConnectionTable) -> list[tuple[str, memoryview]]:
    return [("id", table.ids), ("expiry", table.expiries), ("start_ms", table.start_ms),
            ("packets", table.exported_packets), ("octets", table.exported_octets),
            ("reply_packets", table.exported_reply_packets),
            ("reply_octets", table.exported_reply_octets),
            ("last_activity", table.last_activity), ("last_export", table.last_export)]
