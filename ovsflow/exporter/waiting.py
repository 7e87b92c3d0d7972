"""One queued batch's records as they wait in a collector's queue (backlog.py): which still
wait, which can fold into a newer record of their connection, and their delta counters,
read and added to in bulk.

The delta counters sit at fixed offsets in each template's fixed head (`Layout`): a
batch's are read and written as big-endian u64 in a few numpy operations. Bytes are
copied before they are patched, never changed in place (copy on write), so that the other
collectors' copies of a batch, and a snapshot of the queue for the export state read in
another thread, keep what they have.

A record folds into nothing when its flow ended (end of flow, forced end, lack of
resources; for a deny record also the idle timeout, which ends its entry) or when it has no
identity.
"""

from __future__ import annotations

import functools
from array import array
from dataclasses import dataclass

import numpy as np

from ..ipfix.codec import Template
from ..ipfix.templates import ALL_TEMPLATES, RECORD_TEMPLATES, pick
from ..record import (
    DENY, END_OF_FLOW, FORCED_END, IDLE_TIMEOUT, LACK_OF_RESOURCES, EncodedRecords,
)

# A waiting record's ticket: its batch's serial << SHIFT | its position in the batch
SHIFT = 20
POSITION = (1 << SHIFT) - 1
DELTAS = ("packetDeltaCount", "octetDeltaCount", "reversePacketDeltaCount",
          "reverseOctetDeltaCount")
_DENY_TEMPLATES = {RECORD_TEMPLATES[DENY, ipv6].template.template_id for ipv6 in (False, True)}


@dataclass(frozen=True, eq=False)
class Layout:
    """Where a template's records hold what folding needs: the delta counters (offsets in
    the fixed head; none in templates without counters) and flowEndReason, and which end
    reasons end the flow."""
    deltas: tuple[tuple[int, int], ...]  # (column in DELTAS, offset)
    reason: int  # offset of flowEndReason, -1 when the template has none
    ends: np.ndarray  # bool per flowEndReason value

    @classmethod
    def of(cls, template: Template) -> Layout:
        offsets, offset = {}, 0
        for f in template.fields:
            if f.variable:
                break
            offsets[f.element.name] = offset
            offset += f.length
        ends = np.zeros(256, bool)
        ends[[END_OF_FLOW, FORCED_END, LACK_OF_RESOURCES]] = True
        if template.template_id in _DENY_TEMPLATES:  # a deny entry ends at its idle timeout
            ends[IDLE_TIMEOUT] = True
        return cls(tuple((column, offsets[name]) for column, name in enumerate(DELTAS)
                         if name in offsets), offsets.get("flowEndReason", -1), ends)


LAYOUTS = {template.template_id: Layout.of(template) for template in ALL_TEMPLATES}
TEMPLATES = {template.template_id: template for template in ALL_TEMPLATES}


def _layout(template: Template) -> Layout:
    layout = LAYOUTS.get(template.template_id)
    return layout if layout is not None else Layout.of(template)


@functools.lru_cache(maxsize=256)
def _rows(layout: Layout, length: int) -> np.dtype:
    """A template's records of one `length` as rows whose fields are its delta counters."""
    return np.dtype({"names": [DELTAS[column] for column, _ in layout.deltas],
                     "formats": [">u8"] * len(layout.deltas),
                     "offsets": [offset for _, offset in layout.deltas], "itemsize": length})


