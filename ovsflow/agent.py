"""`ovsflow run`: source -> filter -> store -> exporter, on one asyncio loop.

The poll's blocking parts run in a worker thread, so the exporter keeps sending while a
large table is dumped. SIGTERM/SIGINT: final records for every live connection, a bounded
flush of the queue, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from .config import Config
from .exporter import Exporter
from .filter import ConnectionFilter
from .source import open_source
from .store import ConnectionStore
from .transport import transport_for

log = logging.getLogger(__name__)

SHUTDOWN_FLUSH_SECONDS = 10.0


class Agent:
    def __init__(self, config: Config):
        self.config = config
        fe = config.flow_exporter
        self.filter = ConnectionFilter(config.conntrack.zones, fe.protocols)
        self.store = ConnectionStore(fe.active_timeout, fe.idle_timeout,
                                     config.conntrack.max_connections)
        self.exporter = Exporter(transport_for(fe.collector, config.ipfix),
                                 config.ipfix.observation_domain_id,
                                 max_buffered=config.ipfix.max_buffered_records,
                                 template_refresh=config.ipfix.template_refresh)
        self.stopping = asyncio.Event()
        self.polls = 0
        self.poll_errors = 0
        self.last_poll_seconds = 0.0

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        fe = self.config.flow_exporter
        log.info("exporting protocols %s from zones %s to %s (observation domain %d)",
                 fe.protocols.describe(), sorted(self.config.conntrack.zones) or "all",
                 fe.collector, self.config.ipfix.observation_domain_id)
        self.exporter.start()
        try:
            source = await open_source(self.config, self.filter)
            while not self.stopping.is_set():
                started = time.monotonic()
                await self.poll_once(source)
                wait = fe.poll_interval - (time.monotonic() - started)
                try:
                    await asyncio.wait_for(self.stopping.wait(), max(wait, 0))
                except TimeoutError:
                    pass
        finally:
            final = self.store.flush(time.time())
            self.exporter.submit(final)
            log.info("stopping: %d final records; flushing the export queue", len(final))
            await self.exporter.close(SHUTDOWN_FLUSH_SECONDS)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    async def poll_once(self, source) -> None:
        started = time.perf_counter()
        try:
            connections = await source.poll()
        except (OSError, RuntimeError, ValueError) as err:
            # The table is unknown this time; do not take it for empty (that would end
            # every connection). Try again at the next interval.
            self.poll_errors += 1
            log.error("conntrack poll failed: %s", err)
            return
        polled = time.perf_counter()
        records = self.store.update(connections, time.time())
        self.exporter.submit(records)
        self.polls += 1
        self.last_poll_seconds = time.perf_counter() - started
        log.debug("poll: %d connections (dump, decode, filter %.3fs), %d records, "
                  "%d tracked, cycle %.3fs", len(connections), polled - started, len(records),
                  len(self.store), self.last_poll_seconds)
