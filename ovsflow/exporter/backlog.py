"""A collector's undelivered records, at most one per connection.

Records wait in the batches they were queued in (`WaitingBatch`: an `EncodedRecords`'
groups, each record's identity, which records are still waiting). `Backlog` keeps them in
order with an index from each connection's identity to its one waiting record. When a newer
record of the same connection is queued while the older one waits (not yet on its way: see
flight.py), the older one is left out and its deltas are added into the newer one, so that
a live connection loses no byte however long its collector is away, and what waits is
bounded by the connections, not by the outage's length. The delta counters sit at fixed
offsets in each template's fixed head (`Layout`): a batch's are read and written as
big-endian u64 in a few numpy operations. Only this collector's copy changes: bytes are
copied before they are patched, never changed in place, so that the other collectors'
copies and a snapshot for the export state keep what they have.

A record folds into nothing when its flow ended (end of flow, forced end, lack of
resources; for a deny record also the idle timeout, which ends its entry) or when it has no
identity: those `unmergeable` records are what the queue's bound counts (queue.py).
"""

from __future__ import annotations

import dataclasses
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat

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
_EIGHT = np.arange(8)
_DENY_TEMPLATES = {RECORD_TEMPLATES[DENY, ipv6].template.template_id for ipv6 in (False, True)}


@dataclass(frozen=True)
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


def _gather(raw: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The big-endian u64 at each byte offset of `at` in `raw`."""
    return raw[at[:, None] + _EIGHT].view(">u8")[:, 0]


class WaitingBatch:
    """One queued batch's records as they wait: which are still waiting (`alive`), which can
    fold (`mergeable`), and where each starts in its group's bytes."""

    __slots__ = ("serial", "groups", "identities", "bounds", "offsets", "alive", "mergeable",
                 "waiting", "unmergeable")

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
        ended = np.zeros(total, bool)
        for (template, data, starts), first, last in zip(self.groups, self.bounds,
                                                         self.bounds[1:]):
            begins = np.frombuffer(starts, np.uint32)[:-1]
            self.offsets[first:last] = begins
            if mergeable is not None:
                continue
            layout = _layout(template)
            if layout.reason >= 0:
                ended[first:last] = layout.ends[np.frombuffer(data, np.uint8)[
                    begins.astype(np.int64) + layout.reason]]
            else:
                ended[first:last] = True
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

    def tickets(self, positions: np.ndarray) -> list[int]:
        return (positions + (self.serial << SHIFT)).tolist()

    def _group_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.bounds, positions, side="right") - 1

    def template_ids(self, positions: np.ndarray) -> np.ndarray:
        ids = np.array([template.template_id for template, _, _ in self.groups], np.int64)
        return ids[self._group_of(positions)]

    def deltas(self, positions: np.ndarray) -> np.ndarray:
        """The delta counters of the records at `positions`: one row of DELTAS each (0 where
        the template has no such counter)."""
        values = np.zeros((len(positions), len(DELTAS)), np.uint64)
        groups = self._group_of(positions)
        for group in np.unique(groups).tolist():
            chosen = np.flatnonzero(groups == group)
            template, data, _ = self.groups[group]
            raw, at = np.frombuffer(data, np.uint8), self.offsets[positions[chosen]]
            for column, offset in _layout(template).deltas:
                values[chosen, column] = _gather(raw, at + offset)
        return values

    def add_deltas(self, positions: np.ndarray, values: np.ndarray) -> None:
        """Add `values` (rows of DELTAS) to the records at `positions`, in a copy of their
        groups' bytes (copy on write: bytes once queued are never changed in place)."""
        groups = self._group_of(positions)
        for group in np.unique(groups).tolist():
            chosen = np.flatnonzero(groups == group)
            template, data, starts = self.groups[group]
            patched = bytearray(data)
            raw, at = np.frombuffer(patched, np.uint8), self.offsets[positions[chosen]]
            for column, offset in _layout(template).deltas:
                where = (at + offset)[:, None] + _EIGHT
                total = raw[where].view(">u8")[:, 0] + values[chosen, column]
                raw[where] = total.astype(">u8").view(np.uint8).reshape(-1, 8)
            self.groups[group] = (template, patched, starts)

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


