"""One collector's export queue: records waiting, their bound, backpressure, and the count
of every record from submitted until it is exported, folded, dropped, rejected or carried
over to the next agent.

Stores submit records without waiting (`enqueue`, `submit`); the agent then awaits
`wait_for_room`, which holds the next poll back while the queue is over `max_buffered` and
the collector is taking records.

What waits is delivered exactly, per collector: a record's bytes leave the store when it
is made, and a record this collector did not get leaves them to the next record of its
connection. The queue keeps at most one waiting record per connection (backlog.py): a newer
record of the same connection takes in an older one's deltas, so that an outage of any
length loses no byte of a connection still alive, and what waits is bounded by the
connections tracked (`max_waiting_live`, the stores' capacity), not by the outage. What
cannot fold into a newer record — the end records of connections that have ended, records
without identity — is bounded by `max_buffered`: past it, while the collector is
unreachable or takes nothing for `stall_timeout` seconds, the oldest of them are dropped
(counted and logged, never silently). At shutdown what is left is either dropped or, with
the export state, carried over to the next agent, which sends it (`snapshot`,
`carried_over`).

The queue holds records already encoded (`EncodedRecords`: per template, one run of bytes),
not `FlowRecord`s: a record costs its ~130 bytes on the wire rather than ~600 bytes of
Python objects. Only the messages are made at send time, when a batch is taken off as a
`Flight` (flight.py); its records count as queued until their messages are in the kernel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable

from ..record import EncodedRecords
from .backlog import Backlog
from .flight import Flight, records_per_message
from .session import Session
from .stats import ExporterStats
from .waiting import WaitingBatch

log = logging.getLogger(__name__)



class ExportQueue:
    def __init__(self, max_buffered: int, stall_timeout: float,
                 max_waiting_live: int | None = None):
        self.collector = ""  # HOST:PORT, for the log: the link's
        self.max_buffered = max_buffered  # records that cannot fold
        self.max_waiting_live = max_waiting_live  # records that can: None, no bound
        self.stall_timeout = stall_timeout
        self.stats = ExporterStats()
        self.rejected: Counter[str] = Counter()  # IPFIX element -> records rejected for it
        self.reachable = True  # until a connection attempt or a send fails, or a stall
        self.last_error = ""
        self.backlog = Backlog()  # the records waiting, but the flight's
        self.flight: Flight | None = None  # the batch being sent
        self.pending = asyncio.Event()  # something to send: wakes the exporter's task
        self._progress = asyncio.Event()  # records were taken, or the collector was lost
        self.last_progress = time.monotonic()
        self.waiting_since = time.monotonic()  # when the queue last became non-empty
        # While close() flushes: its deadline and the time without progress it allows
        self.deadline: tuple[asyncio.Timeout, float] | None = None

    @property
    def queued(self) -> int:
        """Records waiting, the flight's undelivered ones included."""
        in_flight = self.flight.undelivered if self.flight is not None else 0
        return self.backlog.waiting + in_flight

    @property
    def waiting(self) -> bool:
        """Records wait to be taken off as a flight."""
        return bool(self.backlog)

    def new_poll(self) -> None:
        """A poll begins: its records can fold into those still waiting (backlog.py)."""
        self.backlog.new_generation()

    def submit(self, batches: Iterable[EncodedRecords]) -> None:
        """Queue encoded records; never waits. While the collector is away, what is over
        the bound is dropped."""
        for batch in batches:
            self.enqueue(batch)
        if not self.reachable:
            self.drop_excess()

    def enqueue(self, batch: EncodedRecords, restored: bool = False) -> None:
        """Queue one batch of a poll as soon as it is encoded; never waits, never drops: the
        poll's closing `submit` and `wait_for_room` drop what is over the bound while the
        collector is away, once for the whole poll. The records rejected when they were
        encoded are counted now. `restored`: the previous agent's, carried over."""
        if not self.queued:
            self.waiting_since = time.monotonic()
        for element_name, value in batch.rejected:
            self.reject(element_name, value)
        count = len(batch)
        if restored:
            self.stats.records_restored += count
        else:
            self.stats.records_submitted += count + len(batch.rejected)
        if count:
            self.stats.records_folded += self.backlog.append(batch)
        self.pending.set()

    async def wait_for_room(self, limit: int | None = None) -> None:
        """Backpressure: wait while the queue is over `limit` (default: its bound) and the
        collector takes records. When it does not (unreachable, or nothing taken for
        `stall_timeout` seconds), drop the oldest records beyond the bound instead."""
        limit = self.max_buffered if limit is None else min(limit, self.max_buffered)
        while self.queued > limit:
            if not self.reachable:
                self.drop_excess()
                return
            self._progress.clear()
            try:
                async with asyncio.timeout(self.stall_timeout):
                    await self._progress.wait()
            except TimeoutError:
                self.last_error = (f"the collector took no records for "
                                   f"{self.stall_timeout:.0f}s")
                self.mark_unreachable()

    def drop_excess(self) -> None:
        """The oldest records over the bounds go: those that cannot fold over
        `max_buffered`, those that can over `max_waiting_live`."""
        backlog = self.backlog
        dropped = 0
        if backlog.unmergeable > self.max_buffered:
            dropped += backlog.drop_oldest(backlog.unmergeable - self.max_buffered, False)
        live = backlog.waiting - backlog.unmergeable
        if self.max_waiting_live is not None and live > self.max_waiting_live:
            dropped += backlog.drop_oldest(live - self.max_waiting_live, True)
        if dropped:
            self.stats.records_dropped += dropped
            # every drop is a line; logs.RepeatFilter shows one a minute, with the count held
            log.warning("collector %s unreachable (%s) and more records of ended connections "
                        "waiting than the bound (%d, maxBufferedRecords): dropped the %d oldest "
                        "records (%d dropped so far)", self.collector,
                        self.last_error or "no progress", self.max_buffered, dropped,
                        self.stats.records_dropped)

    def mark_unreachable(self) -> None:
        self.reachable = False
        self.drop_excess()
        self._progress.set()  # wake `wait_for_room`: it has nothing more to wait for

    def delivered(self) -> None:
        """The flight's next message is in the kernel: its records are exported."""
        count = self.flight.deliver_next()
        self.stats.records_exported += count
        self.reachable, self.last_error = True, ""
        self.last_progress = time.monotonic()
        self._progress.set()
        if self.deadline is not None:  # close(): it bounds the time without progress
            deadline, seconds = self.deadline
            deadline.reschedule(asyncio.get_running_loop().time() + seconds)

    def stuck(self, grace: float) -> str | None:
        """Why records have waited with none taken for more than `grace` seconds, or None."""
        queued = self.queued
        if not queued:
            return None
        stuck = time.monotonic() - max(self.last_progress, self.waiting_since)
        if stuck <= grace:
            return None
        return (f"{queued} records waiting, none sent for {stuck:.0f}s to "
                f"{self.collector}: {self.last_error or 'no progress'}")

    def take_off(self, session: Session, export_time: int) -> Flight:
        """The next batch as a flight of `session`'s messages: from now on nothing folds
        into its records. Its records rejected as longer than a message are counted now
        (and again each time it is taken off)."""
        batch = self.backlog.take_front()
        before = self.rejected.copy()
        try:
            messages = session.data_messages(batch, export_time, self.reject)
        except BaseException:
            self.stats.records_folded += self.backlog.prepend(batch)
            self.stats.records_rejected -= (self.rejected - before).total()
            self.rejected = before
            raise
        rejected = self.rejected - before
        self.flight = Flight(batch, messages, records_per_message(messages, session.sequence),
                             rejected)
        return self.flight

    def landed(self) -> None:
        """Every message of the flight is in the kernel."""
        self.flight = None
        if not self.backlog:
            self.waiting_since = time.monotonic()

    def put_back(self) -> None:
        """What the flight's session ended without taking goes back to the front, to be
        numbered in the next session's sequence; a record whose connection has a newer one
        waiting folds into it. Its records rejected as longer than a message are rejected
        again when it is encoded again: counted then. (Never over TCP/TLS, whose messages
        hold any record.)"""
        flight, self.flight = self.flight, None
        if flight.delivered == len(flight.messages):
            return
        self.stats.records_rejected -= flight.rejected.total()
        self.rejected -= flight.rejected
        flight.batch.drop_oldest(sum(flight.counts[:flight.delivered]))
        self.stats.records_folded += self.backlog.prepend(flight.batch)

    def drop_unsent(self) -> int:
        """Shutdown without an export state: what is left is counted as dropped. Returns
        how many."""
        left = self.queued
        if left:
            self.stats.records_dropped += left
            self.backlog.clear()
        return left

    def snapshot(self) -> list[EncodedRecords | WaitingBatch]:
        """What this collector has not received, as it is now, for the export state: the
        flight's undelivered records (a copy), then the waiting batches (frozen: read in
        another thread, see `records_of`)."""
        waiting: list[EncodedRecords | WaitingBatch] = []
        flight = self.flight
        if flight is not None and flight.undelivered:
            waiting.append(flight.undelivered_records())
        return waiting + self.backlog.frozen()

    def carried_over(self, saved: bool) -> int:
        """Shutdown with an export state, after the last `snapshot` was written (`saved`)
        or could not be: what is left is counted as carried over to the next agent, or as
        dropped. Returns how many."""
        left = self.queued
        if saved:
            self.stats.records_carried_over += left
        else:
            self.stats.records_dropped += left
        self.backlog.clear()
        return left

    def reject(self, field: str, value: object) -> None:
        """Count a record left out; log the first of each kind (a bad source repeats)."""
        self.stats.records_rejected += 1
        self.rejected[field] += 1
        if self.rejected[field] == 1:
            log.error("flow record not exported: %s=%r does not fit its IPFIX field; further "
                      "records rejected for %s are only counted "
                      "(ovsflow_records_rejected_total)", field, value, field)


def records_of(waiting: EncodedRecords | WaitingBatch) -> EncodedRecords:
    """A snapshot's part (`ExportQueue.snapshot`) as a batch of its records."""
    return waiting if isinstance(waiting, EncodedRecords) else waiting.records()
