"""The exporting process: a bounded queue of flow records, IPFIX messages, one transport.

Stores `submit` records and never wait. The exporter task (`start`) sends them, (re)connects with
exponential backoff and jitter, sends templates first on every new connection (and every
`template_refresh` seconds over UDP), and keeps records queued while the collector is away.
When the queue is full the oldest records are dropped: counted and logged, never silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from .ipfix.codec import MessageEncoder
from .ipfix.templates import ALL_TEMPLATES, RECORD_TEMPLATES
from .record import FlowRecord

log = logging.getLogger(__name__)

BATCH = 5000  # records encoded between yields to the event loop


@dataclass
class ExporterStats:
    records_submitted: int = 0
    records_exported: int = 0  # handed to the socket (UDP: sent; TCP: written)
    records_dropped: int = 0  # queue full, or still queued at shutdown
    messages_sent: int = 0
    connections: int = 0


class Exporter:
    def __init__(self, transport, observation_domain_id: int, *,
                 max_buffered: int = 100_000, template_refresh: float = 600.0,
                 max_backoff: float = 30.0):
        self.transport = transport
        self.observation_domain_id = observation_domain_id
        self.max_buffered = max_buffered
        self.template_refresh = template_refresh
        self.max_backoff = max_backoff
        self.stats = ExporterStats()
        self._queue: deque[FlowRecord] = deque()
        self._pending = asyncio.Event()
        self._encoder = MessageEncoder(observation_domain_id, transport.max_message_size)
        self._templates_sent_at = float("-inf")
        self._task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, records: Iterable[FlowRecord]) -> None:
        queue = self._queue
        before = len(queue)
        queue.extend(records)
        self.stats.records_submitted += len(queue) - before
        excess = len(queue) - self.max_buffered
        if excess > 0:
            for _ in range(excess):
                queue.popleft()
            self.stats.records_dropped += excess
            log.warning("export queue full (%d records): dropped the %d oldest records "
                        "(%d dropped so far)", self.max_buffered, excess,
                        self.stats.records_dropped)
        self._pending.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ipfix-exporter")

    async def retarget(self, transport) -> None:
        """Send to another collector from now on (a reload changed the address); what is
        queued goes there."""
        running = self._task is not None
        await self._stop_task()
        await self.transport.close()
        self.transport = transport
        self._encoder = MessageEncoder(self.observation_domain_id, transport.max_message_size)
        self._templates_sent_at = float("-inf")
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

    async def close(self, timeout: float) -> bool:
        """Stop sending in the background, then send what is queued within `timeout` seconds
        (see `_flush`). True when nothing was left unsent."""
        await self._stop_task()
        return await self._flush(timeout)

    async def _run(self) -> None:
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
            await self._connect()
            try:
                await self._send_queued()
            except (OSError, ConnectionError) as err:
                log.warning("sending to the collector failed: %s; reconnecting", err)
                await self.transport.close()
                self._pending.set()

    async def _flush(self, timeout: float) -> bool:
        """Send everything queued, reconnecting if needed, for at most `timeout` seconds.
        Whatever is left is counted as dropped and logged."""
        try:
            async with asyncio.timeout(timeout):
                while self._queue:
                    await self._connect()
                    try:
                        await self._send_queued()
                    except (OSError, ConnectionError):
                        await self.transport.close()
        except TimeoutError:
            pass
        left = len(self._queue)
        if left:
            self.stats.records_dropped += left
            log.error("shutting down with %d records unsent: the collector was unreachable "
                      "for %.1fs; they are dropped", left, timeout)
            self._queue.clear()
        await self.transport.close()
        return left == 0

    async def _connect(self) -> None:
        if self.transport.connected:
            return
        async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(OSError),
                wait=wait_exponential(multiplier=0.2, max=self.max_backoff) + wait_random(0, 0.2),
                before_sleep=self._log_retry):
            with attempt:
                await self.transport.connect()
        self.stats.connections += 1
        if self.transport.reliable:
            # A new transport session: its sequence numbers start again (RFC 7011 §3.1).
            self._encoder = MessageEncoder(self.observation_domain_id,
                                           self.transport.max_message_size)
        log.info("connected to the collector %s:%s", self.transport.host, self.transport.port)
        self._templates_sent_at = float("-inf")

    def _log_retry(self, state) -> None:
        log.warning("collector %s:%s unreachable (%s); %d records queued; retrying in %.1fs",
                    self.transport.host, self.transport.port, state.outcome.exception(),
                    len(self._queue), state.next_action.sleep)

    async def _send_templates_if_due(self) -> None:
        now = time.monotonic()
        if now - self._templates_sent_at < self.template_refresh:
            return
        messages = self._encoder.template_messages(ALL_TEMPLATES, int(time.time()))
        await self.transport.send(messages)
        self.stats.messages_sent += len(messages)
        self._templates_sent_at = now

    async def _send_queued(self) -> None:
        await self._send_templates_if_due()
        queue = self._queue
        while queue:
            batch = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
            try:
                messages = self._encode(batch)
                await self.transport.send(messages)
            except BaseException:
                queue.extendleft(reversed(batch))  # keep them, in order, for the retry
                raise
            self.stats.records_exported += len(batch)
            self.stats.messages_sent += len(messages)
            await self._send_templates_if_due()

    def _encode(self, batch: list[FlowRecord]) -> list[bytes]:
        groups: dict[tuple[str, bool], list[FlowRecord]] = {}
        for record in batch:
            groups.setdefault((record.kind, len(record.source_address) == 16), []).append(record)
        encoded = []
        for key, records in groups.items():
            record_template = RECORD_TEMPLATES[key]
            pack, values = record_template.template.encode_record, record_template.values
            encoded.append((record_template.template, [pack(values(r)) for r in records]))
        return self._encoder.data_messages(encoded, int(time.time()))
