"""Which ctnetlink dump filters this kernel applies, found by asking it: kernels ignore the
filters they do not know silently, so the answer is judged by what a dump returns. Kept in
the state directory for this boot, kernel and network namespace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from dataclasses import dataclass

from ..connection import Connection
from ..host import network_namespace
from ..protocols import PORT_PROTOCOLS, protocol_name
from .ctnetlink import NETLINK_NETFILTER, delete_request, dump_request, new_request, parse_dump
from .ctnetlink.wire import RECEIVE_SIZE

log = logging.getLogger(__name__)

# The probe's own entry: IPv4 UDP in zone 0 between TEST-NET-1 addresses (RFC 5737), a
# random source port so that two probes at once do not collide, and a short timeout so it
# goes away even if we die before deleting it. The probe dumps ask for what it is not.
PROBE_SOURCE, PROBE_DESTINATION = socket.inet_aton("192.0.2.1"), socket.inet_aton("192.0.2.2")
PROBE_ENTRY_PROTOCOL, PROBE_ENTRY_PORT, PROBE_ENTRY_TIMEOUT = 17, 9, 10
PROBE_DUMP_ZONE, PROBE_DUMP_PROTOCOL = 65535, 255
PROBE_OTHER_PORT = 10  # the port probe's second entry, which a dump of port 9 leaves out


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
        keys = {"family", "protocol", "zone", "ports"}
        if not isinstance(answer, dict) or set(answer) != keys:
            raise ValueError(f"not an answer: {answer!r}")
        flags = [answer[kind] for kind in ("family", "protocol", "zone")]
        ports = answer["ports"]
        if not all(isinstance(flag, bool) for flag in flags) or not isinstance(ports, list) \
                or not set(ports) <= PORT_PROTOCOLS:
            raise ValueError(f"not an answer: {answer!r}")
        return cls(*flags, frozenset(ports))


NO_FILTERS = KernelFilters(family=False, protocol=False, zone=False)


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
