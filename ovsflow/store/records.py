"""Records made from the table's columns: the connections that `due` chose, written in bulk
as rows of their IPFIX templates.

`BATCH` slots at a time: their counters are gathered and their deltas computed (with the
reset rule), their protocol, ports and addresses read from their keys, their spans found
(`Spans.find`), and each template's records written as the rows of one structured array
(`RecordTemplate.encode_columns`): no object per record. Each record keeps its key beside
it (`EncodedRecords.identities`) for the export queues. Each batch leaves as
`EncodedRecords`, through `hand_over` (the agent passes it to the exporter while the poll
goes on) or, without it, in the list the caller gave.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

import numpy as np

from ..ipfix.templates import RECORD_TEMPLATES
from ..record import BATCH, CONNTRACK, CONNTRACK_UNCOUNTED, EncodedRecords
from .due import DueGroup
from .spans import Spans
from .table import ConnectionTable

# (counted, IPv6) -> the template of such a connection's records
_TEMPLATES = {
    (counted, ipv6): RECORD_TEMPLATES[CONNTRACK if counted else CONNTRACK_UNCOUNTED, ipv6]
    for counted in (False, True) for ipv6 in (False, True)}
_SECONDS_LIMIT = 0xFFFFFFFF  # dateTimeSeconds is 32 bits


class RecordMaker:
    def __init__(self, table: ConnectionTable, spans: Spans):
        self.table = table
        self.spans = spans
        # Where each batch of records goes as soon as it is encoded; None: to the list
        # the caller gave.
        self.hand_over: Callable[[EncodedRecords], None] | None = None

    def emit_together(self, due: list[DueGroup], made: list[EncodedRecords]) -> None:
        """A poll's records of every kind, made as one run: numpy's cost per call is paid
        once per batch, not once per kind. Each batch is put together from the groups it
        spans (the whole run at once would cost as much memory again as a wave of due
        records is long)."""
        due = [group for group in due if len(group[0])]
        if len(due) <= 1:
            for slots, reason, end in due:
                self.emit(slots, reason, end, made)
            return
        starts = np.cumsum([0] + [len(slots) for slots, _, _ in due])
        for first in range(0, int(starts[-1]), BATCH):
            parts = [(slots[max(first - start, 0):first + BATCH - start], reason, end)
                     for (slots, reason, end), start in zip(due, starts.tolist())
                     if start < first + BATCH and start + len(slots) > first]
            counts = [len(slots) for slots, _, _ in parts]
            self.emit(np.concatenate([slots for slots, _, _ in parts]),
                      np.repeat(np.array([reason for _, reason, _ in parts], "u1"), counts),
                      np.repeat([end for _, _, end in parts], counts), made)

    def emit(self, slots: np.ndarray, reason: int | np.ndarray, end: float | np.ndarray,
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
        table, spans = self.table, self.spans
        spans.find(slots)
        column: dict[str, np.ndarray | int] = {}
        counters = [(total, delta, np.asarray(polled)[slots], np.asarray(exported))
                    for total, delta, polled, exported in (
                        ("packets", "packet_delta", table.packets, table.exported_packets),
                        ("octets", "octet_delta", table.octets, table.exported_octets),
                        ("reverse_packets", "reverse_packet_delta", table.reply_packets,
                         table.exported_reply_packets),
                        ("reverse_octets", "reverse_octet_delta", table.reply_octets,
                         table.exported_reply_octets))]
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
        np.asarray(table.last_export)[slots] = end
        np.asarray(table.reported)[slots] = 1
        start_ms = np.asarray(table.start_ms)[slots]
        end_ms = int(end * 1000) if np.ndim(end) == 0 else (end * 1000).astype("u8")
        column.update(
            start_ms=start_ms, end_ms=end_ms, start_seconds=start_ms // 1000,
            end_seconds=end_ms // 1000, end_reason=reason,
            flow_id=np.asarray(table.ids)[slots], flow_type=np.asarray(table.flow_type)[slots])
        batch = EncodedRecords()
        fits = column["start_seconds"] <= _SECONDS_LIMIT  # a start time from a bad clock
        if not fits.all():
            batch.rejected += [("flowStartSeconds", seconds)
                               for seconds in column["start_seconds"][~fits].tolist()]
        counted = np.asarray(table.counted)[slots].astype(bool)
        span_ids = np.asarray(table.span)[slots]
        encoded_spans = spans.encoded
        span_lengths = spans.lengths[:len(encoded_spans)]
        protocol_counts = np.bincount(np.asarray(table.protocols)[slots], minlength=256)
        protocols = np.flatnonzero(protocol_counts)
        batch.protocols.update(dict(zip(protocols.tolist(),
                                        protocol_counts[protocols].tolist())))
        for family, members, identity in table.identities(slots):
            for with_counters in (False, True):
                chosen = np.flatnonzero((counted[members] == with_counters) & fits[members])
                if not len(chosen):
                    continue
                at = members[chosen]
                # encode_columns groups records by their span's length: in that order here
                # already, so that each record's identity stays beside it
                lengths = span_lengths[span_ids[at]]
                reordered = lengths.min() != lengths.max()
                if reordered:
                    order = np.argsort(lengths, kind="stable")
                    at, chosen = at[order], chosen[order]
                # one family and template in the order made, as usual: the columns as they are
                whole = len(at) == len(slots) and not reordered
                columns = dict(column) if whole else {
                    name: values[at] if isinstance(values, np.ndarray) else values
                    for name, values in column.items()}
                for name in identity.dtype.names:
                    columns[name] = identity[name] if whole else identity[name][chosen]
                columns["icmp_type_code"] = (columns["icmp_type"].astype("u2") << 8
                                             | columns["icmp_code"])
                record_template = _TEMPLATES[with_counters, family]
                data, starts = record_template.encode_columns(
                    columns, span_ids if whole else span_ids[at], encoded_spans, span_lengths)
                batch.groups.append((record_template.template, data,
                                     array("I", starts.astype("u4").tobytes())))
                batch.identities += table.key_bytes(slots[at])  # one family: one C call
        return batch
