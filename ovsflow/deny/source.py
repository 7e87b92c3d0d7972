"""The OpenFlow session with the bridge: install the deny-table flows, receive packet-ins.

It connects to the bridge's service socket `<runDir>/<bridge>.mgmt`, never changing the
bridge's controllers (a controller change flushes every flow), reconnects with backoff when
ovs-vswitchd goes away, and reinstalls its flows on every new connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from openflow import messages as m
from openflow.connection import ConnectionClosed, OpenFlowConnection
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from ..filter import ConnectionFilter
from .packet import PacketError, parse_packet
from .rules import (
    COOKIE, CONTROLLER_ID, PACKET_IN_BYTES, DenyFlow, delete_all, deny_flows, meter_mod,
)
from .store import DenyStore

log = logging.getLogger(__name__)

METER_EXISTS = (12, 1)  # OFPET_METER_MOD_FAILED / OFPMMFC_METER_EXISTS


class DenySource:
    def __init__(self, run_dir: str, bridge: str, table: int, meter_id: int, rate: int,
                 connection_filter: ConnectionFilter, store: DenyStore,
                 max_backoff: float = 10.0):
        self.socket_path = os.path.join(run_dir, f"{bridge}.mgmt")
        self.table, self.meter_id, self.rate = table, meter_id, rate
        self.filter, self.store = connection_filter, store
        self.max_backoff = max_backoff
        self.connection: OpenFlowConnection | None = None
        self.installed: frozenset[DenyFlow] = frozenset()
        self.installed_event = asyncio.Event()  # set while our flows are in place
        self.packet_ins = 0
        self.ignored = 0  # not our cookie or table
        self.unwanted = 0  # a protocol the filter rejects: the flows should not allow this
        self.malformed = 0
        self.connections = 0
        self.meter_drops = 0  # packet-ins the meter dropped, as the switch last reported

    async def run(self) -> None:
        """Until cancelled: connect, install, take packet-ins; again after any loss."""
        while True:
            try:
                await self._session()
            except (OSError, ConnectionError, m.OpenFlowError, TimeoutError) as err:
                log.warning("deny path: OpenFlow session with %s ended: %s",
                            self.socket_path, err)
            self.installed_event.clear()
            self.installed = frozenset()
            if self.connection is not None:
                await self.connection.close()
                self.connection = None

    async def _session(self) -> None:
        async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(OSError),
                wait=wait_exponential(multiplier=0.2, max=self.max_backoff) + wait_random(0, 0.2),
                before_sleep=lambda state: log.warning(
                    "deny path: cannot connect to %s (%s); retrying", self.socket_path,
                    state.outcome.exception())):
            with attempt:
                self.connection = await OpenFlowConnection.open_unix(self.socket_path)
        self.connections += 1
        await self._install()
        log.info("deny path: flows installed in table %d of %s for protocols %s",
                 self.table, self.socket_path, self.filter.protocols.describe())
        while (message := await self.connection.events.get()) is not None:
            if isinstance(message, m.PacketIn):
                self._packet_in(message)
        raise ConnectionClosed("the switch closed the connection")

    async def _install(self) -> None:
        connection = self.connection
        assert connection is not None
        await connection.transact([
            lambda xid: m.set_controller_id(xid, CONTROLLER_ID),
            lambda xid: m.set_config(xid, miss_send_len=PACKET_IN_BYTES)])
        try:
            await connection.transact([
                lambda xid: meter_mod(xid, m.OFPMC_ADD, self.meter_id, self.rate)])
        except m.OpenFlowError as err:
            if (err.type, err.code) != METER_EXISTS:
                raise
            await connection.transact([
                lambda xid: meter_mod(xid, m.OFPMC_MODIFY, self.meter_id, self.rate)])
        flows = deny_flows(self.filter.protocols)
        await connection.transact(
            [lambda xid: delete_all(xid, self.table)]
            + [lambda xid, f=f: f.add(xid, self.table, self.meter_id) for f in flows])
        self.installed = flows
        self.installed_event.set()

    async def reconcile(self) -> None:
        """Bring the flows in line with the filter's protocols (after a reload): add the new
        ones first, then delete the ones no longer wanted."""
        connection = self.connection
        if connection is None or connection.closed or not self.installed_event.is_set():
            return  # the next session installs the current set
        wanted = deny_flows(self.filter.protocols)
        await connection.transact(
            [lambda xid, f=f: f.add(xid, self.table, self.meter_id)
             for f in wanted - self.installed]
            + [lambda xid, f=f: f.delete(xid, self.table) for f in self.installed - wanted])
        self.installed = wanted
        log.info("deny path: flows reconciled for protocols %s",
                 self.filter.protocols.describe())

    async def refresh_meter_stats(self) -> None:
        """Ask the switch how many packet-ins the meter dropped (shown as a metric)."""
        connection = self.connection
        if connection is None or connection.closed or not self.installed_event.is_set():
            return
        try:
            reply = await connection.request(
                lambda xid: m.meter_stats_request(xid, self.meter_id), timeout=2.0)
        except (OSError, ConnectionError, m.OpenFlowError, TimeoutError) as err:
            log.debug("deny path: meter stats unavailable: %s", err)
            return
        if isinstance(reply, m.MeterStats) and self.meter_id in reply.meters:
            self.meter_drops = reply.meters[self.meter_id]["packets_dropped"]

    def _packet_in(self, message: m.PacketIn) -> None:
        if message.cookie != COOKIE or message.table_id != self.table:
            self.ignored += 1
            return
        self.packet_ins += 1
        try:
            packet = parse_packet(message.data)
        except PacketError as err:
            self.malformed += 1
            log.debug("deny path: packet-in not understood: %s", err)
            return
        if not self.filter.accepts_protocol(packet.protocol):
            self.unwanted += 1
            return
        reg3 = message.field("reg3")
        self.store.add(packet, reg3.int() if reg3 is not None else 0, time.time())
