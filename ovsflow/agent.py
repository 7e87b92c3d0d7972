"""`ovsflow run`: source -> filter -> store -> exporter, on one asyncio loop, for both
layers: conntrack polls and, when `ovs.bridge` is set, the deny path's packet-ins.

The poll's blocking parts run in a worker thread, so the exporter keeps sending while a
large table is dumped. SIGTERM/SIGINT: final records for every live connection, a bounded
flush of the queue, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter

from .config import Config, ConfigError, load_config
from .deny.source import DenySource
from .deny.store import DenyStore
from .exporter import Exporter
from .filter import ConnectionFilter
from .metrics import POLL_BUCKETS, serve
from .source import open_source
from .store import ConnectionStore
from .transport import transport_for

log = logging.getLogger(__name__)

SHUTDOWN_FLUSH_SECONDS = 10.0


class Agent:
    def __init__(self, config: Config, config_path: str | None = None):
        self.config = config
        self.config_path = config_path
        self.source = None
        self.reloads = 0
        self._config_stamp: int | None = None
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
        self.last_poll_at = 0.0  # time.monotonic() of the last completed poll
        self.records_by_protocol: dict[tuple[str, int], int] = {}  # (layer, protocol)
        self.poll_buckets = [0] * len(POLL_BUCKETS)  # polls at or under each bound
        self.poll_seconds_sum = 0.0

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.create_task(self.reload()))
        fe = self.config.flow_exporter
        log.info("exporting protocols %s from zones %s to %s (observation domain %d)",
                 fe.protocols.describe(), sorted(self.config.conntrack.zones) or "all",
                 fe.collector, self.config.ipfix.observation_domain_id)
        metrics_server = None
        if self.config.metrics.host:
            metrics_server = await serve(self, self.config.metrics.host,
                                         self.config.metrics.port)
        self.exporter.start()
        deny_task = asyncio.create_task(self.deny.run(), name="deny-path") if self.deny else None
        try:
            self.source = await asyncio.to_thread(open_source, self.config, self.filter)
            while not self.stopping.is_set():
                started = time.monotonic()
                if self._config_file_changed():
                    await self.reload()
                await self.poll_once(self.source)
                wait = self.config.flow_exporter.poll_interval - (time.monotonic() - started)
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
            if metrics_server is not None:
                metrics_server.close()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    def _config_file_changed(self) -> bool:
        """Whether the file changed since it was last read: a Kubernetes ConfigMap update
        reaches the pod as a changed file, with no signal."""
        if self.config_path is None:
            return False
        try:
            stamp = os.stat(self.config_path).st_mtime_ns
        except OSError:
            return False  # e.g. mid-swap of a ConfigMap's symlink; the next poll looks again
        changed = self._config_stamp is not None and stamp != self._config_stamp
        self._config_stamp = stamp
        return changed

    def _count_by_protocol(self, layer: str, records: list) -> None:
        counts = self.records_by_protocol
        for protocol, count in Counter(r.protocol for r in records).items():
            counts[layer, protocol] = counts.get((layer, protocol), 0) + count

    async def reload(self) -> None:
        """SIGHUP, or the file changed: read it again. Protocols and zones change at both layers at once
        (the poller's filter and dump plan, the deny-table flows); timeouts, the poll
        interval and the collector address change too. An invalid file changes nothing."""
        if self.config_path is None:
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as err:
            log.error("reload: %s is invalid, keeping the running configuration: %s",
                      self.config_path, "; ".join(err.problems))
            return
        for warning in new.warnings:
            log.warning("reload: %s", warning)
        old, self.config = self.config, new
        self.reloads += 1
        fe, new_fe = old.flow_exporter, new.flow_exporter
        if (new_fe.protocols, new.conntrack.zones) != (fe.protocols, old.conntrack.zones):
            self.filter.protocols, self.filter.zones = new_fe.protocols, new.conntrack.zones
            if self.source is not None:
                self.source.replan()
            log.info("reload: exporting protocols %s from zones %s",
                     new_fe.protocols.describe(), sorted(new.conntrack.zones) or "all")
            if self.deny is not None:
                try:
                    await self.deny.reconcile()
                except (OSError, ConnectionError, RuntimeError) as err:
                    # The session restarts and installs the new set anyway.
                    log.warning("reload: deny flows not reconciled now: %s", err)
        for store in (self.store, self.deny_store):
            store.active_timeout, store.idle_timeout = new_fe.active_timeout, new_fe.idle_timeout
        if new_fe.collector != fe.collector:
            log.info("reload: collector %s -> %s", fe.collector, new_fe.collector)
            await self.exporter.retarget(transport_for(new_fe.collector, new.ipfix))
        for section in ("ovs", "ipfix", "metrics"):
            if getattr(new, section) != getattr(old, section):
                log.warning("reload: changes to %s take effect at the next restart", section)
        if (new.conntrack.source, new.conntrack.max_connections) != (
                old.conntrack.source, old.conntrack.max_connections):
            log.warning("reload: conntrack.source and maxConnections take effect at the next "
                        "restart")

    async def poll_once(self, source) -> None:
        started = time.perf_counter()
        now = time.time()
        try:
            records = await source.update(self.store, now)
        except (OSError, RuntimeError, ValueError) as err:
            # The table is unknown this time: nothing is taken for gone (that would end every
            # connection). Try again at the next interval.
            self.poll_errors += 1
            log.error("conntrack poll failed: %s", err)
            return
        conntrack_records = len(records)
        deny_records = self.deny_store.expired(now)
        self._count_by_protocol("conntrack", records)
        self._count_by_protocol("deny", deny_records)
        records += deny_records
        self.exporter.submit(records)
        if self.deny is not None:
            await self.deny.refresh_meter_stats()
        self.polls += 1
        self.last_poll_seconds = seconds = time.perf_counter() - started
        self.poll_seconds_sum += seconds
        for index, bound in enumerate(POLL_BUCKETS):
            if seconds <= bound:
                self.poll_buckets[index] += 1
        self.last_poll_at = time.monotonic()
        log.debug("poll: %d connections tracked, %d conntrack and %d deny records, cycle "
                  "(dump, decode, filter, store update) %.3fs", len(self.store),
                  conntrack_records, len(records) - conntrack_records, self.last_poll_seconds)