class Backlog:
    """The waiting batches in order, and the index of the records that can fold: every
    waiting mergeable record, and only those, is in it, under its identity."""

    def __init__(self) -> None:
        self.batches: deque[WaitingBatch] = deque()
        self.by_serial: dict[int, WaitingBatch] = {}
        self.index: dict[bytes, int] = {}  # identity -> ticket of its mergeable waiting record
        self.waiting = 0
        self.unmergeable = 0
        self._serial = 0

    def __bool__(self) -> bool:
        return self.waiting > 0

    def append(self, records: EncodedRecords) -> int:
        """Queue newer records: each takes in the deltas of its connection's waiting record,
        which no longer waits. Returns how many records were folded so."""
        batch, looked_up = self._batch(records)
        self.batches.append(batch)
        folded, touched = 0, [batch]
        if self.index and len(looked_up):
            older = self._found(pick(batch.identities, looked_up.tolist()))
            hit = older >= 0
            if hit.any():
                hits = looked_up[hit]
                templates = batch.template_ids(hits)
                for chosen, source, at in self._by_batch(older[hit]):
                    same = source.template_ids(at) == templates[chosen]
                    batch.add_deltas(hits[chosen[same]], source.deltas(at[same]))
                    self._leave_out(source, at[same])
                    self._unmergeable(source, at[~same])  # both wait as they are
                    folded += int(np.count_nonzero(same))
                    touched.append(source)
                ended = hits[~batch.mergeable[hits]]
                for identity in pick(batch.identities, ended.tolist()):
                    del self.index[identity]  # folded into an end: nothing left to fold
        self._index(batch, np.flatnonzero(batch.mergeable))
        self._tidy(touched)
        return folded

    def prepend(self, records: EncodedRecords) -> int:
        """Put older records back at the front (the session of their flight ended without
        taking them): each whose connection has a newer record waiting folds into that one.
        Returns how many records were folded so."""
        batch, _ = self._batch(records)
        self.batches.appendleft(batch)
        mergeable = np.flatnonzero(batch.mergeable)
        folded, touched = 0, [batch]
        if self.index and len(mergeable):
            newer = self._found(pick(batch.identities, mergeable.tolist()))
            hit = newer >= 0
            if hit.any():
                sources = mergeable[hit]
                values, templates = batch.deltas(sources), batch.template_ids(sources)
                for chosen, target, at in self._by_batch(newer[hit]):
                    same = target.template_ids(at) == templates[chosen]
                    target.add_deltas(at[same], values[chosen[same]])
                    self._leave_out(batch, sources[chosen[same]])
                    self._unmergeable(batch, sources[chosen[~same]])
                    folded += int(np.count_nonzero(same))
                mergeable = mergeable[~hit]
        self._index(batch, mergeable)
        self._tidy(touched)
        return folded

    def take_front(self) -> EncodedRecords:
        """The first batch's waiting records, no longer waiting: on their way out, nothing
        folds into them any more."""
        batch = self.batches.popleft()
        while not batch.waiting:
            batch = self.batches.popleft()
        records = batch.records()
        for identity in pick(batch.identities,
                             np.flatnonzero(batch.alive & batch.mergeable).tolist()):
            del self.index[identity]
        self.waiting -= batch.waiting
        self.unmergeable -= batch.unmergeable
        del self.by_serial[batch.serial]
        return records

    def drop_oldest(self, count: int, mergeable: bool) -> int:
        """Leave out up to `count` of the oldest waiting records that can fold (or of those
        that cannot). Returns how many."""
        dropped, touched = 0, []
        for batch in self.batches:
            if dropped >= count:
                break
            chosen = np.flatnonzero(batch.alive & (batch.mergeable == mergeable))
            chosen = chosen[:count - dropped]
            if not len(chosen):
                continue
            if mergeable:
                for identity in pick(batch.identities, chosen.tolist()):
                    del self.index[identity]
            self._leave_out(batch, chosen)
            dropped += len(chosen)
            touched.append(batch)
        self._tidy(touched)
        return dropped

    def clear(self) -> None:
        self.__init__()

    def frozen(self) -> list[WaitingBatch]:
        """The waiting batches as they are now (see `WaitingBatch.frozen`)."""
        return [batch.frozen() for batch in self.batches if batch.waiting]

    def _batch(self, records: EncodedRecords) -> tuple[WaitingBatch, np.ndarray]:
        """A new waiting batch, and the positions of its records to look up: each identity
        once. Two records of one connection in one batch (never made so: a store makes one
        record per connection at a time) both wait; only the last can fold."""
        self._serial += 1
        batch = WaitingBatch(self._serial, records)
        self.by_serial[batch.serial] = batch
        self.waiting += batch.waiting
        self.unmergeable += batch.unmergeable
        identities = batch.identities
        named = set(identities)
        blanks = identities.count(b"") if b"" in named else 0
        if len(named) - (blanks > 0) + blanks == len(identities):  # no identity twice
            if not blanks:
                return batch, np.arange(len(identities))
            return batch, np.flatnonzero(np.fromiter(map(len, identities), np.int64,
                                                     len(identities)) > 0)
        last = {identity: position for position, identity in enumerate(identities)
                if identity}
        earlier = np.array([position for position, identity in enumerate(identities)
                            if identity and last[identity] != position], np.int64)
        self._unmergeable(batch, earlier[batch.mergeable[earlier]])
        return batch, np.array(sorted(last.values()), np.int64)

    def _found(self, identities: list[bytes]) -> np.ndarray:
        """The ticket of each identity's waiting record, -1 where none waits."""
        return np.fromiter(map(self.index.get, identities, repeat(-1)), np.int64,
                           len(identities))

    def _by_batch(self, tickets: np.ndarray) -> list[tuple[np.ndarray, WaitingBatch,
                                                            np.ndarray]]:
        """(which of `tickets`, their batch, their positions in it), batch by batch."""
        serials = tickets >> SHIFT
        return [(chosen, self.by_serial[serial], tickets[chosen] & POSITION)
                for serial in np.unique(serials).tolist()
                for chosen in [np.flatnonzero(serials == serial)]]

    def _index(self, batch: WaitingBatch, positions: np.ndarray) -> None:
        if len(positions):
            self.index.update(zip(pick(batch.identities, positions.tolist()),
                                  batch.tickets(positions)))

    def _leave_out(self, batch: WaitingBatch, positions: np.ndarray) -> None:
        if len(positions):
            self.waiting -= len(positions)
            self.unmergeable -= batch.leave_out(positions)

    def _unmergeable(self, batch: WaitingBatch, positions: np.ndarray) -> None:
        """These records of `batch` fold into nothing from now on (no longer in the index)."""
        if len(positions):
            batch.mergeable[positions] = False
            batch.unmergeable += len(positions)
            self.unmergeable += len(positions)

    def _tidy(self, batches: list[WaitingBatch]) -> None:
        """Batches with nothing left waiting go; those mostly left out are compacted: their
        waiting records in bytes of their own, under a new serial (new tickets)."""
        for batch in {id(batch): batch for batch in batches}.values():
            if not batch.waiting:
                self.by_serial.pop(batch.serial, None)
            elif batch.waiting * 4 < len(batch.alive) and len(batch.alive) >= 64:
                mergeable = batch.mergeable[batch.alive]
                records = batch.records()
                del self.by_serial[batch.serial]
                self._serial += 1
                batch.__init__(self._serial, records, mergeable)
                self.by_serial[batch.serial] = batch
                self._index(batch, np.flatnonzero(mergeable))
        while self.batches and not self.batches[0].waiting:
            self.batches.popleft()


def undelivered(records: EncodedRecords, delivered: int) -> EncodedRecords:
    """A copy of `records` without its first `delivered` ones."""
    copy = dataclasses.replace(records, groups=list(records.groups),
                               identities=list(records.identities))
    if delivered:
        copy.drop_oldest(delivered)
    return copy
