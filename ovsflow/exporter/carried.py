"""What a collector has not received, across a restart: a queue's records as a section of
the export state (`section`), and that section as batches to queue again (`batches`).

Each record goes with its identity (so that the next agent's records of the same
connection fold into it), its template id and its bytes, as the collector would have
received them: templates are fixed by id (ipfix/templates.py), and a change to them is a
new state format version.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

import numpy as np

from ..ipfix.templates import pick
from ..record import BATCH, EncodedRecords
from ..state import Parts, Values
from .queue import records_of
from .waiting import TEMPLATES, WaitingBatch

PREFIX = "queue "  # a collector's section is named PREFIX + its address (HOST:PORT:PROTO)
QUEUE_ROW = np.dtype([("template", "<u2")])
_SHORTEST = np.full(1 << 16, -1, np.int64)  # template id -> its shortest record
for _id, _template in TEMPLATES.items():
    _SHORTEST[_id] = _template.min_record_length


def section(collector: str, snapshot: list[EncodedRecords | WaitingBatch]) -> Parts:
    """The records of `ExportQueue.snapshot`, written part by part (in the thread that
    writes the file: the snapshot's batches are frozen), as runs of bytes: no object per
    record."""
    count = sum(part.waiting if isinstance(part, WaitingBatch) else len(part)
                for part in snapshot)
    return Parts(collector, count, QUEUE_ROW, _parts(snapshot), has_values=True)


def _parts(snapshot: list[EncodedRecords | WaitingBatch]
           ) -> Iterator[tuple[list[bytes], np.ndarray, Values]]:
    for part in snapshot:
        records = records_of(part)
        lengths, templates, chunks = [], [], []
        for template, data, starts in records.groups:
            begins = np.frombuffer(starts, np.uint32)
            lengths.append(np.diff(begins))
            templates.append(np.full(len(begins) - 1, template.template_id, "<u2"))
            chunks.append(memoryview(data)[int(begins[0]):int(begins[-1])])
        if not chunks:
            continue
        count = sum(map(len, lengths))
        yield (records.identities or [b""] * count,
               np.concatenate(templates).view(QUEUE_ROW), Values(np.concatenate(lengths), chunks))


def batches(parts: Parts) -> tuple[list[EncodedRecords], int]:
    """A section's records as batches of at most BATCH, in order; and how many were left
    out (a template this agent does not know, or a record shorter than its template's)."""
    made: list[EncodedRecords] = []
    left_out = 0
    for keys, rows, values in parts.parts:
        joined = b"".join(values.chunks)
        ends = np.cumsum(values.lengths, dtype=np.int64)
        templates = rows["template"]
        shortest = _SHORTEST[templates]  # -1: not a template this agent knows
        known = (shortest >= 0) & (values.lengths >= shortest)
        left_out += int(np.count_nonzero(~known))
        kept = np.flatnonzero(known)
        for first in range(0, len(kept), BATCH):
            chosen = kept[first:first + BATCH]
            batch = EncodedRecords(identities=list(pick(keys, chosen.tolist())))
            # runs of one template among consecutive records
            cuts = np.flatnonzero((templates[chosen][1:] != templates[chosen][:-1])
                                  | (chosen[1:] != chosen[:-1] + 1)) + 1
            for run in np.split(chosen, cuts):
                start, end = int(ends[run[0]] - values.lengths[run[0]]), int(ends[run[-1]])
                starts = ends[run] - start
                batch.groups.append((TEMPLATES[int(templates[run[0]])], joined[start:end],
                                     array("I", np.concatenate([[0], starts]).astype(
                                         "u4").tobytes())))
            made.append(batch)
    return made, left_out
