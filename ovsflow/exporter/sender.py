"""The exporting process of one collector: its queue sent over its transport.

The exporter task (`start`) sends what is queued (`queue.ExportQueue`), a batch at a time
as a flight of IPFIX messages (`flight.Flight`, numbered by `session.Session`); it
(re)connects with exponential backoff and jitter, and sends templates first on every new
connection, and over UDP every `template_refresh` seconds and, while the kernel refuses
its datagrams, as a probe every few seconds (`link.Link.probe`); the ledger (ledger.py)
follows the templates and goes every `LEDGER_INTERVAL` seconds and at the end. A clean end
of a TCP/TLS session withdraws the templates (RFC 7011 §8.1). Rotated TLS files start a
new session between two batches (`renew_tls`); a reload can point the exporter at another
collector (`retarget`); `close` sends what is left, bounded only by the time without
progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from ..config import IpfixConfig
from ..record import EncodedRecords, FlowRecord
from ..rooms import room_attribute
from ..supervisor import Supervisor
from ..transport import DatagramRefused
from .encoding import encode_in_batches
from .ledger import Ledger, Metering
from .link import Link
from .queue import ExportQueue

log = logging.getLogger(__name__)

STALL_TIMEOUT = 10.0  # seconds without a record taken: the collector counts as unreachable


class Exporter:
    def __init__(self, transport, observation_domain_id: int, *,
                 max_buffered: int = 100_000,
                 template_refresh: float = IpfixConfig.template_refresh,
                 max_backoff: float = 30.0, stall_timeout: float = STALL_TIMEOUT,
                 max_waiting_live: int | None = None, supervisor: Supervisor | None = None,
                 metering: Metering | None = None):
        self.observation_domain_id = observation_domain_id
        self.template_refresh = template_refresh
        self.max_backoff = max_backoff
        self.supervisor = supervisor or Supervisor()
        self.queue = ExportQueue(max_buffered, stall_timeout, max_waiting_live)
        self.ledger = Ledger(self.queue.stats, metering or Metering())
        self.link = self._link(transport)
        self._task: asyncio.Task | None = None
        self._renew = False  # the TLS files changed: start a new session between batches

    def _link(self, transport) -> Link:
        return Link(transport, self.observation_domain_id, self.queue, self.max_backoff,
                    self.ledger)

    transport = room_attribute("link", "transport")
    # What the agent, the metrics and a reload read and set: the queue's
    stats = room_attribute("queue", "stats")
    rejected = room_attribute("queue", "rejected")  # IPFIX element -> records rejected for it
    reachable = room_attribute("queue", "reachable")
    queued = room_attribute("queue", "queued")
    max_buffered = room_attribute("queue", "max_buffered")

    def submit(self, records: Iterable[FlowRecord]) -> None:
        """Queue records for export; never waits (see `wait_for_room`)."""
        self.queue.submit(encode_in_batches(records))

    def submit_encoded(self, batches: Iterable[EncodedRecords]) -> None:
        """Queue encoded records (see `encoding.RecordEncoder`); never waits."""
        self.queue.submit(batches)

    def enqueue(self, batch: EncodedRecords) -> None:
        self.queue.enqueue(batch)

    async def wait_for_room(self, limit: int | None = None) -> None:
        await self.queue.wait_for_room(limit)

    def problem(self, grace: float) -> str | None:
        """Why the exporter has been unable to do its job for more than `grace` seconds, or
        None: a transport whose sends keep failing (UDP: refused), or records waiting with
        none taken."""
        now, failing_since = time.monotonic(), self.transport.failing_since
        if failing_since is not None and now - failing_since > grace:
            return (f"sends to {self.link.collector} failing for "
                    f"{now - failing_since:.0f}s: {self.transport.last_error}; "
                    f"{self.queue.queued} records waiting")
        return self.queue.stuck(grace)

    @property
    def delivered(self) -> bool:
        """Something reached the collector's socket: a TCP/TLS connection was made, or over
        UDP a datagram went out without an error."""
        if self.transport.reliable:
            return self.stats.connections > 0
        return self.transport.datagrams_sent > 0

    def start(self) -> None:
        self._task = self.supervisor.spawn("exporter", self._run)
        self.queue.pending.set()  # connect now: templates go first, and /readyz learns early

    async def retarget(self, transport) -> None:
        """Send to another collector from now on (a reload changed the address or its TLS
        settings); what is queued goes there."""
        running = self._task is not None
        await self._stop_task()
        await self.link.end(withdraw=True)
        self._renew = False
        self.link = self._link(transport)
        self.queue.reachable = True
        if running:
            self.start()
        self.queue.pending.set()

    async def _stop_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def renew_tls(self) -> bool:
        """Re-read the TLS files (at each poll, and on SIGHUP). When they changed, the
        session in progress ends cleanly after the batch it is sending and a new one starts
        with the new files: rotated credentials are in use within a poll interval, and a
        collector that refuses them shows as unreachable at once. True when they changed."""
        if not self.transport.renew_tls():
            return False
        log.info("the TLS files for the collector %s changed: reconnecting with them",
                 self.link.collector)
        self._renew = True
        self.queue.pending.set()
        return True

    async def close(self, timeout: float, carry: bool = False) -> bool:
        """Stop sending in the background, then send what is queued (see `_flush`) and end
        the session cleanly. True when nothing was left unsent. `carry`: what is left stays
        queued for the export state (`ExportQueue.snapshot`, `carried_over`) rather than
        dropped."""
        await self._stop_task()
        return await self._flush(timeout, carry)

    async def _run(self) -> None:
        pause = 0.0
        pending = self.queue.pending
        while True:
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the
                # cancellation that close() sends when the event is set at the same moment.
                async with asyncio.timeout(self.link.next_due(self.template_refresh)):
                    await pending.wait()
            except TimeoutError:
                pass
            pending.clear()
            if self._renew:
                self._renew = False
                await self.link.end(withdraw=True)
            await self.link.connect()
            try:
                await self._send_queued()
                pause = 0.0
            except DatagramRefused:
                self.link.refused()
            except (OSError, ConnectionError) as err:
                log.warning("sending to the collector failed: %s; reconnecting", err)
                await self.link.lost(err)
                # a collector that accepts and then fails every send gets backoff too
                pause = min(max(pause * 2, 0.2), self.max_backoff)
                await asyncio.sleep(pause)
                pending.set()

    async def _flush(self, timeout: float, carry: bool) -> bool:
        """Send everything queued, reconnecting if needed. `timeout` bounds only the time
        without progress: with the collector taking records, every record goes out however
        long that takes; what is left when it stops taking them is counted as dropped, or
        kept for the next agent (`carry`)."""
        queue = self.queue
        try:
            async with asyncio.timeout(timeout) as deadline:
                queue.deadline = (deadline, timeout)
                while queue.flight is not None or queue.waiting:
                    await self.link.connect()
                    try:
                        if not await self.link.probe():  # UDP, refused: wait for the next
                            await asyncio.sleep(self.link.next_due(self.template_refresh))
                            continue
                        await self.link.send_templates_if_due(self.template_refresh)
                        await self.link.send_next()
                    except DatagramRefused:
                        self.link.refused()
                    except (OSError, ConnectionError) as err:
                        await self.link.lost(err)
                        await asyncio.sleep(0.1)
        except TimeoutError:
            pass
        finally:
            queue.deadline = None
        if queue.flight is None and not queue.waiting:  # else it takes nothing: no ledger
            await self.link.send_last_ledger()
        await self.link.end(withdraw=True)
        left = queue.queued if carry else queue.drop_unsent()
        if left:
            log.error("shutting down with %d records unsent to %s: the collector took nothing "
                      "for %.1fs (%s); %s", left, self.link.collector, timeout,
                      queue.last_error or "no progress",
                      "they are kept for the next agent (export state)" if carry
                      else "they are dropped")
        stats = self.stats
        transport = self.link.transport
        log.info("export to %s:%s closed: %d records submitted, %d exported, %d dropped, %d "
                 "rejected, %d folded into newer ones, %d left for the next agent",
                 transport.host, transport.port, stats.records_submitted,
                 stats.records_exported, stats.records_dropped, stats.records_rejected,
                 stats.records_folded, left if carry else 0)
        return left == 0

    async def _send_queued(self) -> None:
        queue, link = self.queue, self.link
        if not await link.probe():
            return
        await link.send_templates_if_due(self.template_refresh)
        await link.send_ledger_if_due()
        while (queue.flight is not None or queue.waiting) and not self._renew:
            await link.send_next()
            await link.send_templates_if_due(self.template_refresh)
            await link.send_ledger_if_due()
        if self._renew:
            queue.pending.set()
