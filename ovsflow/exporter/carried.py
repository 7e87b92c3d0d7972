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
from itertools import accumulate, pairwise

import numpy as np

from ..record import BATCH, EncodedRecords
from ..state import Parts
from .queue import records_of
from .waiting import TEMPLATES, WaitingBatch

PREFIX = "queue "  # a collector's section is named PREFIX + its address (HOST:PORT:PROTO)
QUEUE_ROW = np.dtype([("template", "<u2")])


def section(collector: str, snapshot: list[EncodedRecords | WaitingBatch]) -> Parts:
    """The records of `ExportQueue.snapshot`, written part by part (in the thread that
    writes the file: the snapshot's batches are frozen)."""
    count = sum(part.waiting if isinstance(part, WaitingBatch) else len(part)
                for part in snapshot)
    return Parts(collector, count, QUEUE_ROW, _parts(snapshot), has_values=True)


def _parts(snapshot: list[EncodedRecords | WaitingBatch]
           ) -> Iterator[tuple[list[bytes], np.ndarray, list[bytes]]]:
    for part in snapshot:
        records = records_of(part)
        values: list[bytes] = []
        templates = np.empty(len(records), "<u2")
        for template, data, starts in records.groups:
            templates[len(values):len(values) + len(starts) - 1] = template.template_id
            view = memoryview(data)
            values += [bytes(view[start:end]) for start, end in pairwise(starts)]
        identities = records.identities or [b""] * len(values)
        yield identities, templates.view(QUEUE_ROW), values


def batches(parts: Parts) -> tuple[list[EncodedRecords], int]:
    """A section's records as batches of at most BATCH, in order; and how many were left
    out (a template this agent does not know, or a record shorter than its template's)."""
    made: list[EncodedRecords] = []
    left_out = 0
    for keys, rows, values in parts.parts:
        current = EncodedRecords()
        run: list[bytes] = []
        run_template = None
        for identity, template_id, value in zip(keys, rows["template"].tolist(), values):
            template = TEMPLATES.get(template_id)
            if template is None or len(value) < template.min_record_length:
                left_out += 1
                continue
            if template is not run_template or len(current.identities) >= BATCH:
                _close_run(current, run_template, run)
                if len(current.identities) >= BATCH:
                    made.append(current)
                    current = EncodedRecords()
                run, run_template = [], template
            run.append(value)
            current.identities.append(identity)
        _close_run(current, run_template, run)
        if current.identities:
            made.append(current)
    return made, left_out


def _close_run(records: EncodedRecords, template, run: list[bytes]) -> None:
    if run:
        records.groups.append((template, b"".join(run),
                               array("I", accumulate(map(len, run), initial=0))))
