"""One collector's export queue: records waiting, their bound, backpressure, and the count
of every record submitted until it is exported, dropped or rejected.

Stores submit records without waiting (`enqueue`, `submit`); the agent then awaits
`wait_for_room`, which holds the next poll back while the queue is over `max_buffered` and
the collector is taking records. The bound is for collector outages: the oldest records are
dropped (counted and logged, never silently) only while the collector is unreachable or
takes nothing for `stall_timeout` seconds.

The queue holds records already encoded (`EncodedRecords`: per template, one run of bytes),
not `FlowRecord`s: a record costs its ~130 bytes on the wire rather than ~600 bytes of
Python objects. Only the messages are made at send time, when a batch is taken off as a
`Flight` (flight.py); its records count as queued until their messages are in the kernel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

from ..record import EncodedRecords
from .flight import Flight, records_per_message
from .session import Session

log = logging.getLogger(__name__)


@dataclass
class ExporterStats:
    records_submitted: int = 0
    records_exported: int = 0  # UDP: sent; TCP/TLS: in the kernel's socket buffer, whole
    records_dropped: int = 0  # queue over its bound while the collector was away, or unsent
    # at shutdown
    records_rejected: int = 0  # a value did not fit its IPFIX field (see ExportQueue.rejected)
    messages_sent: int = 0  # in the kernel whole (UDP: sent and not refused)
    octets_sent: int = 0  # of those messages
    connections: int = 0


class ExportQueue:
    def __init__(self, max_buffered: int, stall_timeout: float):
        self.collector = ""  # HOST:PORT, for the log: the link's
        self.max_buffered = max_buffered
        self.stall_timeout = stall_timeout
        self.stats = ExporterStats()
        self.rejected: Counter[str] = Counter()  # IPFIX element -> records rejected for it
        self.reachable = True  # until a connection attempt or a send fails, or a stall
        self.last_error = ""
        self.batches: deque[EncodedRecords] = deque()
        self.queued = 0  # records in the queue, the flight's undelivered ones included
        self.flight: Flight | None = None  # the batch being sent
        self.pending = asyncio.Event()  # something to send: wakes the exporter's task
        self._progress = asyncio.Event()  # records were taken, or the collector was lost
        self.last_progress = time.monotonic()
        self.waiting_since = time.monotonic()  # when the queue last became non-empty
        # While close() flushes: its deadline and the time without progress it allows
        self.deadline: tuple[asyncio.Timeout, float] | None = None

    def submit(self, batches: Iterable[EncodedRecords]) -> None:
        """Queue encoded records; never waits. While the collector is away, what is over
        the bound is dropped."""
        for batch in batches:
            self.enqueue(batch)
        if not self.reachable:
            self.drop_excess()

    def enqueue(self, batch: EncodedRecords) -> None:
        """Queue one batch of a poll as soon as it is encoded; never waits, never drops: the
        poll's closing `submit` and `wait_for_room` drop what is over the bound while the
        collector is away, once for the whole poll. The records rejected when they were
        encoded are counted now."""
        if not self.queued:
            self.waiting_since = time.monotonic()
        for element_name, value in batch.rejected:
            self.reject(element_name, value)
        count = len(batch)
        self.stats.records_submitted += count + len(batch.rejected)
        if count:
            self.batches.append(batch)
            self.queued += count
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
        batches = self.batches
        in_flight = self.flight.undelivered if self.flight is not None else 0
        excess = min(self.queued - self.max_buffered, self.queued - in_flight)
        if excess <= 0:
            return
        left = excess
        while left:
            if len(batches[0]) <= left:
                left -= len(batches.popleft())
            else:
                batches[0].drop_oldest(left)
                left = 0
        self.queued -= excess
        self.stats.records_dropped += excess
        log.warning("collector %s unreachable (%s) and the export queue full (%d records): "
                    "dropped the %d oldest records (%d dropped so far)", self.collector,
                    self.last_error or "no progress", self.max_buffered, excess,
                    self.stats.records_dropped)

    def mark_unreachable(self) -> None:
        self.reachable = False
        self.drop_excess()
        self._progress.set()  # wake `wait_for_room`: it has nothing more to wait for

    def delivered(self) -> None:
        """The flight's next message is in the kernel: its records are exported."""
        count = self.flight.deliver_next()
        self.queued -= count
        self.stats.records_exported += count
        self.reachable, self.last_error = True, ""
        self.last_progress = time.monotonic()
        self._progress.set()
        if self.deadline is not None:  # close(): it bounds the time without progress
            deadline, seconds = self.deadline
            deadline.reschedule(asyncio.get_running_loop().time() + seconds)

    def stuck(self, grace: float) -> str | None:
        """Why records have waited with none taken for more than `grace` seconds, or None."""
        if not self.queued:
            return None
        stuck = time.monotonic() - max(self.last_progress, self.waiting_since)
        if stuck <= grace:
            return None
        return (f"{self.queued} records waiting, none sent for {stuck:.0f}s to "
                f"{self.collector}: {self.last_error or 'no progress'}")

    def take_off(self, session: Session, export_time: int) -> Flight:
        """The next batch as a flight of `session`'s messages. Its records rejected as longer
        than a message are counted now (and again each time it is taken off)."""
        batch = self.batches.popleft()
        before = self.rejected.copy()
        try:
            messages = session.data_messages(batch, export_time, self.reject)
        except BaseException:
            self.batches.appendleft(batch)
            self.stats.records_rejected -= (self.rejected - before).total()
            self.rejected = before
            raise
        rejected = self.rejected - before
        self.queued -= rejected.total()
        self.flight = Flight(batch, messages, records_per_message(messages, session.sequence),
                             rejected)
        return self.flight

    def landed(self) -> None:
        """Every message of the flight is in the kernel."""
        self.flight = None
        if not self.batches:
            self.waiting_since = time.monotonic()

    def put_back(self) -> None:
        """What the flight's session ended without taking goes back to the front, to be
        numbered in the next session's sequence. Its records rejected as longer than a
        message are rejected again when it is encoded again: counted then. (Never over
        TCP/TLS, whose messages hold any record.)"""
        flight, self.flight = self.flight, None
        if flight.delivered == len(flight.messages):
            return
        self.queued += flight.rejected.total()
        self.stats.records_rejected -= flight.rejected.total()
        self.rejected -= flight.rejected
        flight.batch.drop_oldest(sum(flight.counts[:flight.delivered]))
        self.batches.appendleft(flight.batch)

    def drop_unsent(self) -> int:
        """Shutdown: what is left is counted as dropped. Returns how many."""
        left = self.queued
        if left:
            self.stats.records_dropped += left
            self.batches.clear()
            self.queued = 0
        return left

    def reject(self, field: str, value: object) -> None:
        """Count a record left out; log the first of each kind (a bad source repeats)."""
        self.stats.records_rejected += 1
        self.rejected[field] += 1
        if self.rejected[field] == 1:
            log.error("flow record not exported: %s=%r does not fit its IPFIX field; further "
                      "records rejected for %s are only counted "
                      "(ovsflow_records_rejected_total)", field, value, field)
