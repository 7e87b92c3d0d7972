"""The kernel's conntrack, dumped over ctnetlink with kernel-side zone and protocol filters.

Blocking socket work: the agent runs `poll` in a worker thread so the event loop (and the
exporter) keeps going during a large dump.
"""

from __future__ import annotations

import errno
import gc
import itertools
import logging
import socket
from dataclasses import dataclass

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..filter import ConnectionFilter
from ..connection import Connection
from .ctnetlink import NETLINK_NETFILTER, dump_request, parse_dump

if TYPE_CHECKING:
    from ..record import FlowRecord
    from ..store import ConnectionStore

log = logging.getLogger(__name__)

SYSCTLS = ("/proc/sys/net/netfilter/nf_conntrack_acct",
           "/proc/sys/net/netfilter/nf_conntrack_timestamp")
RECEIVE_SIZE = 1 << 16  # the kernel fills dump buffers up to the largest size we receive
SOCKET_BUFFER = 8 << 20
MAX_FILTERED_DUMPS = 16  # beyond this many table walks, one walk + userspace filtering wins
DUMP_RETRIES = 3
PROBE_ZONE, PROBE_PROTOCOL = 65535, 255  # a zone and protocol (reserved) that hold nothing


class SourceError(RuntimeError):
    """The source cannot work; the text says why and what to do."""


@dataclass(frozen=True)
class Dump:
    family: int  # 0 = IPv4 and IPv6
    zone: int | None
    protocol: int | None


def plan_dumps(connection_filter: ConnectionFilter, protocol_filter: bool) -> list[Dump]:
    """The dumps that fetch what the filter accepts with the least crossing into userspace:
    one per zone (the kernel cannot select zone 0), and when `protocol_filter` (the kernel
    supports CTA_FILTER) one per address family and protocol."""
    zones = sorted(connection_filter.zones)
    zone_choices: list[int | None] = zones if zones and 0 not in zones else [None]
    numbers = connection_filter.protocols.numbers
    if numbers is None or not protocol_filter:
        return [Dump(0, zone, None) for zone in zone_choices]
    pairs = [(family, protocol) for family in (socket.AF_INET, socket.AF_INET6)
             for protocol in sorted(numbers)
             if not (protocol == 1 and family == socket.AF_INET6)
             and not (protocol == 58 and family == socket.AF_INET)]
    if len(pairs) * len(zone_choices) > MAX_FILTERED_DUMPS:
        return [Dump(0, zone, None) for zone in zone_choices]
    return [Dump(family, zone, protocol)
            for zone, (family, protocol) in itertools.product(zone_choices, pairs)]


def enable_accounting() -> None:
    """Byte/packet counters and start times exist only for connections created after these
    are on, so the agent switches them on first."""
    for path in SYSCTLS:
        try:
            with open(path, "w") as sysctl:
                sysctl.write("1")
        except OSError as err:
            name = path.rsplit("/", 1)[1]
            raise SourceError(
                f"cannot enable net.netfilter.{name} ({err.strerror}): records would have no "
                "counters or start times. The agent needs CAP_NET_ADMIN and a writable "
                "/proc/sys/net in the node's network namespace (hostNetwork).") from None


def kernel_supports_protocol_filter() -> bool:
    """Probe CTA_FILTER (Linux >= 5.8): a protocol-filtered dump for a zone and protocol
    that hold nothing. Kernels without it answer EOPNOTSUPP or EINVAL; kernels that ignore
    it silently are caught by the userspace filter, which always runs."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        sock.send(dump_request(1, socket.AF_INET, zone=PROBE_ZONE, protocol=PROBE_PROTOCOL))
        try:
            while not parse_dump(sock.recv(RECEIVE_SIZE), []):
                pass
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.info("the kernel does not filter conntrack dumps by protocol (%s): filtering "
                     "in userspace", err.strerror)
            return False
    return True


class KernelSource:
    counted = True

    def __init__(self, connection_filter: ConnectionFilter, protocol_filter: bool):
        self.filter = connection_filter
        self.protocol_filter = protocol_filter
        self.dump_retries = 0
        self._sequence = itertools.count(1)
        self.replan()

    def replan(self) -> None:
        """Recompute the dumps from the filter (after a reload changed it)."""
        self.dumps = plan_dumps(self.filter, self.protocol_filter)
        log.debug("kernel conntrack: %d dump(s) per poll: %s", len(self.dumps), self.dumps)

    async def update(self, store: ConnectionStore, now: float) -> list[FlowRecord]:
        """One poll into the store, in a worker thread. The store takes the connections as
        they are decoded, receive buffer by receive buffer, so a poll never holds a second
        copy of the table (at 100k connections that copy was ~65 MB)."""
        import asyncio  # here, not at the top: `ovsflow conntrack` dumps without a loop

        return await asyncio.to_thread(store.update, self.connections(), now)

    def dump_all(self) -> list[Connection]:
        return list(self.connections())

    def connections(self) -> Iterator[Connection]:
        """The connections the filter accepts, dump by dump (blocking)."""
        # A dump allocates objects per entry and nothing cyclic; the cyclic collector would
        # run dozens of times over them for nothing (~30% of a 100k poll).
        collecting = gc.isenabled()
        gc.disable()
        try:
            with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                sock.bind((0, 0))
                for dump in self.dumps:
                    for chunk in self._dump(sock, dump):
                        yield from self.filter.apply(chunk)
        finally:
            if collecting:
                gc.enable()

    def _dump(self, sock: socket.socket, dump: Dump) -> Iterator[list[Connection]]:
        """One dump's connections, a list per receive buffer, as they arrive."""
        attempt = 1
        while True:
            sock.send(dump_request(next(self._sequence), dump.family, dump.zone,
                                   dump.protocol))
            try:
                while True:
                    chunk: list[Connection] = []
                    done = parse_dump(sock.recv(RECEIVE_SIZE), chunk)
                    yield chunk
                    if done:
                        return
            except OSError as err:
                # ENOBUFS: the socket overflowed and the dump is incomplete. Start it again;
                # connections already handed on come again, which the store takes as
                # unchanged (a partial table would make the rest look ended).
                if err.errno != errno.ENOBUFS or attempt == DUMP_RETRIES:
                    raise
            self.dump_retries += 1
            attempt += 1
            log.warning("conntrack dump %s overflowed (ENOBUFS); retrying", dump)
            self._drain(sock)

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            while sock.recv(RECEIVE_SIZE):
                pass
        except BlockingIOError:
            pass
        finally:
            sock.setblocking(True)
