"""What both deny sources share: one OpenFlow session at a time with the bridge's service
socket `<runDir>/<bridge>.mgmt` (never a change of the bridge's controllers: that flushes
every flow), a periodic check beside the packet-ins, the counters, and health. The switch's
counters are read too: the denying flows' after each check (what the datapath denied,
exactly: `totals`), the packet-in meter's at each poll, just before the deny records due
are made (its drops, and the share of packets it let through since each record's previous
one, which the record carries: `sampling`).

Every failure — no socket, a refused request, a reply that times out, a lost connection —
ends the session and the next one starts after a backoff, so a switch that keeps refusing
is asked again at a slow pace, never in a tight loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter

from openflow import messages as m
from openflow.connection import ConnectionClosed, OpenFlowConnection

from ..filter import ConnectionFilter
from .counters import Lifetimes
from .packet import DeniedPacket, PacketError, parse_packet
from .sampling import MeterHistory
from .store import DenyStore
from .totals import DenyTotals

log = logging.getLogger(__name__)

SESSION_ERRORS = (OSError, ConnectionError, m.OpenFlowError, TimeoutError)


def entry_age(entry: m.FlowEntry) -> float | None:
    """A flow's age in seconds, as the switch says it (None: it did not)."""
    if entry.duration_sec is None:
        return None
    return entry.duration_sec + (entry.duration_nsec or 0) / 1e9


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
        ended was healthy (0 if it never got there)."""
        if healthy_for >= self.reset_after:
            self.failures = 0
        step = min(self.cap, self.initial * 2 ** min(self.failures, 32))
        self.failures += 1
        return step * self._rng.uniform(0.5, 1.0)


class BridgeSession:
    """A subclass opens the session in `_session` (connect, set up, then `_receive`), takes
    packet-ins in `_packet_in`, and sets `connected_since`/`failing_since` as its own work
    is done or not."""

    check_interval = 1.0  # seconds between `_check` calls while a session runs

    def __init__(self, run_dir: str, bridge: str, connection_filter: ConnectionFilter,
                 store: DenyStore, max_backoff: float = 10.0, initial_backoff: float = 0.2,
                 reset_backoff_after: float = 30.0):
        self.socket_path = os.path.join(run_dir, f"{bridge}.mgmt")
        self.filter, self.store = connection_filter, store
        self.backoff = Backoff(initial_backoff, max_backoff, reset_backoff_after)
        self.connection: OpenFlowConnection | None = None
        self.packet_ins = 0  # taken: denied packets of the bridge's policy
        self.ignored = 0  # not ours to take (another cookie, table or packet-in category)
        self.allowed = 0  # packet-ins of packets the policy allowed (Antrea logs them)
        self.unwanted = 0  # a protocol the filter rejects
        self.unwanted_by_protocol: Counter[int] = Counter()
        self.malformed = 0
        self.connections = 0
        self.attempts = 0  # sessions started
        self.meter_drops = 0  # packet-ins the meter dropped, across the meter's lifetimes
        self.meter_packets = 0  # packets that reached it, likewise
        self._meter = Lifetimes()
        self._meter_age = 0  # seconds, at the last reading
        self.meter_history = MeterHistory()
        store.sampling = self.meter_history.probability  # the deny records' ratio
        self.totals = DenyTotals(store)  # what the denying flows counted
        self.session_started = 0.0  # wall clock: when the current session began
        # None until a switch answered (or no meter of ours); False: it refused the meter
        self.meter_supported: bool | None = None
        # Health, on the monotonic clock: /healthz reads these through `problem()`.
        self.connected_since: float | None = None  # doing its job on this session since
        self.failing_since: float | None = time.monotonic()  # not doing it since
        self.last_error = ""
        self._abandoned: BaseException | None = None  # why a check closed the session

    @property
    def healthy(self) -> bool:
        return self.connected_since is not None

    @property
    def stats_meter_id(self) -> int | None:
        """The meter whose drops `refresh_meter_stats` reads; None: none."""
        return None

    def problem(self) -> tuple[float, str] | None:
        """(monotonic time since which the layer cannot do its job, why), or None."""
        if self.failing_since is None:
            return None
        return self.failing_since, self.last_error or f"connecting to {self.socket_path}"

    async def run(self) -> None:
        """Until cancelled: a session; another after a backoff."""
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

    async def _session(self) -> None:
        raise NotImplementedError

    def _packet_in(self, message: m.PacketIn) -> None:
        raise NotImplementedError

    async def _check(self, connection: OpenFlowConnection) -> None:
        """Called every `check_interval` while the session runs; an error ends it."""

    async def _read_totals(self, connection: OpenFlowConnection) -> None:
        """After each check: the denying flows' counters into `totals` (where the check has
        not read them already); an error ends the session."""

    async def _end_session(self) -> float:
        """Close the connection (however the session ended); how long it was healthy, 0 if
        it never was."""
        now = time.monotonic()
        healthy_for = now - self.connected_since if self.connected_since else 0.0
        self.connected_since = None
        self.failing_since = self.failing_since or now
        if self.connection is not None:
            connection, self.connection = self.connection, None
            await connection.close()
        return healthy_for

    async def _open(self) -> OpenFlowConnection:
        self.connection = await OpenFlowConnection.open_unix(self.socket_path)
        self.connections += 1
        self.session_started = time.time()
        return self.connection

    async def _receive(self, connection: OpenFlowConnection) -> None:
        """Packet-ins until the session ends, with `_check` every `check_interval`."""
        watch = asyncio.create_task(self._watch(connection))
        try:
            while (message := await connection.events.get()) is not None:
                if isinstance(message, m.PacketIn):
                    self._packet_in(message)
        finally:
            watch.cancel()
            try:
                await watch
            except asyncio.CancelledError:
                # the watch's own end; a cancellation of this task (the agent stopping)
                # must go on, or the deny path would start another session
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        raise self._abandoned or ConnectionClosed("the switch closed the connection")

    async def _watch(self, connection: OpenFlowConnection) -> None:
        try:
            while True:
                await asyncio.sleep(self.check_interval)
                await self._check(connection)
                await self._read_totals(connection)
        except SESSION_ERRORS as err:
            self._abandoned = err  # the session ends with this error
            await connection.close()  # `_receive` sees the end of the events

    def _denied_packet(self, message: m.PacketIn) -> DeniedPacket | None:
        """The packet of a packet-in taken for the deny store, if it is one to keep: one
        understood (else counted as malformed) of a protocol the filter accepts, here in
        userspace (else counted by protocol)."""
        self.packet_ins += 1
        try:
            packet = parse_packet(message.data)
        except PacketError as err:
            self.malformed += 1
            log.debug("deny path: packet-in not understood: %s", err)
            return None
        if not self.filter.accepts_packet(packet.protocol, packet.destination_port):
            self.unwanted += 1
            self.unwanted_by_protocol[packet.protocol] += 1
            return None
        return packet

    async def reconcile(self) -> None:
        """Follow the filter's protocols after a reload (nothing to do where the filter is
        read for every packet-in)."""

    async def refresh_meter_stats(self) -> None:
        """Ask the switch what the meter let through and dropped (at each poll). A
        meter deleted and added again (Antrea deletes every meter at each connect) or a
        restarted switch counts from 0 again: seen as a count or an age that went back,
        what the earlier meter had counted is kept (less what it counted since the last
        read)."""
        connection, meter_id = self.connection, self.stats_meter_id
        if connection is None or connection.closed or not self.healthy or meter_id is None:
            return
        v = connection.version
        try:
            reply = await connection.request(
                lambda xid: m.meter_stats_request(xid, meter_id, version=v), timeout=2.0)
        except SESSION_ERRORS as err:
            log.debug("deny path: meter stats unavailable: %s", err)
            return
        if isinstance(reply, m.MeterStats) and meter_id in reply.meters:
            stat = reply.meters[meter_id]
            self.meter_packets, self.meter_drops = self._meter.observe(
                (stat.packet_in_count, stat.packets_dropped),
                new_life=stat.duration_sec < self._meter_age)
            self._meter_age = stat.duration_sec
            self.meter_history.add(time.time(), self.meter_packets, self.meter_drops)
