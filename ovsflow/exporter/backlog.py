"""A collector's undelivered records, at most one per connection.

Records wait in the batches they were queued in (`WaitingBatch`, waiting.py). `Backlog`
keeps them in order with an index from each connection's identity to its one waiting
record. When a newer record of the same connection is queued while the older one waits
(not yet on its way: see flight.py), the older one is left out and its deltas are added
into the newer one, so that a live connection loses no byte however long its collector is
away, and what waits is bounded by the connections, not by the outage's length. Records
that fold into nothing (ended connections' end records, records without identity) are
what the queue's bound counts (`unmergeable`, queue.py).
"""

from __future__ import annotations

from collections import deque
from itertools import repeat

import numpy as np

from ..ipfix.templates import pick
from ..record import EncodedRecords
from .waiting import POSITION, SHIFT, WaitingBatch


class Backlog:
    """The waiting batches in order, and the index of the records that can fold.

    A connection has at most one record in a poll's batches, so a record can only fold
    into one queued by an earlier poll. The index therefore takes a batch only once a
    newer poll begins while the batch still waits (`new_generation`): a queue whose
    collector keeps up never indexes anything. Every waiting mergeable record of an
    `indexed` batch, and only those, is in the index, under its identity. Until the first
    `new_generation` (a user that does not say when polls begin) every batch is indexed
    as it comes."""

    def __init__(self) -> None:
        self.batches: deque[WaitingBatch] = deque()
        self.by_serial: dict[int, WaitingBatch] = {}
        self.index: dict[bytes, int] = {}  # identity -> ticket of its mergeable waiting record
        self.waiting = 0
        self.unmergeable = 0
        self._serial = 0
        self.generation: int | None = None  # None: every batch indexed as it comes
        self._unindexed: deque[WaitingBatch] = deque()  # of this generation, in order

    def __bool__(self) -> bool:
        return self.waiting > 0

    def new_generation(self) -> None:
        """A poll begins: the batches queued so far can take in its records' deltas."""
        self.generation = 0 if self.generation is None else self.generation + 1

    def append(self, records: EncodedRecords) -> int:
        """Queue newer records: each takes in the deltas of its connection's waiting record
        of an earlier poll, which no longer waits. Returns how many records were folded
        so."""
        self._index_earlier()
        batch, looked_up = self._batch(records)
        self.batches.append(batch)
        folded, touched = 0, [batch]
        if self.index and len(looked_up):
            older = self._found(pick(batch.identities, looked_up.tolist()))
            hit = older >= 0
            if hit.any():
                hits, older = looked_up[hit], older[hit]
                if len(np.unique(older)) != len(older):  # one connection twice in the batch
                    last = len(older) - 1 - np.unique(older[::-1], return_index=True)[1]
                    self._unmergeable(batch, np.setdiff1d(hits, hits[last]))
                    hits, older = hits[last], older[last]
                templates = batch.template_ids(hits)
                for chosen, source, at in self._by_batch(older):
                    same = source.template_ids(at) == templates[chosen]
                    batch.add_deltas(hits[chosen[same]], source.deltas(at[same]))
                    self._leave_out(source, at[same])
                    self._unmergeable(source, at[~same])  # both wait as they are
                    folded += int(np.count_nonzero(same))
                    touched.append(source)
                # the newer records stand for their connections from now on
                ended = ~batch.mergeable[hits]
                for identity in pick(batch.identities, hits[ended].tolist()):
                    del self.index[identity]
                live = hits[~ended]
                self.index.update(zip(pick(batch.identities, live.tolist()),
                                      batch.tickets(live)))
                batch.in_index = len(live)
                batch.indexed = len(live) == batch.waiting - batch.unmergeable
        if self.generation is None:
            self._index_batch(batch)
        elif not batch.indexed:
            batch.generation = self.generation
            self._unindexed.append(batch)
        self._tidy(touched)
        return folded

    def prepend(self, records: EncodedRecords) -> int:
        """Put older records back at the front (the session of their flight ended without
        taking them): each whose connection has a newer record waiting folds into that one.
        Returns how many records were folded so."""
        while self._unindexed:  # any waiting record may be newer than these
            self._index_batch(self._unindexed.popleft())
        batch, _ = self._batch(records)
        self.batches.appendleft(batch)
        mergeable = np.flatnonzero(batch.mergeable)
        folded = 0
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
        self._index_batch(batch)
        self._tidy([batch])
        return folded

    def take_front(self) -> EncodedRecords:
        """The first batch's waiting records, no longer waiting: on their way out, nothing
        folds into them any more."""
        batch = self.batches.popleft()
        while not batch.waiting:
            batch = self.batches.popleft()
        records = batch.records()
        self._unindex(batch, np.flatnonzero(batch.alive & batch.mergeable))
        self.waiting -= batch.waiting
        self.unmergeable -= batch.unmergeable
        del self.by_serial[batch.serial]
        # gone: never indexed from here on, and its bytes are the flight's alone
        batch.waiting, batch.groups, batch.identities = 0, [], []
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
                self._unindex(batch, chosen)
            self._leave_out(batch, chosen)
            dropped += len(chosen)
            touched.append(batch)
        self._tidy(touched)
        return dropped

    def clear(self) -> None:
        generation = self.generation
        self.__init__()
        self.generation = generation

    def frozen(self) -> list[WaitingBatch]:
        """The waiting batches as they are now (see `WaitingBatch.frozen`)."""
        return [batch.frozen() for batch in self.batches if batch.waiting]

    def _batch(self, records: EncodedRecords) -> tuple[WaitingBatch, np.ndarray]:
        """A new waiting batch, and the positions of its records that have an identity."""
        self._serial += 1
        batch = WaitingBatch(self._serial, records)
        self.by_serial[batch.serial] = batch
        self.waiting += batch.waiting
        self.unmergeable += batch.unmergeable
        identities = batch.identities
        if b"" not in identities:
            return batch, np.arange(len(identities))
        return batch, np.flatnonzero(np.fromiter(map(len, identities), np.int64,
                                                 len(identities)) > 0)

    def _index_earlier(self) -> None:
        """Index the batches of earlier polls that still wait."""
        unindexed = self._unindexed
        while unindexed and unindexed[0].generation != self.generation:
            self._index_batch(unindexed.popleft())

    def _index_batch(self, batch: WaitingBatch) -> None:
        """Two waiting records of one connection in a batch (never made so: a store makes
        one record per connection at a time) both wait; only the last can fold."""
        if not batch.waiting or batch.indexed:
            return
        batch.indexed = True
        positions = np.flatnonzero(batch.alive & batch.mergeable)
        if not len(positions):
            return
        before, already = len(self.index), batch.in_index  # those that took in others
        tickets = batch.tickets(positions)
        self.index.update(zip(pick(batch.identities, positions.tolist()), tickets))
        batch.in_index = len(positions)
        if len(self.index) - before != len(positions) - already:
            index = self.index
            shadowed = [position for position, identity, ticket in zip(
                positions.tolist(), pick(batch.identities, positions.tolist()), tickets)
                if index.get(identity) != ticket]
            self._unmergeable(batch, np.array(shadowed, np.int64))

    def _unindex(self, batch: WaitingBatch, positions: np.ndarray) -> None:
        """The index entries of these records of `batch`, if it is indexed (only theirs:
        an identity whose entry names another record keeps it)."""
        if (batch.indexed or batch.in_index) and len(positions):
            index = self.index
            for identity, ticket in zip(pick(batch.identities, positions.tolist()),
                                        batch.tickets(positions)):
                if index.get(identity) == ticket:
                    del index[identity]

    def _found(self, identities: list[bytes]) -> np.ndarray:
        """The ticket of each identity's waiting record, -1 where none waits."""
        return np.fromiter(map(self.index.get, identities, repeat(-1)), np.int64,
                           len(identities))

    def _by_batch(self, tickets: np.ndarray
                  ) -> list[tuple[np.ndarray, WaitingBatch, np.ndarray]]:
        """(which of `tickets`, their batch, their positions in it), batch by batch."""
        serials = tickets >> SHIFT
        return [(chosen, self.by_serial[serial], tickets[chosen] & POSITION)
                for serial in np.unique(serials).tolist()
                for chosen in [np.flatnonzero(serials == serial)]]

    def _leave_out(self, batch: WaitingBatch, positions: np.ndarray) -> None:
        if len(positions):
            self.waiting -= len(positions)
            self.unmergeable -= batch.leave_out(positions)

    def _unmergeable(self, batch: WaitingBatch, positions: np.ndarray) -> None:
        """These records of `batch` fold into nothing from now on (no longer in the index,
        if they were)."""
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
                indexed, generation = batch.indexed, batch.generation
                batch.__init__(self._serial, records, mergeable)
                batch.generation = generation
                self.by_serial[batch.serial] = batch
                if indexed:
                    self._index_batch(batch)
        while self.batches and not self.batches[0].waiting:
            self.batches.popleft()
