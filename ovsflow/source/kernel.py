"""The kernel's conntrack, dumped over ctnetlink with the kernel-side zone and protocol
filters that this kernel is found to apply (`probe_filters`).

Blocking socket work: the agent runs `poll` in a worker thread so the event loop (and the
exporter) keeps going during a large dump.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import json
import logging
import os
import socket
from dataclasses import dataclass
from functools import partial

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..filter import ConnectionFilter
from ..connection import Connection
from ..host import network_namespace
from ..protocols import PORT_PROTOCOLS, ProtocolSet, protocol_name
from .ctnetlink import (
    NETLINK_NETFILTER, count_dump, delete_request, dump_request, new_request, parse_dump,
)

if TYPE_CHECKING:
    from ..polled import Polled
    from ..record import EncodedRecords
    from ..store import ConnectionStore

log = logging.getLogger(__name__)

SYSCTLS = ("/proc/sys/net/netfilter/nf_conntrack_acct",
           "/proc/sys/net/netfilter/nf_conntrack_timestamp")
RECEIVE_SIZE = 1 << 16  # the kernel fills dump buffers up to the largest size we receive
SOCKET_BUFFER = 8 << 20
# Receive buffers decoded at once into columns (~4k IPv4 entries): numpy's cost per call is
# shared by thousands of entries, and a poll holds a run's bytes, not the table's.
DECODE_RUN = 1 << 20
MAX_FILTERED_DUMPS = 16  # beyond this many table walks, one walk + userspace filtering wins
# The kernel filters a dump by one destination port: a protocol's ports dumped one by one
# cost a walk of the whole table each (~0.17 ms per 1000 entries), where one dump of the
# protocol costs one walk and each of its entries crossing into userspace (~2.2 ms per 1000,
# decoded and filtered there). bench/bench_ports.py, 100k entries, N TCP ports a dump each
# against one TCP dump, CPU: with 90% of the table TCP, 3 ports 0.50x, 4 0.60x, 6 0.78x,
# 8 1.02x; with 30% TCP, 2 ports 0.67x, 3 0.90x, 4 1.14x, 6 1.64x. So the port dumps may add
# at most this many walks to a plan of a dump per protocol, fewest ports first: 4 ports of
# one protocol (3 more per family), or web and dns's 3 TCP and 2 UDP ports; a protocol with
# one port always has its dump. Worst case measured: 1.14x; best, 0.19x.
MAX_EXTRA_PORT_DUMPS = 6
DUMP_RETRIES = 3
# The probe's own entry: IPv4 UDP in zone 0 between TEST-NET-1 addresses (RFC 5737), a
# random source port so that two probes at once do not collide, and a short timeout so it
# goes away even if we die before deleting it. The probe dumps ask for what it is not.
PROBE_SOURCE, PROBE_DESTINATION = socket.inet_aton("192.0.2.1"), socket.inet_aton("192.0.2.2")
PROBE_ENTRY_PROTOCOL, PROBE_ENTRY_PORT, PROBE_ENTRY_TIMEOUT = 17, 9, 10
PROBE_DUMP_ZONE, PROBE_DUMP_PROTOCOL = 65535, 255
PROBE_OTHER_PORT = 10  # the port probe's second entry, which a dump of port 9 leaves out


class SourceError(RuntimeError):
    """The source cannot work; the text says why and what to do."""


@dataclass(frozen=True)
class KernelFilters:
    """The dump filters the running kernel applies. Kernels ignore the ones they do not
    know silently (Linux 6.1 returns every zone to a zone-filtered dump): asking one of
    those for a dump per zone would decode every entry once per zone."""
    family: bool
    protocol: bool
    zone: bool
    ports: frozenset[int] = frozenset()  # protocols whose destination port it filters

    def describe(self) -> str:
        said = [f"{kind} {'applied' if getattr(self, kind) else 'ignored'}"
                for kind in ("family", "protocol", "zone")]
        ports = ", ".join(protocol_name(n) for n in sorted(self.ports)) or "none"
        return f"{', '.join(said)}, destination port of {ports} (the rest in userspace)"

    def to_json(self) -> dict:
        return {"family": self.family, "protocol": self.protocol, "zone": self.zone,
                "ports": sorted(self.ports)}

    @classmethod
    def from_json(cls, answer: object) -> KernelFilters:
        if not isinstance(answer, dict) or set(answer) != {"family", "protocol", "zone",
                                                          "ports"}:
            raise ValueError(f"not an answer: {answer!r}")
        flags = [answer[kind] for kind in ("family", "protocol", "zone")]
        ports = answer["ports"]
        if not all(isinstance(flag, bool) for flag in flags) or not isinstance(ports, list) \
                or not set(ports) <= PORT_PROTOCOLS:
            raise ValueError(f"not an answer: {answer!r}")
        return cls(*flags, frozenset(ports))


NO_FILTERS = KernelFilters(family=False, protocol=False, zone=False)


@dataclass(frozen=True)
class Dump:
    family: int  # 0 = IPv4 and IPv6
    zone: int | None
    protocol: int | None
    port: int | None = None  # the original direction's destination port


def plan_dumps(connection_filter: ConnectionFilter, kernel: KernelFilters) -> list[Dump]:
    """The dumps that fetch what the filter accepts with the least crossing into userspace,
    using only the filters the kernel applies, so that no two dumps return the same entry:
    one per zone (the kernel cannot select zone 0), one per address family and protocol,
    and for a protocol exported on a few ports only, one per port (`_dumped_by_port`).
    Each dump walks the whole table in the kernel: past MAX_FILTERED_DUMPS, one dump (per
    zone) and the userspace filter. The userspace filter always runs after them."""
    zones = sorted(connection_filter.zones)
    zone_choices: list[int | None] = (zones if kernel.zone and zones and 0 not in zones
                                      else [None])
    protocols = connection_filter.protocols
    if protocols.numbers is None or not (kernel.protocol and kernel.family):
        return [Dump(0, zone, None) for zone in zone_choices]
    pairs = [(family, protocol) for family in (socket.AF_INET, socket.AF_INET6)
             for protocol in sorted(protocols.numbers)
             if not (protocol == 1 and family == socket.AF_INET6)
             and not (protocol == 58 and family == socket.AF_INET)]
    if len(pairs) * len(zone_choices) > MAX_FILTERED_DUMPS:
        return [Dump(0, zone, None) for zone in zone_choices]
    by_port = _dumped_by_port(protocols, kernel, len(pairs) * len(zone_choices),
                              len(zone_choices))
    return [Dump(family, zone, protocol, port)
            for zone, (family, protocol) in itertools.product(zone_choices, pairs)
            for port in by_port.get(protocol, [None])]


def _dumped_by_port(protocols: ProtocolSet, kernel: KernelFilters, planned: int,
                    zones: int) -> dict[int, list[int]]:
    """The protocols to dump port by port, with their ports: those exported on some ports
    whose ports the kernel filters, fewest ports first, while the walks they add to the
    `planned` dumps (one per family, protocol and zone) stay within MAX_EXTRA_PORT_DUMPS,
    and the plan within MAX_FILTERED_DUMPS. A port is a dump per family (protocols with
    ports have both) and zone."""
    by_port: dict[int, list[int]] = {}
    extra = 0
    for count, protocol, ranges in sorted(
            (sum(high - low + 1 for low, high in ranges), protocol, ranges)
            for protocol, ranges in protocols.ports if protocol in kernel.ports):
        added = (count - 1) * 2 * zones
        if extra + added > MAX_EXTRA_PORT_DUMPS or planned + extra + added > \
                MAX_FILTERED_DUMPS:
            break  # the next ones have as many ports or more
        by_port[protocol] = [port for low, high in ranges for port in range(low, high + 1)]
        extra += added
    return by_port


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


def kept_filters(state_directory: str) -> KernelFilters:
    """`probe_filters`' answer, kept in the state directory for this boot, kernel release and
    network namespace (`kernel-filters-<netns cookie>.json`): each of the probe's three dumps
    walks the whole table (~0.08 s at 110k entries), and the answer is the kernel's. A file
    that is unreadable, corrupt or another boot's, kernel's or namespace's is set aside with
    one debug line and the probe runs; "" keeps nothing. Blocking."""
    if not state_directory:
        return probe_filters()
    with open("/proc/sys/kernel/random/boot_id") as boot_id:
        origin = {"boot_id": boot_id.read().strip(), "kernel": os.uname().release,
                  "netns": network_namespace()}
    path = os.path.join(state_directory, f"kernel-filters-{origin['netns']}.json")
    try:
        with open(path) as file:
            kept = json.load(file)
        if kept["origin"] != origin:
            raise ValueError(f"written for {kept['origin']}, this is {origin}")
        filters = KernelFilters.from_json(kept["filters"])
        log.debug("kernel dump filters: as probed earlier in this boot (%s): %s", path,
                  filters.describe())
        return filters
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError, KeyError) as err:
        log.debug("kernel dump filters: %s not used (%s); probing", path, err)
    filters = _probe()
    if filters is None:  # not kept: the next start tries again
        return NO_FILTERS
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(state_directory, exist_ok=True)
        with open(temporary, "w") as file:
            json.dump({"origin": origin, "filters": filters.to_json()}, file)
        os.replace(temporary, path)
    except OSError as err:
        log.debug("kernel dump filters: cannot keep the answer in %s (%s)", path,
                  err.strerror or err)
        with contextlib.suppress(OSError):
            os.remove(temporary)
    return filters


def probe_filters() -> KernelFilters:
    """Which filters the kernel applies, judged by what it returns: each kind is tried on
    its own, with a dump that must leave out an entry of our own (IPv4, UDP, zone 0) — an
    IPv6 dump, a dump of protocol 255 (without a zone: some builds refuse CTA_ZONE beside
    CTA_FILTER), a dump of zone 65535 — and, per protocol with ports, a dump of port 9 that
    must return our entry to port 9 and leave out our entry to port 10. A filter counts
    only if the kernel did so; when the probe cannot run, none counts (one dump, filtered
    in userspace, is always right)."""
    return _probe() or NO_FILTERS


def _probe() -> KernelFilters | None:
    """probe_filters' answer; None when the probe could not run."""
    import random  # here: with the probe's answer kept, `ovsflow conntrack` never probes

    source_port = random.randrange(1024, 65535)  # and the next one for the port probe
    entry = (PROBE_ENTRY_PROTOCOL, PROBE_SOURCE, PROBE_DESTINATION, source_port,
             PROBE_ENTRY_PORT)
    with _netlink_socket() as sock:
        try:
            _request(sock, new_request(1, *entry, timeout=PROBE_ENTRY_TIMEOUT))
        except OSError as err:
            log.warning("cannot insert the conntrack filter probe entry (%s): every dump "
                        "filter is left to userspace", err.strerror)
            return None
        try:
            filters = KernelFilters(
                family=_filtered_out(entry, socket.AF_INET6),
                protocol=_filtered_out(entry, socket.AF_INET, protocol=PROBE_DUMP_PROTOCOL),
                zone=_filtered_out(entry, 0, zone=PROBE_DUMP_ZONE),
                ports=frozenset(protocol for protocol in sorted(PORT_PROTOCOLS)
                                if _filters_ports(sock, protocol, source_port + 1)))
        finally:
            _delete(sock, entry)
    log.info("kernel conntrack dump filters: %s", filters.describe())
    return filters


