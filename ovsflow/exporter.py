"""The exporting process: a queue of flow records, IPFIX messages, one transport.

Stores `submit` records without waiting; the agent then awaits `wait_for_room`, which holds
the next poll back while the queue is over `max_buffered` and the collector is taking
records. The bound is for collector outages: the oldest records are dropped (counted and
logged, never silently) only while the collector is unreachable or takes nothing for
`stall_timeout` seconds. The exporter task (`start`) sends, (re)connects with exponential
backoff and jitter, and sends templates first on every new connection, and over UDP every
`template_refresh` seconds. A clean end of a TCP/TLS session withdraws the templates
(RFC 7011 §8.1). A record with a value its field cannot hold is rejected and counted on its
own; it never stops the others.

The queue holds records already encoded (`EncodedRecords`: per template, one run of bytes),
not `FlowRecord`s: a record costs its ~130 bytes on the wire rather than ~600 bytes of
Python objects, and a poll's records are encoded `BATCH` at a time as the store makes them,
in the poll's worker thread (`RecordEncoder`), so that no poll holds all its records as
objects at once. Only the messages (headers, sequence numbers) are made at send time.

Over TCP/TLS no record goes twice on one session, and `records_exported` counts exactly the
records whose messages reached the kernel whole: a batch is taken off the queue as a
`_Flight` whose messages carry the session's sequence numbers, sent one message at a time
(the transport says when each is in the kernel). A flight cut short (close() cancels the
task, a send fails) resumes where it stopped on the same session; when the session ends
first, what it did not take is encoded again for the next one, and what close() gives up
on is counted as dropped, never as exported. A collector that stops reading for good
leaves records in the kernel's send queue: they are counted as exported (a collector that
reads again, even after the agent has exited, gets them), and the abort logs how many bytes
it had not acknowledged. IPFIX has no acknowledgements: no TCP sender can know more.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import accumulate, pairwise
from operator import attrgetter

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from .ipfix.codec import HEADER, SET_HEADER, MessageEncoder, Template
from .ipfix.templates import ALL_TEMPLATES, RECORD_TEMPLATES, RecordTemplate
from .record import BATCH, EncodedRecords, FlowRecord
from .supervisor import Supervisor

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds; a collector behind a black hole is unreachable, not slow
STALL_TIMEOUT = 10.0  # seconds without a record taken: the collector counts as unreachable
WITHDRAW_TIMEOUT = 2.0
# What packing a value that does not fit its field raises (struct, int.to_bytes, strings)
ENCODE_ERRORS = (struct.error, OverflowError, ValueError, TypeError, AttributeError)

# (kind, address length) -> template: a record whose addresses are neither 4 nor 16 bytes
# has no template and is rejected rather than padded or cut to fit.
_TEMPLATES_BY_ADDRESS = {(kind, 16 if ipv6 else 4): template
                         for (kind, ipv6), template in RECORD_TEMPLATES.items()}


@dataclass
class ExporterStats:
    records_submitted: int = 0
    records_exported: int = 0  # UDP: sent; TCP/TLS: in the kernel's socket buffer, whole
    records_dropped: int = 0  # queue over its bound while the collector was away, or unsent
    # at shutdown
    records_rejected: int = 0  # a value did not fit its IPFIX field (see Exporter.rejected)
    messages_sent: int = 0
    connections: int = 0


@dataclass
class _Flight:
    """A batch on its way out on one transport session. Its messages are numbered in that
    session's sequence: each goes out on it once, or not at all."""
    batch: EncodedRecords
    messages: list[bytes]
    counts: list[int]  # data records in each message
    rejected: Counter  # element -> its records rejected as longer than a message
    written: int = 0  # messages handed to the transport
    delivered: int = 0  # of them, those in the kernel (counted as exported); at most one less

    @property
    def undelivered(self) -> int:
        return sum(self.counts[self.delivered:])


def _records_per_message(messages: list[bytes], next_sequence: int) -> list[int]:
    """From the messages' sequence numbers, which count data records (RFC 7011 §3.1)."""
    sequences = [HEADER.unpack_from(message)[3] for message in messages] + [next_sequence]
    return [(after - before) & 0xFFFFFFFF for before, after in pairwise(sequences)]


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
            data = _encode_each(record_template, grouped, encoded.rejected)
        if data:
            encoded.groups.append((record_template.template, b"".join(data),
                                   array("I", accumulate(map(len, data), initial=0))))
    return encoded


