"""The link to one collector: its transport's sessions, one after another.

A session begins with a connection (retried with exponential backoff and jitter while the
collector is unreachable) and templates first; batches go out one flight at a time, each
message counted as exported once the kernel has it whole; a clean end withdraws the
templates (TCP/TLS, RFC 7011 §8.1) after the message cut short, and any end settles the
batch in flight (what the session did not take goes back to the queue).
"""

from __future__ import annotations

import asyncio
import logging
import time

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from .queue import ExportQueue
from .session import Session

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds; a collector behind a black hole is unreachable, not slow
WITHDRAW_TIMEOUT = 2.0


class Link:
    def __init__(self, transport, observation_domain_id: int, queue: ExportQueue,
                 max_backoff: float):
        self.transport = transport
        self.queue = queue
        self.max_backoff = max_backoff
        self.session = Session(observation_domain_id, transport.max_message_size)
        # HOST:PORT, in the log lines of the link and of the queue it sends from
        self.collector = queue.collector = f"{transport.host}:{transport.port}"

    async def connect(self) -> None:
        if self.transport.connected:
            return
        self.settle(False)  # its session ended without `end` (cancelled)
        async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(OSError),
                wait=wait_exponential(multiplier=0.2, max=self.max_backoff) + wait_random(0, 0.2),
                before_sleep=self._log_retry):
            with attempt:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await self.transport.connect()
        self.queue.stats.connections += 1
        self.queue.reachable = True
        self.session.begin(self.transport)
        log.info("connected to the collector %s", self.collector)

    def _log_retry(self, state) -> None:
        error = state.outcome.exception()
        self.queue.last_error = str(error) or type(error).__name__
        self.queue.mark_unreachable()
        log.warning("collector %s unreachable (%s); %d records queued; retrying in %.1fs",
                    self.collector, self.queue.last_error, self.queue.queued,
                    state.next_action.sleep)

    async def send_templates_if_due(self, template_refresh: float) -> None:
        now = time.monotonic()
        if not self.session.templates_due(now, self.transport.reliable, template_refresh):
            return
        messages = self.session.template_messages(now, int(time.time()))
        self.queue.stats.messages_sent += len(messages)
        await self.transport.send(messages)

    async def send_next(self) -> None:
        """Send the batch in flight, from where it stopped, or else the next one."""
        queue = self.queue
        flight = queue.flight
        if flight is None:
            flight = queue.take_off(self.session, int(time.time()))
        await asyncio.sleep(0)  # let the transport see a close that already arrived
        if flight.cut_short:  # while the kernel took it
            await self.transport.drain()
            queue.delivered()
        while flight.written < len(flight.messages):
            self.transport.write(flight.messages[flight.written])
            flight.written += 1
            queue.stats.messages_sent += 1
            await self.transport.drain()
            queue.delivered()
        queue.landed()

    async def lost(self, err: BaseException) -> None:
        self.queue.last_error = str(err) or type(err).__name__
        await self.end()
        self.queue.mark_unreachable()

    async def end(self, withdraw: bool = False) -> None:
        """Close the transport session, after withdrawing the templates for a clean end, and
        settle the batch it was sending. The withdrawal waits for the message cut short:
        behind it, it could not tell whether that message reached the kernel."""
        flight = self.queue.flight
        if withdraw and self.transport.connected:
            if flight is not None and flight.cut_short:
                try:
                    async with asyncio.timeout(WITHDRAW_TIMEOUT):
                        await self.transport.drain()
                    self.queue.delivered()
                except (OSError, ConnectionError):  # TimeoutError included
                    pass
            if flight is None or not flight.cut_short:
                await self._withdraw_templates()
        self.settle(await self.transport.close())

    def settle(self, flushed: bool) -> None:
        """The session of the batch in flight is over: a message the kernel had not taken
        whole when it was cut short counts as exported only if the close `flushed` it; what
        is left of the batch goes back to the queue."""
        flight = self.queue.flight
        if flight is None:
            return
        if flight.cut_short and flushed:
            self.queue.delivered()
        self.queue.put_back()

    async def _withdraw_templates(self) -> None:
        """Never over UDP, where withdrawals must not be sent."""
        if not (self.transport.reliable and self.transport.connected):
            return
        try:
            async with asyncio.timeout(WITHDRAW_TIMEOUT):
                await self.transport.send([self.session.withdrawal(int(time.time()))])
            self.queue.stats.messages_sent += 1
        except (OSError, ConnectionError) as err:  # TimeoutError included
            log.debug("template withdrawal not sent: %s", err)