def _filters_ports(sock: socket.socket, protocol: int, source_port: int) -> bool:
    """Whether a dump of `protocol` and destination port 9 returns our entry to port 9 and
    leaves out our entry to port 10. A kernel that tracks the protocol without ports (DCCP
    is tracked generically since Linux 6.16) refuses the second entry as the same as the
    first: not filtered."""
    wanted, other = ((protocol, PROBE_SOURCE, PROBE_DESTINATION, source_port, port)
                     for port in (PROBE_ENTRY_PORT, PROBE_OTHER_PORT))
    inserted = []
    try:
        for entry in (wanted, other):
            _request(sock, new_request(1, *entry, timeout=PROBE_ENTRY_TIMEOUT))
            inserted.append(entry)
        return _filtered_out(other, socket.AF_INET, protocol=protocol, port=PROBE_ENTRY_PORT,
                             returning=wanted)
    except OSError as err:
        log.debug("conntrack port filter probe of %s: %s", protocol_name(protocol),
                  err.strerror)
        return False
    finally:
        for entry in inserted:
            _delete(sock, entry)


def _delete(sock: socket.socket, entry: tuple) -> None:
    try:
        _request(sock, delete_request(2, *entry))
    except OSError as err:
        log.warning("conntrack filter probe entry not deleted (%s): it expires in %d s",
                    err.strerror, PROBE_ENTRY_TIMEOUT)


