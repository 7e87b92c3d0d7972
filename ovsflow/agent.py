"""`ovsflow run`: source -> filter -> store -> exporter, on one asyncio loop, for both
layers: conntrack polls and, when `ovs.bridge` is set, the deny path's packet-ins.

Every long-lived task (poll loop, exporter, deny path, metrics server) runs under one
`Supervisor`: an unexpected exception is logged, counted and the task restarts with backoff.
The poll's blocking parts run in a worker thread, so the exporter keeps sending while a
large table is dumped; the store's due records are encoded there too, batch by batch, and
each batch is handed to the exporter at once. The poll loop waits for the exporter when the
queue is over its bound (backpressure), so a large poll loses nothing while the collector
takes records. A reload is built completely before anything is swapped, and two never run
at once. SIGTERM/SIGINT: the poll in progress completes, final records for every live
connection, a flush of the queue bounded only by the time the collector takes nothing,
exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from openflow.messages import OpenFlowError

from .config import Config, ConfigError, IpfixConfig, load_config
from .deny import open_deny_source
from .deny.store import DenyStore
from .enrich import Enricher, PodNetworks
from .exporter import IN_FLIGHT, Exporters, encode_in_batches
from .filter import ConnectionFilter
from .metrics import POLL_BUCKETS, serve
from .pods import PodMap
from .protocols import ProtocolSet
from .record import EncodedRecords
from .source import open_source
from .state import ExportState, Origin, Section
from .store import ConnectionStore
from .supervisor import Supervisor

log = logging.getLogger(__name__)

SHUTDOWN_FLUSH_SECONDS = 10.0  # without progress: the collector is away
HEALTH_POLLS = 3  # a layer failing for this many poll intervals makes /healthz answer 503
HEALTH_MIN_SECONDS = 5.0  # ... and at least this long
# What building a reloaded configuration can raise besides ConfigError: unreadable TLS files
# (ssl.SSLError is an OSError), values the parts refuse, a switch refusing the new flows.
RELOAD_ERRORS = (OSError, ssl.SSLError, TypeError, ValueError, OpenFlowError)


def _one_line(text: str) -> str:
    """YAML errors span lines (with a caret under the column); a log line does not."""
    return " ".join(text.split())


def _deny_source_name(config: Config) -> str:
    return f"deny {config.ovs.bridge}"


def _pod_networks(ipfix: IpfixConfig) -> PodNetworks:
    return PodNetworks(str(network) for network in ipfix.cluster_pod_cidrs)


class Agent:
    def __init__(self, config: Config, config_path: str | None = None):
        self.config = config
        self.config_path = config_path
        self.source = None
        self.reloads = 0
        self._config_stamp: int | None = None
        fe, ovs = config.flow_exporter, config.ovs
        self.filter = ConnectionFilter(config.conntrack.zones, fe.protocols)
        # The Pods of this node, from the bridge's Port rows in OVSDB (Antrea's CNI names
        # them there); without a bridge records carry addresses and rule ids only.
        self.pods = PodMap(f"unix:{os.path.join(ovs.run_dir, 'db.sock')}") \
            if ovs.bridge else None
        self.enricher = Enricher(self.pods, config.ipfix.node_name,
                                 _pod_networks(config.ipfix))
        self.store = ConnectionStore(fe.active_timeout, fe.idle_timeout,
                                     config.conntrack.max_connections, self.enricher)
        self.stopping = asyncio.Event()
        self.supervisor = Supervisor(self.stopping)
        self.exporters = Exporters(config, self.supervisor)
        self.deny_store = DenyStore(fe.active_timeout, fe.idle_timeout, ovs.max_deny_connections,
                                    self.enricher)
        self.deny = open_deny_source(ovs, self.filter, self.deny_store)  # None: no bridge
        # What the collector was told, kept across restarts (ovsflow/state.py)
        self.export_state = ExportState(config.state.directory, Origin.here(
            config.ipfix.node_name, config.ipfix.observation_domain_id)) \
            if config.state.directory else None
        self._restoring = self.export_state is not None  # until the first poll's source
        # Held by a reload and by a poll's dump: a reload never changes the filter under a
        # dump in progress, and two reloads never overlap.
        self._config_lock = asyncio.Lock()
        self._metrics_server: asyncio.Server | None = None
        self.polls = 0
        self.poll_errors = 0
        self.last_poll_seconds = 0.0
        self.started_at = time.monotonic()
        self.last_poll_at = 0.0  # time.monotonic() of the last completed poll
        self.last_poll_ended_at = 0.0  # ... of the last poll that ended, failed or not
        self.poll_failing_since: float | None = None
        self.poll_error = ""
        self.records_by_protocol: dict[tuple[str, int], int] = {}  # (layer, protocol)
        self.poll_buckets = [0] * len(POLL_BUCKETS)  # polls at or under each bound
        self.poll_seconds_sum = 0.0
        self._poll_records = 0  # conntrack records of the poll in progress

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
            task = asyncio.create_task(self.reload())
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
            self._metrics_server = await serve(self, self.config.metrics.host,
                                               self.config.metrics.port)
        if self.pods is not None:
            self.pods.start()  # loads in its own thread, reconnects by itself
        if self.export_state is not None:
            await asyncio.to_thread(self.export_state.load)
            self._restore_deny()
        self.exporters.start()
        poll_task = self.supervisor.spawn("poll", self._poll_loop)
        background = []
        if self.deny is not None:
            background.append(self.supervisor.spawn("deny-path", self.deny.run))
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
            # A last poll: the final records carry what moved since the one before.
            await self.poll_once(saving=False)
            now = time.time()
            self.store.hand_over = None  # on this thread: nothing to hand over
            continued = self.export_state is not None
            final = self.store.flush(now, continued) + encode_in_batches(
                self.deny_store.flush(now, continued))
            if continued:
                # after the final records are made: what they say counts as told
                await self._save_state(now)
            if self.deny is not None:
                log.info("deny path: %d packet-ins taken, %d of other flows ignored, %d of "
                         "unwanted protocols, %d malformed, %d allowed (logged by Antrea)",
                         self.deny.packet_ins, self.deny.ignored, self.deny.unwanted,
                         self.deny.malformed, self.deny.allowed)
            self.exporters.submit_encoded(final)
            log.info("stopping: %d final records; flushing the export queue",
                     sum(batch.protocols.total() for batch in final))
            await self.exporters.close(SHUTDOWN_FLUSH_SECONDS)
            if self.pods is not None:
                await asyncio.to_thread(self.pods.stop)
            if self._metrics_server is not None:
                self._metrics_server.close()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    async def _serve_metrics(self) -> None:
        if self._metrics_server is None or not self._metrics_server.is_serving():
            self._metrics_server = await serve(self, self.config.metrics.host,
                                               self.config.metrics.port)
        await self._metrics_server.serve_forever()

    async def _poll_loop(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            if self._config_file_changed():
                await self.reload()
            self.exporters.renew_tls()  # TLS files rotated in place (cert-manager, Secrets)
            await self.poll_once()
            wait = self.config.flow_exporter.poll_interval - (time.monotonic() - started)
            try:
                async with asyncio.timeout(max(wait, 0)):
                    await self.stopping.wait()
            except TimeoutError:
                pass

    def _config_file_changed(self) -> bool:
        """Whether the file changed since it was last read: a Kubernetes ConfigMap update
        reaches the pod as a changed file, with no signal."""
        stamp = self._file_stamp()
        if stamp is None:
            return False  # e.g. mid-swap of a ConfigMap's symlink; the next poll looks again
        if self._config_stamp is None:
            self._config_stamp = stamp
        return stamp != self._config_stamp

    def _file_stamp(self) -> int | None:
        try:
            return os.stat(self.config_path).st_mtime_ns if self.config_path else None
        except OSError:
            return None

    def _count_by_protocol(self, layer: str, batches: Iterable[EncodedRecords]) -> int:
        """Counts the records made (rejected or not) per protocol; returns how many."""
        counts, made = self.records_by_protocol, 0
        for batch in batches:
            for protocol, count in batch.protocols.items():
                counts[layer, protocol] = counts.get((layer, protocol), 0) + count
                made += count
        return made

    def _submit_conntrack(self, batch: EncodedRecords) -> None:
        self._poll_records += self._count_by_protocol("conntrack", [batch])
        self.exporters.enqueue(batch)

    async def reload(self) -> bool:
        """SIGHUP, or the file changed: read it again, build everything it needs, and only
        then swap. Protocols and zones change at both layers at once (the poller's filter and
        dump plan, the deny-table flows); timeouts, the poll interval, the collector and its
        TLS settings change too. Any failure changes nothing and is said in one line. While
        stopping, a reload is refused: the final records go where the running configuration
        sends them."""
        if self.config_path is None:
            return False
        if self.stopping.is_set():
            log.warning("reload: refused, the agent is stopping; the final records go to %s",
                        ", ".join(self.exporters.by_collector))
            return False
        async with self._config_lock:
            # this content is read now: a SIGHUP for a changed file is not followed by a
            # second reload of the same file when the poll loop sees the change
            self._config_stamp = self._file_stamp() or self._config_stamp
            try:
                await self._reload(load_config(self.config_path))
                return True
            except ConfigError as err:
                log.error("reload: %s is invalid, keeping the running configuration: %s",
                          self.config_path, _one_line("; ".join(err.problems)))
            except RELOAD_ERRORS as err:
                log.error("reload: %s: %s; keeping the running configuration",
                          self.config_path, _one_line(str(err) or type(err).__name__))
            return False

    async def _reload(self, new: Config) -> None:
        old = self.config
        fe, new_fe = old.flow_exporter, new.flow_exporter
        if new_fe.enable != fe.enable:
            # Stopping would leave a running agent that does nothing; the start (cmd_run)
            # is where `enable` is honoured, so it needs a restart.
            raise ValueError(f"flowExporter.enable: {str(new_fe.enable).lower()} is applied "
                             "at the next restart only")
        transports = self.exporters.prepare(new)  # reads the TLS files
        if (new_fe.protocols, new.conntrack.zones) != (fe.protocols, old.conntrack.zones):
            await self._refilter(new_fe.protocols, new.conntrack.zones)
        # Built and applied: from here on nothing fails.
        self.config = new
        self.reloads += 1
        for warning in new.warnings:
            log.warning("reload: %s", warning)
        for store in (self.store, self.deny_store):
            store.active_timeout, store.idle_timeout = new_fe.active_timeout, new_fe.idle_timeout
        self.enricher.pod_networks = _pod_networks(new.ipfix)
        await self.exporters.apply(new, transports, SHUTDOWN_FLUSH_SECONDS)
        restart_only = [key for key, before, after in [
            ("ovs", old.ovs, new.ovs), ("metrics", old.metrics, new.metrics),
            ("conntrack.source", old.conntrack.source, new.conntrack.source),
            ("conntrack.maxConnections", old.conntrack.max_connections,
             new.conntrack.max_connections),
            ("ipfix.nodeName", old.ipfix.node_name, new.ipfix.node_name),
            ("ipfix.observationDomainId", old.ipfix.observation_domain_id,
             new.ipfix.observation_domain_id)] if before != after]
        if restart_only:
            log.warning("reload: changes to %s take effect at the next restart",
                        ", ".join(restart_only))

    async def _refilter(self, protocols: ProtocolSet, zones: frozenset[int]) -> None:
        """The new protocols and zones at both layers; on a failure, the old ones again."""
        previous = self.filter.protocols, self.filter.zones
        self.filter.protocols, self.filter.zones = protocols, zones
        try:
            if self.source is not None:
                self.source.replan()
            if self.deny is not None:
                await self.deny.reconcile()
        except BaseException:
            self.filter.protocols, self.filter.zones = previous
            if self.source is not None:
                self.source.replan()
            raise
        # Connections the filter now leaves out go on: they are not reported as ended, only
        # no longer followed (the poll lock is held: no poll is using the store).
        forgotten = self.store.forget(
            lambda keys: self.filter.accepts_columns(keys["zone"], keys["protocol"]))
        if forgotten:
            log.info("reload: %d tracked connections no longer followed (filtered out)",
                     forgotten)
        log.info("reload: exporting protocols %s from zones %s", protocols.describe(),
                 sorted(zones) or "all")

    async def poll_once(self, saving: bool = True) -> None:
        try:
            await self._poll(saving)
        finally:
            self.last_poll_ended_at = time.monotonic()  # /livez: the poll loop turns

    async def _poll(self, saving: bool) -> None:
        started = time.perf_counter()
        now = time.time()
        self._poll_records = 0
        # The deny path's records are due whatever the conntrack poll does.
        deny_batches = encode_in_batches(self.deny_store.expired(now))
        deny_records = self._count_by_protocol("deny", deny_batches)
        self.exporters.submit_encoded(deny_batches)  # drops, if it must, for the whole poll
        try:
            async with self._config_lock:
                if self.source is None:
                    self.source = await asyncio.to_thread(open_source, self.config, self.filter)
                if self._restoring:
                    await asyncio.to_thread(self._restore_connections, self.source)
                records = await self.source.update(self.store, now)
                if saving and self.export_state is not None and self.export_state.due():
                    await self._save_state(now)
        except (OSError, RuntimeError, ValueError) as err:
            # The table is unknown this time: nothing is taken for gone (that would end every
            # connection). Try again at the next interval.
            self._poll_failed(str(err) or type(err).__name__)
            return
        self.poll_failing_since, self.poll_error = None, ""
        for batch in records:  # none: they were handed over as they were made
            self._submit_conntrack(batch)
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
                  self._poll_records, deny_records, self.last_poll_seconds)
        await self.exporters.wait_for_room()  # backpressure: the next poll waits for it

    def _restore_deny(self) -> None:
        assert self.export_state is not None
        section = self.export_state.take("deny", _deny_source_name(self.config))
        if section is not None:
            for keys, rows in section.parts:
                self.deny_store.restore(keys, rows)

    def _restore_connections(self, source) -> None:
        """In the poll's worker thread, once the source is open: its kind says whose
        connections the state may continue."""
        assert self.export_state is not None
        section = self.export_state.take("conntrack", source.state_name)
        if section is not None:
            parts = section.parts
            while parts:  # each part freed once restored: never the whole table beside the store
                self.store.restore(*parts.pop(0), section.written_at)
        self._restoring = False

    async def _save_state(self, now: float) -> None:
        """The deny entries are read here, on the loop that adds to them; the connections
        and the write in the poll's worker thread, which alone changes the store."""
        assert self.export_state is not None
        deny = Section(_deny_source_name(self.config), *self.deny_store.snapshot())
        source = self.source

        def save() -> None:
            sections = {"deny": deny}
            if source is not None and not self._restoring:
                sections["conntrack"] = self.store.snapshot(source.state_name)
            elif (carried := self.export_state.untaken("conntrack")) is not None:
                sections["conntrack"] = carried
            self.export_state.save(sections, now)
        await asyncio.to_thread(save)

    def _poll_failed(self, error: str) -> None:
        self.poll_errors += 1
        if self.poll_failing_since is None:
            self.poll_failing_since = time.monotonic()
        # Once per distinct error: a source that stays broken is shown by /healthz and
        # ovsflow_poll_errors_total, not by a line every interval.
        (log.debug if error == self.poll_error else log.error)(
            "conntrack poll failed: %s", error)
        self.poll_error = error

    def health_grace(self) -> float:
        return max(HEALTH_POLLS * self.config.flow_exporter.poll_interval, HEALTH_MIN_SECONDS)

    def problems(self) -> dict[str, str]:
        """Layer -> why it has been unable to do its job for longer than `health_grace`."""
        grace, now = self.health_grace(), time.monotonic()
        problems = {}
        if self.poll_failing_since is not None and now - self.poll_failing_since > grace:
            problems["poll"] = (f"conntrack polls failing for "
                                f"{now - self.poll_failing_since:.0f}s: {self.poll_error}")
        elif now - (self.last_poll_at or self.started_at) > grace:
            problems["poll"] = (f"no conntrack poll completed for "
                                f"{now - (self.last_poll_at or self.started_at):.0f}s")
            if self.exporters.queued > IN_FLIGHT:
                problems["poll"] += (f" (held back: {self.exporters.queued} records wait for "
                                     "a collector)")
        for collector, problem in self.exporters.problems(grace).items():
            problems[f"exporter {collector}"] = problem
        deny = self.deny.problem() if self.deny is not None else None
        if deny is not None and now - deny[0] > grace:
            problems["deny"] = f"flows not in place for {now - deny[0]:.0f}s: {deny[1]}"
        for task, (since, failures, error) in self.supervisor.problems().items():
            if failures > 1 and now - since > grace:
                problems[f"task {task}"] = (f"failed {failures} times in a row, restarting "
                                            f"with backoff: {error}")
        return problems