def _encode_each(record_template: RecordTemplate, records: list[FlowRecord],
                 rejected: list[tuple[str, object]]) -> list[bytes]:
    template, values = record_template.template, record_template.values
    encoded = []
    for record in records:
        try:
            encoded.append(template.encode_record(values(record)))
        except ENCODE_ERRORS:
            rejected.append(_misfit(template, values(record)))
    return encoded


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


class Exporter:
    def __init__(self, transport, observation_domain_id: int, *,
                 max_buffered: int = 100_000, template_refresh: float = 600.0,
                 max_backoff: float = 30.0, stall_timeout: float = STALL_TIMEOUT,
                 supervisor: Supervisor | None = None):
        self.transport = transport
        self.observation_domain_id = observation_domain_id
        self.max_buffered = max_buffered
        self.template_refresh = template_refresh
        self.max_backoff = max_backoff
        self.stall_timeout = stall_timeout
        self.supervisor = supervisor or Supervisor()
        self.stats = ExporterStats()
        self.rejected: Counter[str] = Counter()  # IPFIX element -> records rejected for it
        self.reachable = True  # until a connection attempt or a send fails, or a stall
        self.last_error = ""
        self._queue: deque[EncodedRecords] = deque()
        self._queued = 0  # records in the queue
        self._pending = asyncio.Event()
        self._progress = asyncio.Event()  # records were taken, or the collector was lost
        self._last_progress = time.monotonic()
        self._waiting_since = time.monotonic()  # when the queue last became non-empty
        self._encoder = MessageEncoder(observation_domain_id, transport.max_message_size)
        self._templates_sent_at = float("-inf")
        self._task: asyncio.Task | None = None
        self._flight: _Flight | None = None
        self._renew = False  # the TLS files changed: start a new session between batches
        self._flush_deadline: asyncio.Timeout | None = None  # close(): moved on by progress
        self._flush_timeout = 0.0

    @property
    def queued(self) -> int:
        return self._queued

    def submit(self, records: Iterable[FlowRecord]) -> None:
        """Queue records for export; never waits (see `wait_for_room`)."""
        self.submit_encoded(encode_in_batches(records))

    def submit_encoded(self, batches: Iterable[EncodedRecords]) -> None:
        """Queue encoded records (see `RecordEncoder`); never waits."""
        for batch in batches:
            self.enqueue(batch)
        if not self.reachable:
            self._drop_excess()

    def enqueue(self, batch: EncodedRecords) -> None:
        """Queue one batch of a poll as soon as it is encoded; never waits, never drops: the
        poll's closing `submit_encoded` and `wait_for_room` drop what is over the bound while
        the collector is away, once for the whole poll. The records rejected when they were
        encoded are counted now."""
        if not self._queued:
            self._waiting_since = time.monotonic()
        for element_name, value in batch.rejected:
            self._reject(element_name, value)
        count = len(batch)
        self.stats.records_submitted += count + len(batch.rejected)
        if count:
            self._queue.append(batch)
            self._queued += count
        self._pending.set()

    async def wait_for_room(self, limit: int | None = None) -> None:
        """Backpressure: wait while the queue is over `limit` (default: its bound) and the
        collector takes records. When it does not (unreachable, or nothing taken for
        `stall_timeout` seconds), drop the oldest records beyond the bound instead."""
        limit = self.max_buffered if limit is None else min(limit, self.max_buffered)
        while self._queued > limit:
            if not self.reachable:
                self._drop_excess()
                return
            self._progress.clear()
            try:
                async with asyncio.timeout(self.stall_timeout):
                    await self._progress.wait()
            except TimeoutError:
                self.last_error = (f"the collector took no records for "
                                   f"{self.stall_timeout:.0f}s")
                self._mark_unreachable()

    def _drop_excess(self) -> None:
        queue = self._queue
        in_flight = self._flight.undelivered if self._flight is not None else 0
        excess = min(self._queued - self.max_buffered, self._queued - in_flight)
        if excess <= 0:
            return
        left = excess
        while left:
            if len(queue[0]) <= left:
                left -= len(queue.popleft())
            else:
                queue[0].drop_oldest(left)
                left = 0
        self._queued -= excess
        self.stats.records_dropped += excess
        log.warning("collector %s:%s unreachable (%s) and the export queue full (%d records): "
                    "dropped the %d oldest records (%d dropped so far)", self.transport.host,
                    self.transport.port, self.last_error or "no progress", self.max_buffered,
                    excess, self.stats.records_dropped)

    def _mark_unreachable(self) -> None:
        self.reachable = False
        self._drop_excess()
        self._progress.set()  # wake `wait_for_room`: it has nothing more to wait for

    def _note_progress(self) -> None:
        self.reachable, self.last_error = True, ""
        self._last_progress = time.monotonic()
        self._progress.set()
        if self._flush_deadline is not None:
            self._flush_deadline.reschedule(asyncio.get_running_loop().time()
                                            + self._flush_timeout)

    def problem(self, grace: float) -> str | None:
        """Why the exporter has been unable to do its job for more than `grace` seconds, or
        None: records waiting with none taken, or a transport whose sends keep failing."""
        now = time.monotonic()
        if self._queued:
            stuck = now - max(self._last_progress, self._waiting_since)
            if stuck > grace:
                return (f"{self._queued} records waiting, none sent for {stuck:.0f}s to "
                        f"{self.transport.host}:{self.transport.port}: "
                        f"{self.last_error or 'no progress'}")
        failing_since = self.transport.failing_since
        if failing_since is not None and now - failing_since > grace:
            return (f"sends to {self.transport.host}:{self.transport.port} failing for "
                    f"{now - failing_since:.0f}s: {self.transport.last_error}")
        return None

    @property
    def delivered(self) -> bool:
        """Something reached the collector's socket: a TCP/TLS connection was made, or over
        UDP a datagram went out without an error."""
        if self.transport.reliable:
            return self.stats.connections > 0
        return self.transport.datagrams_sent > 0

    def start(self) -> None:
        self._task = self.supervisor.spawn("exporter", self._run)
        self._pending.set()  # connect now: templates go first, and /readyz learns early

    async def retarget(self, transport) -> None:
        """Send to another collector from now on (a reload changed the address or its TLS
        settings); what is queued goes there."""
        running = self._task is not None
        await self._stop_task()
        await self._end_session(withdraw=True)
        self._renew = False
        self.transport = transport
        self._encoder = MessageEncoder(self.observation_domain_id, transport.max_message_size)
        self._templates_sent_at = float("-inf")
        self.reachable = True
        if running:
            self.start()
        self._pending.set()

    async def _stop_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def renew_tls(self) -> bool:
        """Re-read the TLS files (at each poll, and on SIGHUP). When they changed, the
        session in progress ends cleanly after the batch it is sending and a new one starts
        with the new files: rotated credentials are in use within a poll interval, and a
        collector that refuses them shows as unreachable at once. True when they changed."""
        if not self.transport.renew_tls():
            return False
        log.info("the TLS files for the collector %s:%s changed: reconnecting with them",
                 self.transport.host, self.transport.port)
        self._renew = True
        self._pending.set()
        return True

    async def close(self, timeout: float) -> bool:
        """Stop sending in the background, then send what is queued (see `_flush`) and end
        the session cleanly. True when nothing was left unsent."""
        await self._stop_task()
        return await self._flush(timeout)

    async def _run(self) -> None:
        pause = 0.0
        while True:
            timeout = None
            if not self.transport.reliable:
                timeout = max(0.0, self._templates_sent_at + self.template_refresh
                              - time.monotonic())
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the
                # cancellation that close() sends when the event is set at the same moment.
                async with asyncio.timeout(timeout):
                    await self._pending.wait()
            except TimeoutError:
                pass
            self._pending.clear()
            if self._renew:
                self._renew = False
                await self._end_session(withdraw=True)
            await self._connect()
            try:
                await self._send_queued()
                pause = 0.0
            except (OSError, ConnectionError) as err:
                log.warning("sending to the collector failed: %s; reconnecting", err)
                await self._lost(err)
                # a collector that accepts and then fails every send gets backoff too
                pause = min(max(pause * 2, 0.2), self.max_backoff)
                await asyncio.sleep(pause)
                self._pending.set()

    async def _lost(self, err: BaseException) -> None:
        self.last_error = str(err) or type(err).__name__
        await self._end_session()
        self._mark_unreachable()

    async def _end_session(self, withdraw: bool = False) -> None:
        """Close the transport session, after withdrawing the templates for a clean end, and
        settle the batch it was sending. The withdrawal waits for the message cut short:
        behind it, it could not tell whether that message reached the kernel."""
        flight = self._flight
        if withdraw and self.transport.connected:
            if flight is not None and flight.written > flight.delivered:
                try:
                    async with asyncio.timeout(WITHDRAW_TIMEOUT):
                        await self.transport.drain()
                    self._delivered(flight)
                except (OSError, ConnectionError):  # TimeoutError included
                    pass
            if flight is None or flight.written == flight.delivered:
                await self._withdraw_templates()
        self._settle_flight(await self.transport.close())

    def _settle_flight(self, flushed: bool) -> None:
        """The session of the batch in flight is over: a message the kernel had not taken
        whole when it was cut short counts as exported only if the close `flushed` it; what
        is left of the batch goes back to the front of the queue, to be numbered in the
        next session's sequence."""
        flight, self._flight = self._flight, None
        if flight is None:
            return
        if flight.written > flight.delivered and flushed:
            self._delivered(flight)
        if flight.delivered == len(flight.messages):
            return
        # Its records rejected as longer than a message are rejected again when it is
        # encoded again: counted then. (Never over TCP/TLS, whose messages hold any record.)
        self._queued += flight.rejected.total()
        self.stats.records_rejected -= flight.rejected.total()
        self.rejected -= flight.rejected
        flight.batch.drop_oldest(sum(flight.counts[:flight.delivered]))
        self._queue.appendleft(flight.batch)

    async def _flush(self, timeout: float) -> bool:
        """Send everything queued, reconnecting if needed. `timeout` bounds only the time
        without progress: with the collector taking records, every record goes out however
        long that takes; what is left when it stops taking them is counted as dropped."""
        try:
            async with asyncio.timeout(timeout) as self._flush_deadline:
                self._flush_timeout = timeout
                while self._flight is not None or self._queue:
                    await self._connect()
                    try:
                        await self._send_templates_if_due()
                        await self._send_next()
                    except (OSError, ConnectionError) as err:
                        await self._lost(err)
                        await asyncio.sleep(0.1)
        except TimeoutError:
            pass
        finally:
            self._flush_deadline = None
        await self._end_session(withdraw=True)
        left = self._queued
        if left:
            self.stats.records_dropped += left
            log.error("shutting down with %d records unsent: the collector took nothing for "
                      "%.1fs (%s); they are dropped", left, timeout,
                      self.last_error or "no progress")
            self._queue.clear()
            self._queued = 0
        stats = self.stats
        log.info("export closed: %d records submitted, %d exported, %d dropped, %d rejected",
                 stats.records_submitted, stats.records_exported, stats.records_dropped,
                 stats.records_rejected)
        return left == 0

    async def _withdraw_templates(self) -> None:
        """Before a clean close of a TCP/TLS session (RFC 7011 §8.1). Never over UDP, where
        withdrawals must not be sent."""
        if not (self.transport.reliable and self.transport.connected):
            return
        try:
            async with asyncio.timeout(WITHDRAW_TIMEOUT):
                await self.transport.send([self._encoder.withdrawal_message(int(time.time()))])
            self.stats.messages_sent += 1
        except (OSError, ConnectionError) as err:  # TimeoutError included
            log.debug("template withdrawal not sent: %s", err)

    async def _connect(self) -> None:
        if self.transport.connected:
            return
        self._settle_flight(False)  # its session ended without `_end_session` (cancelled)
        async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(OSError),
                wait=wait_exponential(multiplier=0.2, max=self.max_backoff) + wait_random(0, 0.2),
                before_sleep=self._log_retry):
            with attempt:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await self.transport.connect()
        self.stats.connections += 1
        self.reachable = True
        if self.transport.reliable:
            # A new transport session: its sequence numbers start again (RFC 7011 §3.1).
            self._encoder = MessageEncoder(self.observation_domain_id,
                                           self.transport.max_message_size)
        else:  # the size follows the family the collector's name resolved to
            self._encoder.max_message_size = self.transport.max_message_size
        log.info("connected to the collector %s:%s", self.transport.host, self.transport.port)
        self._templates_sent_at = float("-inf")

    def _log_retry(self, state) -> None:
        error = state.outcome.exception()
        self.last_error = str(error) or type(error).__name__
        self._mark_unreachable()
        log.warning("collector %s:%s unreachable (%s); %d records queued; retrying in %.1fs",
                    self.transport.host, self.transport.port, self.last_error,
                    self._queued, state.next_action.sleep)

    async def _send_templates_if_due(self) -> None:
        """Once per connection; over UDP also every `template_refresh` seconds (RFC 7011
        §8.4). A TCP/TLS session keeps its templates until it ends."""
        now = time.monotonic()
        if self._templates_sent_at != float("-inf") and (
                self.transport.reliable or now - self._templates_sent_at < self.template_refresh):
            return
        messages = self._encoder.template_messages(ALL_TEMPLATES, int(time.time()))
        # sent once written: cut short while they drain, they still go out on this session
        self._templates_sent_at = now
        self.stats.messages_sent += len(messages)
        await self.transport.send(messages)

    async def _send_queued(self) -> None:
        await self._send_templates_if_due()
        while (self._flight is not None or self._queue) and not self._renew:
            await self._send_next()
            await self._send_templates_if_due()
        if self._renew:
            self._pending.set()

    async def _send_next(self) -> None:
        """Send the batch in flight, from where it stopped, or else the next one."""
        flight = self._flight
        if flight is None:
            flight = self._flight = self._take_off()
        await asyncio.sleep(0)  # let the transport see a close that already arrived
        if flight.written > flight.delivered:  # cut short while the kernel took it
            await self.transport.drain()
            self._delivered(flight)
        while flight.written < len(flight.messages):
            self.transport.write(flight.messages[flight.written])
            flight.written += 1
            self.stats.messages_sent += 1
            await self.transport.drain()
            self._delivered(flight)
        self._flight = None
        if not self._queue:
            self._waiting_since = time.monotonic()

    def _take_off(self) -> _Flight:
        batch = self._queue.popleft()
        before = self.rejected.copy()
        try:
            messages = self._messages(batch)
        except BaseException:
            self._queue.appendleft(batch)
            self.stats.records_rejected -= (self.rejected - before).total()
            self.rejected = before
            raise
        rejected = self.rejected - before
        self._queued -= rejected.total()
        return _Flight(batch, messages, _records_per_message(messages, self._encoder.sequence),
                       rejected)

    def _delivered(self, flight: _Flight) -> None:
        count = flight.counts[flight.delivered]
        flight.delivered += 1
        self._queued -= count
        self.stats.records_exported += count
        self._note_progress()

    def _messages(self, batch: EncodedRecords) -> list[bytes]:
        """Data messages for `batch`, numbered in this session's sequence."""
        export_time, sequence = int(time.time()), self._encoder.sequence
        try:
            return self._encoder.joined_data_messages(batch.groups, export_time)
        except ValueError:  # a record longer than a message can hold (long strings, UDP)
            self._encoder.sequence = sequence  # messages made before it are not sent
            encoded = [(template, self._fitting(template, records))
                       for template, records in batch.data_records()]
            return self._encoder.data_messages(encoded, export_time)

    def _fitting(self, template: Template, records: list[bytes]) -> list[bytes]:
        """Records that fit in a message (long strings may not, over UDP)."""
        limit = self._encoder.max_message_size - HEADER.size - SET_HEADER.size - 3
        kept = []
        for data in records:
            if len(data) > limit:
                self._reject("record length", f"{len(data)} bytes (template "
                             f"{template.template_id}; a message holds {limit})")
            else:
                kept.append(data)
        return kept

    def _reject(self, field: str, value: object) -> None:
        """Count a record left out; log the first of each kind (a bad source repeats)."""
        self.stats.records_rejected += 1
        self.rejected[field] += 1
        if self.rejected[field] == 1:
            log.error("flow record not exported: %s=%r does not fit its IPFIX field; further "
                      "records rejected for %s are only counted "
                      "(ovsflow_records_rejected_total)", field, value, field)
