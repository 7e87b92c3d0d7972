"""The OpenFlow session with the bridge: install the deny-table flows, receive packet-ins.

It connects to the bridge's service socket `<runDir>/<bridge>.mgmt`, never changing the
bridge's controllers (a controller change flushes every flow), and reinstalls its flows on
every new connection. Every failure — no socket, a refused meter or flow, a barrier that
times out, a lost connection — ends the session and the next one starts after a backoff,
so a switch that keeps refusing is asked again at a slow pace, never in a tight loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time

from openflow import messages as m
from openflow.connection import ConnectionClosed, OpenFlowConnection

from ..filter import ConnectionFilter
from .packet import PacketError, parse_packet
from .rules import (
    COOKIE, CONTROLLER_ID, PACKET_IN_BYTES, DenyFlow, delete_all, deny_flows, meter_mod,
)
from .store import DenyStore

log = logging.getLogger(__name__)

METER_EXISTS = (12, 1)  # OFPET_METER_MOD_FAILED / OFPMMFC_METER_EXISTS
SESSION_ERRORS = (OSError, ConnectionError, m.OpenFlowError, TimeoutError)


class Backoff:
    """Delays between attempts: exponential from `initial`, capped at `cap`, each drawn
    between half and all of its step (jitter, so that many agents do not retry in step).
    A session that stayed healthy for `reset_after` seconds starts again from `initial`."""

    def __init__(self, initial: float, cap: float, reset_after: float,
                 rng: random.Random | None = None):
        self.initial, self.cap, self.reset_after = initial, cap, reset_after
        self.failures = 0  # since the last healthy session
        self._rng = rng or random.Random()

    def next_delay(self, healthy_for: float) -> float:
        """The wait before the next attempt; `healthy_for`: how long the session that just
        ended had its flows in place (0 if it never got there)."""
        if healthy_for >= self.reset_after:
            self.failures = 0
        step = min(self.cap, self.initial * 2 ** min(self.failures, 32))
        self.failures += 1
        return step * self._rng.uniform(0.5, 1.0)


class DenySource:
    def __init__(self, run_dir: str, bridge: str, table: int, meter_id: int, rate: int,
                 connection_filter: ConnectionFilter, store: DenyStore,
                 max_backoff: float = 10.0, initial_backoff: float = 0.2,
                 reset_backoff_after: float = 30.0):
        self.socket_path = os.path.join(run_dir, f"{bridge}.mgmt")
        self.table, self.meter_id, self.rate = table, meter_id, rate
        self.filter, self.store = connection_filter, store
        self.backoff = Backoff(initial_backoff, max_backoff, reset_backoff_after)
        self.connection: OpenFlowConnection | None = None
        self.installed: frozenset[DenyFlow] = frozenset()
        self.installed_event = asyncio.Event()  # set while our flows are in place
        self.packet_ins = 0
        self.ignored = 0  # not our cookie or table
        self.unwanted = 0  # a protocol the filter rejects: the flows should not allow this
        self.malformed = 0
        self.connections = 0
        self.attempts = 0  # sessions started (each a connect, then an install)
        self.meter_drops = 0  # packet-ins the meter dropped, as the switch last reported
        # None until a switch answered; False: it refused the meter, the flows go without.
        self.meter_supported: bool | None = None
        # Health, on the monotonic clock: /healthz reads these through `problem()`.
        self.connected_since: float | None = None  # flows in place on this session since
        self.failing_since: float | None = time.monotonic()  # not in place since
        self.last_error = ""
        self._abandoned: BaseException | None = None  # why reconcile() closed the session

    @property
    def healthy(self) -> bool:
        return self.connected_since is not None

    def problem(self) -> tuple[float, str] | None:
        """(monotonic time since which the flows are not in place, why), or None."""
        if self.failing_since is None:
            return None
        return self.failing_since, self.last_error or f"connecting to {self.socket_path}"

    async def run(self) -> None:
        """Until cancelled: connect, install, take packet-ins; again after a backoff."""
        while True:
            self.attempts += 1
            self._abandoned = None
            try:
                await self._session()
            except SESSION_ERRORS as err:
                stage = "cannot connect to" if self.connection is None else "session with"
                self.last_error = f"{stage} {self.socket_path}: {str(err) or type(err).__name__}"
            finally:
                healthy_for = await self._end_session()
            delay = self.backoff.next_delay(healthy_for)
            log.warning("deny path: %s; next attempt in %.1fs", self.last_error, delay)
            await asyncio.sleep(delay)

    async def _end_session(self) -> float:
        """Close the connection (however the session ended); how long the flows were in
        place, 0 if they never were."""
        now = time.monotonic()
        healthy_for = now - self.connected_since if self.connected_since else 0.0
        self.connected_since = None
        self.failing_since = self.failing_since or now
        self.installed_event.clear()
        self.installed = frozenset()
        if self.connection is not None:
            connection, self.connection = self.connection, None
            await connection.close()
        return healthy_for

    async def _session(self) -> None:
        self.connection = await OpenFlowConnection.open_unix(self.socket_path)
        self.connections += 1
        await self._install()
        self.connected_since, self.failing_since = time.monotonic(), None
        log.info("deny path: flows installed in table %d of %s for protocols %s%s",
                 self.table, self.socket_path, self.filter.protocols.describe(),
                 "" if self.meter_supported else " (no meter: packet-ins not rate-limited)")
        while (message := await self.connection.events.get()) is not None:
            if isinstance(message, m.PacketIn):
                self._packet_in(message)
        raise self._abandoned or ConnectionClosed("the switch closed the connection")

    async def _install(self) -> None:
        connection = self.connection
        assert connection is not None
        await connection.transact([
            lambda xid: m.set_controller_id(xid, CONTROLLER_ID),
            lambda xid: m.set_config(xid, miss_send_len=PACKET_IN_BYTES)])
        await self._install_meter(connection)
        meter_id = self.meter_id if self.meter_supported else None
        flows = deny_flows(self.filter.protocols)
        await connection.transact(
            [lambda xid: delete_all(xid, self.table)]
            + [lambda xid, f=f: f.add(xid, self.table, meter_id) for f in flows])
        self.installed = flows
        self.installed_event.set()

    async def _install_meter(self, connection: OpenFlowConnection) -> None:
        """Add (or update) our meter. A switch that refuses it (no meter support in its
        datapath, no meters left) gets the flows without one: denied packets are still
        exported, only not rate-limited. Said once in the log, always in `meter_supported`."""
        try:
            try:
                await connection.transact([
                    lambda xid: meter_mod(xid, m.OFPMC_ADD, self.meter_id, self.rate)])
            except m.OpenFlowError as err:
                if (err.type, err.code) != METER_EXISTS:
                    raise
                await connection.transact([
                    lambda xid: meter_mod(xid, m.OFPMC_MODIFY, self.meter_id, self.rate)])
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
        try:
            await connection.transact(
                [lambda xid, f=f: f.add(xid, self.table, meter_id)
                 for f in wanted - self.installed]
                + [lambda xid, f=f: f.delete(xid, self.table) for f in self.installed - wanted])
        except SESSION_ERRORS as err:
            self._abandoned = err  # the session ends with this error
            await connection.close()  # its reader sees the end of the events
            raise
        self.installed = wanted
        log.info("deny path: flows reconciled for protocols %s",
                 self.filter.protocols.describe())

    async def refresh_meter_stats(self) -> None:
        """Ask the switch how many packet-ins the meter dropped (shown as a metric)."""
        connection = self.connection
        if (connection is None or connection.closed or not self.installed_event.is_set()
                or not self.meter_supported):
            return
        try:
            reply = await connection.request(
                lambda xid: m.meter_stats_request(xid, self.meter_id), timeout=2.0)
        except SESSION_ERRORS as err:
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
