"""`ovsflow run`: source -> filter -> store -> exporter, on one asyncio loop, for both
layers: conntrack polls and, when `ovs.bridge` is set, the deny path's packet-ins.

The agent wires the stages and runs the poll loop; its other jobs have rooms of their own:
a reload (reload.py), the export state across restarts (state_keeper.py), health and the
probes (health.py), metrics (metrics.py), the time records carry (clock.py). Every
long-lived task (poll loop, exporter, deny path, metrics server, state saves) runs under
one `Supervisor`: an unexpected exception is logged, counted and the task restarts with
backoff. The poll's blocking parts run in a worker
thread, so the exporter keeps sending while a large table is dumped; the store's due
records are encoded there too, batch by batch, and each batch is handed to the exporter at
once. The poll loop waits for the exporter when the queue is over its bound
(backpressure), so a large poll loses nothing while the collector takes records.
SIGTERM/SIGINT: the poll in progress completes, a last poll, final records for every live
connection, a flush of the queues bounded only by the time a collector takes nothing, then
the export state, with what each collector did not take (the next agent sends it), exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from .clock import RecordClock
from .config import Config
from .deny import open_deny_source
from .deny.store import DenyStore
from .enrich import Enricher, configured_pod_networks
from .exporter import IN_FLIGHT, Exporters, encode_in_batches
from .filter import ConnectionFilter
from .health import Health
from .metrics import AgentMetrics, serve
from .pods import PodMap
from .record import EncodedRecords
from .reload import Reloader
from .rooms import room_attribute
from .source import open_source
from .state import Origin
from .state_file import ExportState
from .state_keeper import StateKeeper
from .store import ConnectionStore
from .supervisor import Supervisor

log = logging.getLogger(__name__)

SHUTDOWN_FLUSH_SECONDS = 10.0  # without progress: the collector is away


class Agent:
    def __init__(self, config: Config, config_path: str | None = None):
        self.source = None  # opened by the first poll
        fe, ovs = config.flow_exporter, config.ovs
        self.filter = ConnectionFilter(config.conntrack.zones, fe.protocols)
        # The Pods of this node, from the bridge's Port rows in OVSDB (Antrea's CNI names
        # them there); without a bridge records carry addresses and rule ids only.
        self.pods = PodMap(f"unix:{os.path.join(ovs.run_dir, 'db.sock')}") \
            if ovs.bridge else None
        self.enricher = Enricher(self.pods, config.ipfix.node_name,
                                 configured_pod_networks(config.ipfix))
        self.store = ConnectionStore(fe.active_timeout, fe.idle_timeout,
                                     config.conntrack.max_connections, self.enricher)
        # The filter as it is (a reload changes it in place), over the store's keys
        self.store.wanted = lambda keys: self.filter.accepts_columns(
            keys["zone"], keys["protocol"], keys["destination_port"])
        self.stopping = asyncio.Event()
        self.supervisor = Supervisor(self.stopping)
        self.exporters = Exporters(config, self.supervisor)
        self.deny_store = DenyStore(fe.active_timeout, fe.idle_timeout, ovs.max_deny_connections,
                                    self.enricher)
        self.deny = open_deny_source(ovs, self.filter, self.deny_store)  # None: no bridge
        self.exporters.metering.watch(self.store, self.deny)  # the collectors' ledgers
        # What each collector was told, kept across restarts
        self.state_keeper = StateKeeper(
            ExportState(config.state.directory, Origin.here(
                config.ipfix.node_name, config.ipfix.observation_domain_id)),
            self.store, self.deny_store, self.exporters) if config.state.directory else None
        self.health = Health(fe.poll_interval, self.exporters, self.supervisor, self.deny,
                             self.state_keeper.export_state if self.state_keeper else None)
        self.clock = RecordClock()  # records' times: the wall clock, never going back
        # Held by a reload and by a poll's dump: a reload never changes the filter under a
        # dump in progress, and two reloads never overlap.
        self._config_lock = asyncio.Lock()
        self.reloader = Reloader(
            config, config_path, lock=self._config_lock, stopping=self.stopping,
            connection_filter=self.filter, source=lambda: self.source, deny=self.deny,
            store=self.store, deny_store=self.deny_store, enricher=self.enricher,
            exporters=self.exporters, health=self.health, close_timeout=SHUTDOWN_FLUSH_SECONDS)
        self._metrics_server: asyncio.Server | None = None
        self._poll_records = 0  # conntrack records of the poll in progress

    config = room_attribute("reloader", "config")  # the running configuration
    reloads = room_attribute("reloader", "reloads")

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # The polls' worker threads (`asyncio.to_thread`) are one thread: polls never overlap,
        # and one thread's allocations stay in one malloc arena, where each of the default
        # executor's threads would keep an arena as large as a poll's temporaries.
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1,
                                                     thread_name_prefix="ovsflow-poll"))
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        reloads: set[asyncio.Task] = set()

        def reload_on_signal() -> None:
            self.exporters.renew_tls()
            task = asyncio.create_task(self.reloader.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload_on_signal)

        def hand_over(batch: EncodedRecords) -> None:
            """In the poll's worker thread, per batch of due records as it is made: the
            exporter sends it while the poll goes on. While the collector takes records, the
            poll waits here for it to have taken all but `IN_FLIGHT` of them, so that a wave
            of due records (the whole table, at a common timeout) is made at the pace it is
            sent rather than queued whole; while the collector is away the queue fills to
            its bound (`wait_for_room` then drops the oldest)."""
            loop.call_soon_threadsafe(self._submit_conntrack, batch)
            if self.exporters.queued + len(batch) > IN_FLIGHT:
                asyncio.run_coroutine_threadsafe(self.exporters.wait_for_room(IN_FLIGHT),
                                                 loop).result()

        self.store.hand_over = hand_over
        fe = self.config.flow_exporter
        log.info("exporting protocols %s from zones %s to %s (observation domain %d)",
                 fe.protocols.describe(), sorted(self.config.conntrack.zones) or "all",
                 ", ".join(self.exporters.by_collector),
                 self.config.ipfix.observation_domain_id)
        if self.config.metrics.host:  # bound here: a taken address stops the start
            await self._start_metrics_server()
        if self.pods is not None:
            self.pods.start()  # loads in its own thread, reconnects by itself
        if self.state_keeper is not None:
            await self.state_keeper.load(self.config.ovs.bridge)
        self.exporters.start()
        poll_task = self.supervisor.spawn("poll", self._poll_loop)
        background = []
        if self.deny is not None:
            background.append(self.supervisor.spawn("deny-path", self.deny.run))
        if self.state_keeper is not None:
            background.append(self.supervisor.spawn("state", lambda: self.state_keeper.keep(
                self._config_lock, lambda: self.source, self.config.ovs.bridge)))
        if self._metrics_server is not None:
            background.append(self.supervisor.spawn("metrics", self._serve_metrics))
        try:
            await self.stopping.wait()
            await poll_task  # the poll in progress completes: the store stays consistent
        finally:
            # a reload half done would leave the exporter between two transports
            await asyncio.gather(*reloads, return_exceptions=True)
            for task in [poll_task, *background]:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            await self._stop(loop)

    async def _stop(self, loop: asyncio.AbstractEventLoop) -> None:
        # A last poll: the final records carry what moved since the one before.
        await self.poll_once()
        now = self.clock()
        self.store.hand_over = None  # on this thread: nothing to hand over
        keeper = self.state_keeper
        continued = keeper is not None
        self.exporters.new_poll()  # the final records fold into the last poll's, if waiting
        final = self.store.flush(now, continued) + encode_in_batches(
            self.deny_store.flush(now, continued))
        if self.deny is not None:
            final += self.deny.totals.flush(now)  # what the denying flows counted
            log.info("deny path: %d packet-ins taken, %d of other flows ignored, %d of "
                     "unwanted protocols, %d malformed, %d allowed (logged by Antrea)",
                     self.deny.packet_ins, self.deny.ignored, self.deny.unwanted,
                     self.deny.malformed, self.deny.allowed)
        self.exporters.submit_encoded(final)
        bridge = self.config.ovs.bridge
        if continued:  # should the flush outlast the grace before a SIGKILL
            await keeper.save(self.source, bridge)
        log.info("stopping: %d final records; flushing the export queues",
                 sum(batch.protocols.total() for batch in final))
        await self.exporters.close(SHUTDOWN_FLUSH_SECONDS, carry=continued)
        if continued:
            # After the flush: what a collector did not take goes with the state, and the
            # next agent sends it.
            saved = await keeper.save(self.source, bridge, final=True)
            for collector, exporter in self.exporters.by_collector.items():
                left = exporter.queue.carried_over(saved)
                if left and not saved:
                    log.error("%d records for %s are lost: the export state, which would "
                              "carry them to the next agent, could not be written", left,
                              collector)
        if self.pods is not None:
            await asyncio.to_thread(self.pods.stop)
        if self._metrics_server is not None:
            self._metrics_server.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)

    async def _start_metrics_server(self) -> None:
        self._metrics_server = await serve(AgentMetrics(self), self.health,
                                           self.config.metrics.host, self.config.metrics.port)

    async def _serve_metrics(self) -> None:
        if self._metrics_server is None or not self._metrics_server.is_serving():
            await self._start_metrics_server()
        await self._metrics_server.serve_forever()

    async def _poll_loop(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            if self.reloader.file_changed():
                await self.reloader.reload()
            self.exporters.renew_tls()  # TLS files rotated in place (cert-manager, Secrets)
            await self.poll_once()
            wait = self.config.flow_exporter.poll_interval - (time.monotonic() - started)
            try:
                async with asyncio.timeout(max(wait, 0)):
                    await self.stopping.wait()
            except TimeoutError:
                pass

    def _submit_conntrack(self, batch: EncodedRecords) -> None:
        self._poll_records += self.health.count_records("conntrack", [batch])
        self.exporters.enqueue(batch)

    async def poll_once(self) -> None:
        try:
            await self._poll()
        finally:
            self.health.poll_ended()

    async def _poll(self) -> None:
        if self.deny is not None:  # the meter's share for the deny records due now
            await self.deny.refresh_meter_stats()
        started = time.perf_counter()
        now = self.clock()
        self._poll_records = 0
        self.exporters.new_poll()
        # The deny path's records are due whatever the conntrack poll does.
        deny_batches = encode_in_batches(self.deny_store.expired(now))
        deny_records = self.health.count_records("deny", deny_batches)
        if self.deny is not None:  # what the denying flows counted (deny/totals.py)
            deny_batches += self.deny.totals.due(now)
        self.exporters.submit_encoded(deny_batches)  # drops, if it must, for the whole poll
        keeper = self.state_keeper
        try:
            async with self._config_lock:
                if self.source is None:
                    self.source = await asyncio.to_thread(open_source, self.config, self.filter)
                if keeper is not None and keeper.restoring:
                    await asyncio.to_thread(keeper.restore_connections, self.source)
                records = await self.source.update(self.store, now)
        except (OSError, RuntimeError, ValueError) as err:
            # The table is unknown this time: nothing is taken for gone (that would end every
            # connection). Try again at the next interval.
            error = str(err) or type(err).__name__
            # Once per distinct error: a source that stays broken is shown by /healthz and
            # ovsflow_poll_errors_total, not by a line every interval.
            (log.error if self.health.poll_failed(error) else log.debug)(
                "conntrack poll failed: %s", error)
            return
        self.health.source_answered()
        for batch in records:  # none: they were handed over as they were made
            self._submit_conntrack(batch)
        self.health.poll_completed(time.perf_counter() - started)
        log.debug("poll: %d connections tracked, %d conntrack and %d deny records, cycle "
                  "(dump, decode, filter, store update) %.3fs", len(self.store),
                  self._poll_records, deny_records, self.health.last_poll_seconds)
        await self.exporters.wait_for_room()  # backpressure: the next poll waits for it
