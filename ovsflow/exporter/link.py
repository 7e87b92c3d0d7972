"""The link to one collector: its transport's sessions, one after another.

A session begins with a connection (retried with exponential backoff and jitter while the
collector is unreachable) and templates first, then the ledger (ledger.py); batches go out
one flight at a time, each message counted as exported once the kernel has it whole; a
clean end withdraws the templates (TCP/TLS, RFC 7011 §8.1) after the message cut short,
and any end settles the batch in flight (what the session did not take goes back to the
queue).

UDP has no connection to lose, but the kernel says when the collector's port is closed
(ICMP port unreachable): a refused datagram is not exported, and what its flight had not
delivered goes back to the queue (`refused`); the collector counts as unreachable, and no
data goes until it answers again. Meanwhile the templates go every `PROBE_INTERVAL`
seconds as a probe (`probe`): once one has gone `PROBE_ANSWER` seconds without a refusal,
the collector that restarted, or started late, has the templates, and the ledger and the
records waiting follow at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from ..transport import DatagramRefused
from .ledger import Ledger
from .queue import ExportQueue
from .session import NEVER, Session

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds; a collector behind a black hole is unreachable, not slow
WITHDRAW_TIMEOUT = 2.0
# Linux lets a host send each peer one ICMP error a second (net.ipv4.icmp_ratelimit, with a
# burst of 6; none on loopback): a probe every 2 s is always answered by a closed port, even
# with a second exporter probing the same collector host, so a refusal kept back by the rate
# limit is not taken for the collector's return.
PROBE_INTERVAL = 2.0
PROBE_ANSWER = 0.5  # seconds; a refusal from farther away comes a round trip later


class Link:
    def __init__(self, transport, observation_domain_id: int, queue: ExportQueue,
                 max_backoff: float, ledger: Ledger):
        self.transport = transport
        self.queue = queue
        self.max_backoff = max_backoff
        self.ledger = ledger
        self.session = Session(observation_domain_id, transport.max_message_size)
        # HOST:PORT, in the log lines of the link and of the queue it sends from
        self.collector = queue.collector = f"{transport.host}:{transport.port}"
        self.probing = False  # UDP: sends are refused; only probes go
        self.probe_at = NEVER  # time.monotonic() of the last probe (or refusal)
        if not transport.reliable:  # a refusal seen while idle wakes the exporter
            transport.on_refusal = queue.pending.set

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
        if not self.probing:
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

    def next_due(self, template_refresh: float) -> float:
        """Seconds until something is due without records to send: a probe, or the answer
        to one, while sends are refused; else the templates (UDP) or the ledger."""
        now = time.monotonic()
        if self.probing:
            due = self.probe_at + PROBE_INTERVAL
            if self.transport.last_refusal < self.probe_at:
                due = min(due, self.probe_at + PROBE_ANSWER)
            return max(0.0, due - now)
        return self.session.next_due(now, self.transport.reliable, template_refresh)

    async def probe(self) -> bool:
        """Whether data may go: always over TCP/TLS. Over UDP, while sends are refused, the
        templates go every PROBE_INTERVAL seconds, and once they have gone PROBE_ANSWER
        seconds without a refusal the collector takes records again. Raises
        `DatagramRefused` when the probe is refused at once."""
        transport = self.transport
        if transport.reliable or transport.refused_since is None:
            return True
        if not self.probing:  # the kernel reported a refusal while idle
            self.refused()
        now = time.monotonic()
        if transport.last_refusal < self.probe_at and now - self.probe_at >= PROBE_ANSWER:
            transport.recovered()
            self.probing = False
            self.queue.reachable, self.queue.last_error = True, ""
            log.info("collector %s takes records again (its templates went %.1fs ago); "
                     "%d records queued", self.collector, now - self.probe_at,
                     self.queue.queued)
            return True
        if now - self.probe_at >= PROBE_INTERVAL:
            self.probe_at = now
            self.session.forget_templates()
            await self.send_templates_if_due(0.0)
        return False

    def refused(self) -> None:
        """UDP: the kernel refused a datagram, or reported a refusal while idle. What the
        flight had not delivered goes back to the queue, the templates (and the ledger) are
        due again before any data, the collector counts as unreachable, probes begin."""
        if self.queue.flight is not None:
            self.queue.put_back()
        self.session.forget_templates()
        self.probe_at = self.transport.last_refusal  # the refused datagram: the first probe
        self.queue.last_error = self.transport.last_error
        if not self.probing:
            log.warning("collector %s refuses UDP (%s): %d records queued; templates go "
                        "every %.0fs until it takes them", self.collector,
                        self.queue.last_error, self.queue.queued, PROBE_INTERVAL)
        self.probing = True
        self.queue.mark_unreachable()

    async def send_templates_if_due(self, template_refresh: float) -> None:
        now = time.monotonic()
        if self.session.templates_due(now, self.transport.reliable, template_refresh):
            await self._send(self.session.template_messages(now, int(time.time())))

    async def send_ledger_if_due(self) -> None:
        now = time.monotonic()
        if self.session.ledger_due(now):
            records = self.ledger.records(self.transport.address,
                                          self.session.observation_domain_id)
            await self._send(self.session.ledger_messages(records, now, int(time.time())),
                             numbered=True)

    async def send_last_ledger(self) -> None:
        """At the end: the ledger's final counts, if the collector takes them."""
        if not self.transport.connected or self.probing:
            return
        self.session.ledger_sent_at = NEVER
        try:
            async with asyncio.timeout(WITHDRAW_TIMEOUT):
                await self.send_templates_if_due(float("inf"))  # if none went yet
                await self.send_ledger_if_due()
        except (OSError, ConnectionError) as err:  # TimeoutError included
            log.debug("last ledger not sent: %s", err)

    async def _send(self, messages: list[bytes], numbered: bool = False) -> None:
        """Messages other than a flight's, each counted once it is in the kernel. A refused
        one that was `numbered` (it holds data records) gives its numbers back."""
        for message in messages:
            self.transport.write(message)
            await self._drain(message, numbered)
            self._count(message)

    async def _drain(self, message: bytes, numbered: bool = True) -> None:
        """Wait until `message`, written, is in the kernel. Over UDP a refused one that was
        `numbered` gives its numbers back, and those of the messages after it."""
        try:
            await self.transport.drain()
        except DatagramRefused:
            if numbered:
                self.session.rewind(message)
            raise

    def _count(self, message: bytes) -> None:
        self.queue.stats.messages_sent += 1
        self.queue.stats.octets_sent += len(message)

    async def send_next(self) -> None:
        """Send the batch in flight, from where it stopped, or else the next one."""
        queue = self.queue
        flight = queue.flight
        if flight is None:
            flight = queue.take_off(self.session, int(time.time()))
        await asyncio.sleep(0)  # let the transport see a close that already arrived
        if flight.cut_short:  # while the kernel took it
            await self._drain(flight.messages[flight.delivered])
            self._delivered(flight.messages[flight.delivered])
        while flight.written < len(flight.messages):
            message = flight.messages[flight.written]
            self.transport.write(message)
            flight.written += 1
            await self._drain(message)  # refused: `refused` puts the rest of the flight back
            self._delivered(message)
        queue.landed()

    def _delivered(self, message: bytes) -> None:
        self._count(message)
        self.queue.delivered()

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
                    self._delivered(flight.messages[flight.delivered])
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
            self._delivered(flight.messages[flight.delivered])
        self.queue.put_back()

    async def _withdraw_templates(self) -> None:
        """Never over UDP, where withdrawals must not be sent."""
        if not (self.transport.reliable and self.transport.connected):
            return
        try:
            async with asyncio.timeout(WITHDRAW_TIMEOUT):
                await self._send([self.session.withdrawal(int(time.time()))])
        except (OSError, ConnectionError) as err:  # TimeoutError included
            log.debug("template withdrawal not sent: %s", err)