def _received(sock: socket.socket, decode: Callable[[bytes], bool]) -> bool:
    """One receive buffer handed to `decode` (parse_dump, count_dump)."""
    return decode(sock.recv(RECEIVE_SIZE))


def _netlink_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    return sock


def _request(sock: socket.socket, message: bytes) -> None:
    """Send a request that asks for an acknowledgement; NetlinkError if refused."""
    sock.send(message)
    parse_dump(sock.recv(RECEIVE_SIZE), [])


def _filtered_out(entry: tuple, family: int, *, zone: int | None = None,
                  protocol: int | None = None, port: int | None = None,
                  returning: tuple | None = None) -> bool:
    """Whether a dump filtered so leaves out `entry` (and returns `returning`, when given).
    On its own socket: closing it ends the dump as soon as the entry shows up."""
    returned = returning is None
    with _netlink_socket() as sock:
        sock.send(dump_request(1, family, zone, protocol, port))
        try:
            while True:
                found: list[Connection] = []
                done = parse_dump(sock.recv(RECEIVE_SIZE), found)
                tuples = {(c.protocol, c.source, c.destination, c.source_port,
                           c.destination_port) for c in found}
                if entry in tuples:
                    return False
                returned = returned or returning in tuples
                if done:
                    return returned
        except OSError as err:  # EOPNOTSUPP, EINVAL: the kernel refuses the filter
            log.info("conntrack dump filter family=%d zone=%s protocol=%s port=%s not usable "
                     "(%s)", family, zone, protocol, port, err.strerror)
            return False


