"""`ovsflow run`: source -> filter -> store -> exporter, on one asyncio loop, for both
layers: conntrack polls and, when `ovs.bridge` is set, the deny path's packet-ins.

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
from .deny.source import DenySource
from .deny.store import DenyStore
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
        ovs = config.ovs
        self.deny_store = DenyStore(fe.active_timeout, fe.idle_timeout, ovs.max_deny_connections)
        self.deny = DenySource(ovs.run_dir, ovs.bridge, ovs.deny_table, ovs.deny_meter_id,
                               ovs.deny_packet_in_rate, self.filter,
                               self.deny_store) if ovs.bridge else None
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
        deny_task = asyncio.create_task(self.deny.run(), name="deny-path") if self.deny else None
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
            if deny_task is not None:
                deny_task.cancel()
                try:
                    await deny_task
                except asyncio.CancelledError:
                    pass
            now = time.time()
            final = self.store.flush(now) + self.deny_store.flush(now)
            if self.deny is not None:
                log.info("deny path: %d packet-ins taken, %d of other flows ignored, %d of "
                         "unwanted protocols, %d malformed", self.deny.packet_ins,
                         self.deny.ignored, self.deny.unwanted, self.deny.malformed)
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
        now = time.time()
        records = self.store.update(connections, now)
        records += self.deny_store.expired(now)
        self.exporter.submit(records)
        self.polls += 1
        self.last_poll_seconds = time.perf_counter() - started
        log.debug("poll: %d connections (dump, decode, filter %.3fs), %d records, "
                  "%d tracked, cycle %.3fs", len(connections), polled - started, len(records),
                  len(self.store), self.last_poll_seconds)
