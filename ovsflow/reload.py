"""A configuration reloaded while the agent runs: on SIGHUP, or when the file changed (a
Kubernetes ConfigMap update reaches the pod as a changed file, with no signal).

A reload is built completely before anything is swapped, and two never run at once: the
new collectors' transports first (reading TLS files can fail), then the new protocols and
zones at both layers (the poller's filter and dump plan, the deny-table flows; a switch
that refuses them puts the old ones back). Only then does the running configuration
change: timeouts, poll interval, Pod networks, collectors. Any failure changes nothing and
is said in one log line; keys that need a restart are named in one warning.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable

from openflow.messages import OpenFlowError

from .config import Config, ConfigError, load_config
from .deny.session import BridgeSession
from .deny.store import DenyStore
from .enrich import Enricher, configured_pod_networks
from .exporter import Exporters
from .filter import ConnectionFilter
from .health import Health
from .protocols import ProtocolSet
from .store import ConnectionStore

log = logging.getLogger(__name__)

# What building a reloaded configuration can raise besides ConfigError: unreadable TLS files
# (ssl.SSLError is an OSError), values the parts refuse, a switch refusing the new flows.
RELOAD_ERRORS = (OSError, ssl.SSLError, TypeError, ValueError, OpenFlowError)


def _one_line(text: str) -> str:
    """YAML errors span lines (with a caret under the column); a log line does not."""
    return " ".join(text.split())


class Reloader:
    """Holds the running configuration, and changes it and the parts that follow it."""

    def __init__(self, config: Config, path: str | None, *, lock: asyncio.Lock,
                 stopping: asyncio.Event, connection_filter: ConnectionFilter,
                 source: Callable[[], object], deny: BridgeSession | None,
                 store: ConnectionStore, deny_store: DenyStore, enricher: Enricher,
                 exporters: Exporters, health: Health, close_timeout: float):
        self.config = config
        self.path = path
        self.reloads = 0
        self._lock = lock  # held by a reload and by a poll's dump
        self._stopping = stopping
        self._filter = connection_filter
        self._source = source  # the conntrack source, once a poll has opened it
        self._deny = deny
        self._store, self._deny_store = store, deny_store
        # the heartbeat reaches the store from here, at start as at each reload
        store.heartbeat = config.flow_exporter.heartbeat_timeout
        self._enricher = enricher
        self._exporters = exporters
        self._health = health
        self._close_timeout = close_timeout  # for a removed collector's queue
        self._stamp: int | None = None

    def file_changed(self) -> bool:
        """Whether the file changed since it was last read."""
        stamp = self._file_stamp()
        if stamp is None:
            return False  # e.g. mid-swap of a ConfigMap's symlink; the next poll looks again
        if self._stamp is None:
            self._stamp = stamp
        return stamp != self._stamp

    def _file_stamp(self) -> int | None:
        try:
            return os.stat(self.path).st_mtime_ns if self.path else None
        except OSError:
            return None

    async def reload(self) -> bool:
        """Read the file again, build everything it needs, and only then swap. While
        stopping, a reload is refused: the final records go where the running configuration
        sends them."""
        if self.path is None:
            return False
        if self._stopping.is_set():
            log.warning("reload: refused, the agent is stopping; the final records go to %s",
                        ", ".join(self._exporters.by_collector))
            return False
        async with self._lock:
            # this content is read now: a SIGHUP for a changed file is not followed by a
            # second reload of the same file when the poll loop sees the change
            self._stamp = self._file_stamp() or self._stamp
            try:
                await self.apply(load_config(self.path))
                return True
            except ConfigError as err:
                log.error("reload: %s is invalid, keeping the running configuration: %s",
                          self.path, _one_line("; ".join(err.problems)))
            except RELOAD_ERRORS as err:
                log.error("reload: %s: %s; keeping the running configuration",
                          self.path, _one_line(str(err) or type(err).__name__))
            return False

    async def apply(self, new: Config) -> None:
        """Run with `new` (see the module's docstring); raises, having changed nothing,
        when a part of it cannot be built."""
        old = self.config
        fe, new_fe = old.flow_exporter, new.flow_exporter
        if new_fe.enable != fe.enable:
            # Stopping would leave a running agent that does nothing; the start (cmd_run)
            # is where `enable` is honoured, so it needs a restart.
            raise ValueError(f"flowExporter.enable: {str(new_fe.enable).lower()} is applied "
                             "at the next restart only")
        transports = self._exporters.prepare(new)  # reads the TLS files
        if (new_fe.protocols, new.conntrack.zones) != (fe.protocols, old.conntrack.zones):
            await self._refilter(new_fe.protocols, new.conntrack.zones)
        # Built and applied: from here on nothing fails.
        self.config = new
        self.reloads += 1
        for warning in new.warnings:
            log.warning("reload: %s", warning)
        for store in (self._store, self._deny_store):
            store.active_timeout, store.idle_timeout = new_fe.active_timeout, new_fe.idle_timeout
        self._store.heartbeat = new_fe.heartbeat_timeout
        self._health.poll_interval = new_fe.poll_interval
        self._enricher.pod_networks = configured_pod_networks(new.ipfix)
        await self._exporters.apply(new, transports, self._close_timeout)
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
        connection_filter, source = self._filter, self._source()
        previous = connection_filter.protocols, connection_filter.zones
        connection_filter.protocols, connection_filter.zones = protocols, zones
        try:
            if source is not None:
                source.replan()
            if self._deny is not None:
                await self._deny.reconcile()
        except BaseException:
            connection_filter.protocols, connection_filter.zones = previous
            if source is not None:
                source.replan()
            raise
        # Connections the filter now leaves out go on: they are not reported as ended, only
        # no longer followed; those it takes again continue from their last records (the
        # poll lock is held: no poll is using the store). See store/forgotten.py.
        forgotten = self._store.forget()
        if forgotten:
            log.info("reload: %d tracked connections no longer followed (filtered out); "
                     "they continue from their last records if the filter takes them "
                     "again", forgotten)
        log.info("reload: exporting protocols %s from zones %s", protocols.describe(),
                 sorted(zones) or "all")
