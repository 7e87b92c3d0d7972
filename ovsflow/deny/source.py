"""`ovs.denySource: table`: ovsflow's own flows in the deny table, where the pipeline
resubmits denied packets; their packet-ins.

It installs its meter and flows on every new session, and while connected reads them back
every `check_interval` (a flow stats request narrowed to its cookie and table, and a meter
config request: under a millisecond for the switch) and puts them back when someone deleted
or changed them — Antrea deletes every meter at each connect, and OVS then deletes the flows
that use it; an operator may `del-flows`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from openflow import messages as m
from openflow.connection import OpenFlowConnection

from ..filter import ConnectionFilter
from .rules import (
    ALL_COOKIE_BITS, COOKIE, CONTROLLER_ID, METER_FLAGS, PACKET_IN_BYTES, DenyFlow, delete_all,
    deny_flows, installed_flow, meter_bands, meter_mod,
)
from .session import SESSION_ERRORS, BridgeSession, entry_age
from .store import DenyStore

log = logging.getLogger(__name__)

METER_EXISTS = (12, 1)  # OFPET_METER_MOD_FAILED / OFPMMFC_METER_EXISTS
UNKNOWN_METER = (12, 3)  # OFPMMFC_UNKNOWN_METER
# Antrea's meters on br-int: 1-255 Egress QoS, 256-258 its packet-in meters (antrea-io/antrea
# pkg/agent/openflow/packetin.go, PacketInMeterIDNP/TF/DNS). Antrea deletes every meter at
# each connect, and a meter of ours in its range would be replaced by one of Antrea's.
ANTREA_METERS = range(1, 259)


class DenySource(BridgeSession):
    def __init__(self, run_dir: str, bridge: str, table: int, meter_id: int, rate: int,
                 connection_filter: ConnectionFilter, store: DenyStore,
                 max_backoff: float = 10.0, initial_backoff: float = 0.2,
                 reset_backoff_after: float = 30.0, check_interval: float = 1.0):
        super().__init__(run_dir, bridge, connection_filter, store, max_backoff,
                         initial_backoff, reset_backoff_after)
        self.table, self.meter_id, self.rate = table, meter_id, rate
        self.check_interval = check_interval  # seconds between reading our flows back
        self.installed: frozenset[DenyFlow] = frozenset()
        self.installed_event = asyncio.Event()  # set while our flows are in place
        self._flows_lock = asyncio.Lock()  # a check never sees a reconcile half done
        self.restorations = 0  # flows or meter put back after someone deleted or changed them
        if meter_id in ANTREA_METERS:
            log.warning("deny path: meter %d is in Antrea's range (1-255 Egress QoS, 256-258 "
                        "packet-ins): beside Antrea, choose ovs.denyMeterId outside it",
                        meter_id)

    @property
    def stats_meter_id(self) -> int | None:
        return self.meter_id if self.meter_supported else None

    async def _end_session(self) -> float:
        self.installed_event.clear()
        self.installed = frozenset()
        return await super()._end_session()

    async def _session(self) -> None:
        connection = await self._open()
        await self._install()
        self.connected_since, self.failing_since = time.monotonic(), None
        log.info("deny path: flows installed in table %d of %s (OpenFlow %s) for protocols "
                 "%s%s", self.table, self.socket_path, m.VERSION_NAMES[connection.version],
                 self.filter.protocols.describe(),
                 "" if self.meter_supported else " (no meter: packet-ins not rate-limited)")
        await self._receive(connection)

    async def _install(self) -> None:
        connection = self.connection
        assert connection is not None
        v = connection.version
        await connection.transact([
            lambda xid: m.set_controller_id(xid, CONTROLLER_ID, version=v),
            lambda xid: m.set_config(xid, miss_send_len=PACKET_IN_BYTES, version=v)])
        await self._install_meter(connection)
        meter_id = self.meter_id if self.meter_supported else None
        flows = deny_flows(self.filter.protocols)
        await connection.transact(
            [lambda xid: delete_all(xid, self.table, version=v)]
            + [lambda xid, f=f: f.add(xid, self.table, meter_id, version=v) for f in flows])
        self.installed = flows
        self.installed_event.set()

    async def _install_meter(self, connection: OpenFlowConnection) -> None:
        """Add (or update) our meter. A switch that refuses it (no meter support in its
        datapath, no meters left) gets the flows without one: denied packets are still
        exported, only not rate-limited. Said once in the log, always in `meter_supported`."""
        v = connection.version
        try:
            try:
                await connection.transact([
                    lambda xid: meter_mod(xid, m.OFPMC_ADD, self.meter_id, self.rate,
                                          version=v)])
            except m.OpenFlowError as err:
                if (err.type, err.code) != METER_EXISTS:
                    raise
                await connection.transact([
                    lambda xid: meter_mod(xid, m.OFPMC_MODIFY, self.meter_id, self.rate,
                                          version=v)])
        except m.OpenFlowError as err:
            if self.meter_supported is not False:
                log.warning("deny path: the switch refused meter %d (%s); installing the deny "
                            "flows without it, so packet-ins are not rate-limited",
                            self.meter_id, err)
            self.meter_supported = False
            return
        if self.meter_supported is False:
            log.info("deny path: the switch accepts meter %d again; packet-ins are "
                     "rate-limited", self.meter_id)
        self.meter_supported = True

    async def _check(self, connection: OpenFlowConnection) -> None:
        """Count what our flows matched, and put our flows and meter back when they are
        not as installed (their counts start again: the totals know)."""
        async with self._flows_lock:
            v = connection.version
            replies = await connection.request_all(
                lambda xid: m.flow_stats_request(xid, self.table, COOKIE, ALL_COOKIE_BITS,
                                                 version=v), timeout=2.0)
            meter_id = self.meter_id if self.meter_supported else None
            entries = [(installed_flow(entry, meter_id), entry) for reply in replies
                       for entry in reply.flows]
            self._count(entries)
            damage = await self._damage(connection, [flow for flow, _ in entries])
            if not damage:
                return
            self.failing_since, self.last_error = time.monotonic(), damage
            await self._install()
            self.totals.end_lives()
            self.failing_since, self.last_error = None, ""
            self.restorations += 1
        log.warning("deny path: %s; put back in table %d (restoration %d)", damage,
                    self.table, self.restorations)

    def _count(self, entries: list[tuple[DenyFlow | None, m.FlowEntry]]) -> None:
        """Our export flows' counters into the totals: what each let through to the meter,
        before the meter drops any."""
        readings = {}
        for flow, entry in entries:
            key = flow.totals_key() if flow is not None and flow in self.installed else None
            if key is not None:
                readings[flow] = (key, entry.packet_count, entry.byte_count, entry_age(entry))
        self.totals.read(readings, time.time(), self.session_started)

    async def _damage(self, connection: OpenFlowConnection,
                      found: list[DenyFlow | None]) -> str:
        """What is not as installed ("" when all is): flows of our cookie gone, changed or
        added by someone else (`found`: our cookie's flows as `installed_flow` read them);
        our meter gone or changed."""
        v = connection.version
        damage = []
        missing = len(self.installed - set(found))
        if missing:
            damage.append(f"{missing} of our {len(self.installed)} flows gone")
        changed = sum(1 for flow in found if flow not in self.installed)
        if changed:
            damage.append(f"{changed} flows with our cookie changed")
        if self.meter_supported:
            try:
                replies = await connection.request_all(
                    lambda xid: m.meter_config_request(xid, self.meter_id, version=v),
                    timeout=2.0)
                meters = {k: v for reply in replies for k, v in reply.meters.items()}
            except m.OpenFlowError as err:
                if (err.type, err.code) != UNKNOWN_METER:
                    raise
                meters = {}
            meter = meters.get(self.meter_id)
            if meter != (METER_FLAGS, meter_bands(self.rate)):
                damage.append(f"meter {self.meter_id} "
                              + ("gone" if meter is None else f"changed to {meter}"))
        return "; ".join(damage)

    async def reconcile(self) -> None:
        """Bring the flows in line with the filter's protocols (after a reload): add the new
        ones first, then delete the ones no longer wanted. If the switch refuses, the session
        ends and the error goes on to the reload, which puts the previous protocols back:
        the next session installs that set (after the usual backoff)."""
        connection = self.connection
        if connection is None or connection.closed or not self.installed_event.is_set():
            return  # the next session installs the current set
        wanted = deny_flows(self.filter.protocols)
        meter_id = self.meter_id if self.meter_supported else None
        v = connection.version
        async with self._flows_lock:
            try:
                await connection.transact(
                    [lambda xid, f=f: f.add(xid, self.table, meter_id, version=v)
                     for f in wanted - self.installed]
                    + [lambda xid, f=f: f.delete(xid, self.table, version=v)
                       for f in self.installed - wanted])
            except SESSION_ERRORS as err:
                self._abandoned = err  # the session ends with this error
                await connection.close()  # its reader sees the end of the events
                raise
            self.installed = wanted
        log.info("deny path: flows reconciled for protocols %s",
                 self.filter.protocols.describe())

    def _packet_in(self, message: m.PacketIn) -> None:
        if message.cookie != COOKIE or message.table_id != self.table:
            self.ignored += 1
            return
        packet = self._denied_packet(message)
        if packet is None:
            return
        self.store.add(packet, message.register(3), time.time())