class KernelSource:
    counted = True
    # What its entries belong to in the export state: the kernel's conntrack (of this
    # network namespace)
    state_name = "kernel"

    def __init__(self, connection_filter: ConnectionFilter, kernel: KernelFilters):
        self.filter = connection_filter
        self.kernel = kernel
        self.dump_retries = 0
        # The dumps' sequence numbers: from anywhere, so that the word the column decoder
        # looks for to find each message (its sequence number) is rarely any other word
        self._sequence = itertools.count(int.from_bytes(os.urandom(4), "big") >> 2)
        self.replan()

    def replan(self) -> None:
        """Recompute the dumps from the filter (after a reload changed it)."""
        self.dumps = plan_dumps(self.filter, self.kernel)
        log.debug("kernel conntrack: %d dump(s) per poll: %s", len(self.dumps), self.dumps)

    async def update(self, store: ConnectionStore, now: float) -> list[EncodedRecords]:
        """One poll into the store, in a worker thread. The store takes the connections as
        they are decoded, receive buffer by receive buffer, so a poll never holds a second
        copy of the table (at 100k connections that copy was ~65 MB)."""
        import asyncio  # here, not at the top: `ovsflow conntrack` dumps without a loop

        return await asyncio.to_thread(store.update_polled, self.pieces(), now)

    def pieces(self) -> Iterator[Polled]:
        """The connections the filter accepts, as columns, a piece per run of receive
        buffers of about DECODE_RUN bytes (blocking). Each buffer is received where the
        decoder keeps its run: no copy of it, no allocation per buffer."""
        from .columns import ColumnDecoder  # numpy: not for `ovsflow conntrack`

        decoder = ColumnDecoder(DECODE_RUN, RECEIVE_SIZE)

        def receive(sock: socket.socket) -> bool:
            return decoder.received(sock.recv_into(decoder.room()))
        with self._socket() as sock:
            for dump in self.dumps:
                for _ in self._receive(sock, dump, receive):
                    # a restarted dump brings its first entries again: the store takes
                    # the last sighting of each
                    if decoder.size >= DECODE_RUN:
                        yield self.filter.apply_polled(decoder.take())
                yield self.filter.apply_polled(decoder.take())

    def dump_all(self) -> list[Connection]:
        return list(self.connections())

    def connections(self) -> Iterator[Connection]:
        """The connections the filter accepts, dump by dump (blocking)."""
        return itertools.chain.from_iterable(self._chunks())  # not a generator per entry

    def _chunks(self) -> Iterator[list[Connection]]:
        """The connections the filter accepts, a list per receive buffer."""
        # A dump allocates objects per entry and nothing cyclic; the cyclic collector would
        # run dozens of times over them for nothing (~30% of a 100k poll).
        collecting = gc.isenabled()
        gc.disable()
        try:
            with self._socket() as sock:
                for dump in self.dumps:
                    for chunk in self._dump(sock, dump):
                        yield self.filter.apply(chunk)
        finally:
            if collecting:
                gc.enable()

    def count(self) -> int:
        """How many connections the filter accepts (blocking), counted by zone, protocol and
        destination port (and mark, beside Antrea) without a Connection per entry:
        `ovsflow conntrack --count`."""
        total = 0
        counts: dict[tuple[int, ...], int] = {}
        count = partial(count_dump, counts=counts, marks=self.filter.antrea_allowed_only)
        with self._socket() as sock:
            for dump in self.dumps:
                for restarted in self._receive(sock, dump, partial(_received, decode=count)):
                    if restarted:
                        counts.clear()
                total += sum(number for found, number in counts.items()
                             if self.filter.accepts(*found))
                counts.clear()
        return total

    @staticmethod
    def _socket() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.bind((0, 0))
        return sock

    def _dump(self, sock: socket.socket, dump: Dump) -> Iterator[list[Connection]]:
        """One dump's connections, a list per receive buffer, as they arrive. A restarted
        dump hands on its first entries again, which the store takes as unchanged."""
        chunk: list[Connection] = []
        for restarted in self._receive(sock, dump, partial(
                _received, decode=partial(parse_dump, connections=chunk))):
            if not restarted:
                yield chunk.copy()  # a list of its own: a caller may keep them all
                chunk.clear()

    def _receive(self, sock: socket.socket, dump: Dump,
                 receive: Callable[[socket.socket], bool]) -> Iterator[bool]:
        """One dump, `receive` taking each receive buffer from the socket (True: the dump
        is complete) as it arrives. Yields after each buffer: False, or True when the dump
        has started over (its socket overflowed) and its entries come again from the
        first."""
        attempt = 1
        while True:
            sock.send(dump_request(next(self._sequence) & 0xFFFFFFFF, dump.family,
                                   dump.zone, dump.protocol, dump.port))
            try:
                while True:
                    done = receive(sock)
                    yield False
                    if done:
                        return
            except OSError as err:
                # ENOBUFS: the socket overflowed and the dump is incomplete. Start it again
                # (a partial table would make the rest look ended).
                if err.errno != errno.ENOBUFS or attempt == DUMP_RETRIES:
                    raise
            self.dump_retries += 1
            attempt += 1
            log.warning("conntrack dump %s overflowed (ENOBUFS); retrying", dump)
            self._drain(sock)
            yield True

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