class WaitingBatch:
    """One queued batch's records as they wait: which are still waiting (`alive`), which can
    fold (`mergeable`), and its records in runs of one template and one length (`runs`:
    group, first position, end position, length), each read as rows whose fields are the
    delta counters. A group written by the connection store is one run, or a few (its
    records come grouped by the length of their strings)."""

    __slots__ = ("serial", "groups", "identities", "bounds", "offsets", "runs", "run_firsts",
                 "alive", "mergeable", "waiting", "unmergeable", "generation", "indexed",
                 "in_index")

    def __init__(self, serial: int, records: EncodedRecords,
                 mergeable: np.ndarray | None = None):
        """`mergeable`: which records can fold, when already known (a batch compacted)."""
        self.serial = serial
        self.groups = list(records.groups)
        self.identities = records.identities
        counts = [len(starts) - 1 for _, _, starts in self.groups]
        self.bounds = np.cumsum([0, *counts])
        total = int(self.bounds[-1])
        self.offsets = np.empty(total, np.int64)
        self.runs: list[tuple[int, int, int, int]] = []
        ended = np.zeros(total, bool)
        for group, ((template, data, starts), first, last) in enumerate(
                zip(self.groups, self.bounds.tolist(), self.bounds[1:].tolist())):
            begins = np.frombuffer(starts, np.uint32).astype(np.int64)
            self.offsets[first:last] = begins[:-1]
            lengths = np.diff(begins)
            cuts = [0, *(np.flatnonzero(lengths[1:] != lengths[:-1]) + 1).tolist(), len(lengths)]
            self.runs += [(group, first + a, first + b, int(lengths[a]))
                          for a, b in zip(cuts, cuts[1:]) if b > a]
            if mergeable is not None:
                continue
            layout = _layout(template)
            if layout.reason >= 0:
                ended[first:last] = layout.ends[np.frombuffer(data, np.uint8)[
                    begins[:-1] + layout.reason]]
            else:
                ended[first:last] = True
        self.run_firsts = np.array([first for _, first, _, _ in self.runs], np.int64)
        if len(self.identities) != total:  # no identities: nothing folds
            self.identities = [b""] * total
            mergeable = np.zeros(total, bool)
        elif mergeable is None:
            mergeable = ~ended
            if b"" in self.identities:
                mergeable &= np.fromiter(map(len, self.identities), np.int64, total) > 0
        self.mergeable = mergeable
        self.alive = np.ones(total, bool)
        self.waiting = total
        self.unmergeable = total - int(np.count_nonzero(mergeable))
        self.generation = 0  # the poll that made it (Backlog.new_generation)
        self.indexed = False  # all its mergeable waiting records are in the Backlog's index
        self.in_index = 0  # how many of them are (those that took in an older record)

    def tickets(self, positions: np.ndarray) -> list[int]:
        return (positions + (self.serial << SHIFT)).tolist()

    def template_ids(self, positions: np.ndarray) -> np.ndarray:
        ids = np.array([template.template_id for template, _, _ in self.groups], np.int64)
        return ids[np.searchsorted(self.bounds, positions, side="right") - 1]

    def deltas(self, positions: np.ndarray) -> np.ndarray:
        """The delta counters of the records at `positions`: one row of DELTAS each (0 where
        the template has no such counter)."""
        values = np.zeros((len(positions), len(DELTAS)), np.uint64)
        for run, chosen, at in self._by_run(positions):
            rows = self._rows(run, self.groups[self.runs[run][0]][1])
            for name in rows.dtype.names:
                values[chosen, DELTAS.index(name)] = rows[name][at]
        return values

    def add_deltas(self, positions: np.ndarray, values: np.ndarray) -> None:
        """Add `values` (rows of DELTAS) to the records at `positions`, in a copy of their
        groups' bytes (copy on write: bytes once queued are never changed in place)."""
        copied: dict[int, bytearray] = {}
        for run, chosen, at in self._by_run(positions):
            group = self.runs[run][0]
            if group not in copied:
                template, data, starts = self.groups[group]
                copied[group] = bytearray(data)
                self.groups[group] = (template, copied[group], starts)
            rows = self._rows(run, copied[group])
            for name in rows.dtype.names:
                rows[name][at] = rows[name][at] + values[chosen, DELTAS.index(name)]

    def _by_run(self, positions: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(run, which of `positions`, their rows in the run), run by run."""
        runs = np.searchsorted(self.run_firsts, positions, side="right") - 1
        return [(run, chosen, positions[chosen] - self.runs[run][1])
                for run in np.unique(runs).tolist()
                for chosen in [np.flatnonzero(runs == run)]]

    def _rows(self, run: int, data: bytes | bytearray) -> np.ndarray:
        """The run's records in `data` as rows of their delta counters (writable when
        `data` is)."""
        group, first, end, length = self.runs[run]
        return np.frombuffer(data, _rows(_layout(self.groups[group][0]), length), end - first,
                             int(self.offsets[first]))

    def leave_out(self, positions: np.ndarray) -> int:
        """The records at `positions` no longer wait. Returns how many of them were
        unmergeable."""
        self.alive[positions] = False
        self.waiting -= len(positions)
        unmergeable = len(positions) - int(np.count_nonzero(self.mergeable[positions]))
        self.unmergeable -= unmergeable
        if not self.waiting:  # nothing left: its bytes go now, its place when at the front
            self.groups, self.identities = [], []
        return unmergeable

    def records(self) -> EncodedRecords:
        """The records still waiting, as a batch of their own."""
        if self.waiting == len(self.alive):
            return EncodedRecords(list(self.groups), identities=list(self.identities))
        groups = []
        for (template, data, starts), first, last in zip(self.groups, self.bounds,
                                                         self.bounds[1:]):
            keep = self.alive[first:last]
            if keep.all():
                groups.append((template, data, starts))
            elif keep.any():
                begins = np.frombuffer(starts, np.uint32).astype(np.int64)
                lengths = np.diff(begins)
                kept = np.frombuffer(data, np.uint8)[begins[0]:begins[-1]][
                    np.repeat(keep, lengths)]
                new_starts = np.zeros(int(np.count_nonzero(keep)) + 1, np.uint32)
                np.cumsum(lengths[keep], out=new_starts[1:])
                groups.append((template, kept.tobytes(), array("I", new_starts.tobytes())))
        return EncodedRecords(groups, identities=list(pick(
            self.identities, np.flatnonzero(self.alive).tolist())))

    def frozen(self) -> WaitingBatch:
        """A copy that later changes to this one leave as it is (a snapshot read in another
        thread): its bytes are never changed in place, only replaced."""
        copy = object.__new__(WaitingBatch)
        for name in WaitingBatch.__slots__:
            setattr(copy, name, getattr(self, name))
        copy.groups, copy.alive = list(self.groups), self.alive.copy()
        return copy
