"""Flow records as objects (`FlowRecord`: the deny path's, the tests') encoded into the
batches the exporter queues, `EncodedRecords`, as the connection store's are.

A record with a value its field cannot hold is rejected and listed on its own; it never
stops the others. A poll's records are encoded `BATCH` at a time as the store makes them,
in the poll's worker thread (`RecordEncoder`), so that no poll holds all its records as
objects at once.
"""

from __future__ import annotations

import functools
import struct
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import accumulate
from operator import attrgetter

from ..ipfix.codec import Template
from ..ipfix.templates import RECORD_TEMPLATES, RecordTemplate
from ..record import BATCH, EncodedRecords, FlowRecord

# What packing a value that does not fit its field raises (struct, int.to_bytes, strings)
ENCODE_ERRORS = (struct.error, OverflowError, ValueError, TypeError, AttributeError)

# (kind, address length) -> template: a record whose addresses are neither 4 nor 16 bytes
# has no template and is rejected rather than padded or cut to fit.
_TEMPLATES_BY_ADDRESS = {(kind, 16 if ipv6 else 4): template
                         for (kind, ipv6), template in RECORD_TEMPLATES.items()}


@functools.lru_cache(maxsize=None)
def _one_field(template: Template, index: int) -> Template:
    """A template of one field of `template`: packs a single value to find the culprit."""
    return Template(template.template_id, [template.fields[index]])


def _misfit(template: Template, values: tuple) -> tuple[str, object]:
    """The first field whose value `template` cannot encode: (element name, value)."""
    for index, value in enumerate(values):
        try:
            _one_field(template, index).encode_record((value,))
        except ENCODE_ERRORS:
            return template.fields[index].element.name, value
    return "record", values


_protocol = attrgetter("protocol")
_identity = attrgetter("identity")


def encode_records(records: list[FlowRecord]) -> EncodedRecords:
    """Sans-IO: the data records of `records`. The records of each template are packed in
    one go; only when that fails are they packed one by one, to leave out (and list) the
    records with a value their field cannot hold."""
    encoded = EncodedRecords(protocols=Counter(map(_protocol, records)))
    groups: dict[tuple[str, int], list[FlowRecord]] = {}
    for record in records:
        groups.setdefault((record.kind, len(record.source_address)), []).append(record)
    for key, grouped in groups.items():
        record_template = _TEMPLATES_BY_ADDRESS.get(key)
        if record_template is None:
            encoded.rejected += [("kind and address length", key)] * len(grouped)
            continue
        try:
            data = record_template.encode_many(grouped)
        except ENCODE_ERRORS:
            data, grouped = _encode_each(record_template, grouped, encoded.rejected)
        if data:
            encoded.groups.append((record_template.template, b"".join(data),
                                   array("I", accumulate(map(len, data), initial=0))))
            encoded.identities += map(_identity, grouped)
    return encoded


def _encode_each(record_template: RecordTemplate, records: list[FlowRecord],
                 rejected: list[tuple[str, object]]) -> tuple[list[bytes], list[FlowRecord]]:
    """The records that fit, encoded, and those records."""
    template, values = record_template.template, record_template.values
    encoded, kept = [], []
    for record in records:
        try:
            encoded.append(template.encode_record(values(record)))
            kept.append(record)
        except ENCODE_ERRORS:
            rejected.append(_misfit(template, values(record)))
    return encoded, kept


def encode_in_batches(records: Iterable[FlowRecord]) -> list[EncodedRecords]:
    """Records made outside a poll (deny path, final records), encoded as a poll's are."""
    encoder = RecordEncoder()
    for record in records:
        encoder.append(record)
    return encoder.finish()


class RecordEncoder:
    """Where a store puts the records of one poll, as into a list: every `BATCH` records are
    encoded at once, so that at most one batch of them exists as objects. Each full batch
    goes to `hand_over` as soon as it is encoded (the agent's sends it to the exporter from
    the poll's worker thread), or is kept; `finish()` returns those kept and the last one."""

    def __init__(self, hand_over: Callable[[EncodedRecords], None] | None = None) -> None:
        self._hand_over = hand_over
        self._pending: list[FlowRecord] = []
        self._encoded: list[EncodedRecords] = []

    def append(self, record: FlowRecord) -> None:
        pending = self._pending
        pending.append(record)
        if len(pending) >= BATCH:
            self._pending = []
            if self._hand_over is None:
                self._encoded.append(encode_records(pending))
            else:
                self._hand_over(encode_records(pending))

    def finish(self) -> list[EncodedRecords]:
        if self._pending:
            self._encoded.append(encode_records(self._pending))
            self._pending = []
        return self._encoded
