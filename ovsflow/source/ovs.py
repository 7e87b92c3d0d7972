"""The OVS userspace datapath's conntrack, read through ovs-vswitchd's unixctl socket.

Unixctl is JSON-RPC over `<runDir>/ovs-vswitchd.<pid>.ctl`. python-ovs has a client, but
without its C extension (Debian has no libopenvswitch-dev, so pip builds it pure-Python) its
JSON parser took 155 s for a 10k-entry dump here. Here the reply is decoded as it arrives
(`ReplyDecoder`, sans-IO, the stdlib json's C string scanner), and its text parsed a piece
of whole lines at a time: a poll never holds a whole dump (at 100k entries, 16-30 MB of
JSON and as much text). python-ovs stays in use for OVSDB (`bridge_datapath_type`), where
replies are tiny.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import os
import socket

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ..filter import ConnectionFilter
from .unixctl import ReplyDecoder, UnixctlError
from ..connection import Connection
from .dpctl import count_entries, parse_pieces

if TYPE_CHECKING:
    from ..record import EncodedRecords
    from ..store import ConnectionStore

log = logging.getLogger(__name__)

UNIXCTL_TIMEOUT = 30.0  # seconds without a byte of the reply
READ_SIZE = 1 << 18  # bytes of the reply received, decoded and parsed at a time


def vswitchd_control_socket(run_dir: str) -> str:
    """ovs-vswitchd's control socket, named after its current pid (it changes on restart)."""
    pidfile = os.path.join(run_dir, "ovs-vswitchd.pid")
    try:
        with open(pidfile) as stream:
            pid = int(stream.read().strip())
    except (OSError, ValueError) as err:
        raise UnixctlError(f"cannot read ovs-vswitchd's pid from {pidfile}: {err}; is "
                           "ovs-vswitchd running with this ovs.runDir?") from None
    return os.path.join(run_dir, f"ovs-vswitchd.{pid}.ctl")


def unixctl_text(path: str, method: str, *params: str) -> Iterator[str]:
    """One unixctl command's text output, in pieces of whole lines as its reply arrives
    (blocking: a worker thread's). The reply is received where it is decoded and parsed:
    a piece is read when the last has been taken, so what is held at once is a piece and
    what the socket buffers, not the reply; and the event loop's thread does none of it
    (an asyncio read handing chunks to the worker cost that thread ~0.1 s of CPU per 100k
    entries in tests/test_ovs_unixctl.py)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(UNIXCTL_TIMEOUT)
        try:
            sock.connect(path)
            sock.sendall(json.dumps({"id": 0, "method": method,
                                     "params": list(params)}).encode())
            reply = ReplyDecoder(method)
            while not reply.complete:
                chunk = sock.recv(READ_SIZE)
                if not chunk:
                    raise UnixctlError(f"{path}: connection closed before the reply to "
                                       f"{method}")
                yield from reply.feed(chunk)
        except TimeoutError:
            raise UnixctlError(f"{path}: no reply to {method} for {UNIXCTL_TIMEOUT:.0f} s"
                               ) from None


def bridge_datapath_type(run_dir: str, bridge: str) -> str:
    """The bridge's datapath_type from OVSDB ('' means the default, system). Blocking."""
    import ovs.jsonrpc
    import ovs.stream

    error, stream = ovs.stream.Stream.open_block(
        ovs.stream.Stream.open(f"unix:{os.path.join(run_dir, 'db.sock')}"), timeout=10_000)
    if error:
        raise UnixctlError(f"cannot connect to OVSDB at {run_dir}/db.sock: "
                           f"{os.strerror(error)}")
    connection = ovs.jsonrpc.Connection(stream)
    try:
        request = ovs.jsonrpc.Message.create_request("transact", [
            "Open_vSwitch", {"op": "select", "table": "Bridge", "columns": ["datapath_type"],
                             "where": [["name", "==", bridge]]}])
        error, reply = connection.transact_block(request)
    finally:
        connection.close()
    if error or reply.error:
        raise UnixctlError(f"OVSDB query for bridge {bridge!r} failed: "
                           f"{os.strerror(error) if error else reply.error}")
    rows = reply.result[0].get("rows", [])
    if not rows:
        raise UnixctlError(f"bridge {bridge!r} does not exist in OVSDB ({run_dir}/db.sock)")
    return rows[0]["datapath_type"]


class OvsSource:
    counted = False  # the userspace datapath keeps no counters

    def __init__(self, connection_filter: ConnectionFilter, run_dir: str):
        self.filter = connection_filter
        self.run_dir = run_dir
        self.parse_errors = 0

    @property
    def state_name(self) -> str:
        """What its entries belong to in the export state: one ovs-vswitchd process, whose
        userspace conntrack dies with it."""
        return f"ovs {vswitchd_control_socket(self.run_dir)}"

    async def update(self, store: ConnectionStore, now: float) -> list[EncodedRecords]:
        """One poll into the store, in a worker thread: each dump's reply decoded, parsed
        and handed to the store a piece at a time as it arrives, so a poll never holds the
        dump (its JSON, its text, its lines or its `Connection`s) whole."""
        texts = self._texts()
        return await asyncio.to_thread(lambda: store.update(self._connections(texts), now))

    def dump_all(self) -> list[Connection]:
        """One poll, blocking (`ovsflow conntrack`)."""
        return list(self._connections(self._texts()))

    def count(self) -> int:
        """How many connections the filter accepts (`ovsflow conntrack --count`): each
        dump's lines counted by protocol, not parsed. The zones need no check here: each
        dump is of one configured zone (ovs-vswitchd's `zone=` filter), or of every zone
        when none is configured. With ports configured, or beside Antrea (the marks), the
        lines are parsed (their ports and marks are read) and counted as the poll keeps
        them."""
        if self.filter.protocols.ports or self.filter.antrea_allowed_only:
            return sum(map(len, self._pieces(self._texts())))
        return sum(lines for text in self._texts()
                   for protocol, lines in count_entries(text).items()
                   if self.filter.accepts_protocol(protocol))

    def replan(self) -> None:
        """Nothing to recompute: every poll reads the filter's zones."""

    async def poll(self) -> list[Connection]:
        return await asyncio.to_thread(self.dump_all)

    def _texts(self) -> Iterator[str]:
        """The dumps' text, in pieces of whole lines (blocking: a worker thread's)."""
        path = vswitchd_control_socket(self.run_dir)
        return itertools.chain.from_iterable(
            unixctl_text(path, "dpctl/dump-conntrack", *arguments)
            for arguments in self._queries())

    def _queries(self) -> list[tuple[str, ...]]:
        """dpctl/dump-conntrack's arguments: a dump per configured zone, or one of all."""
        return ([("-m", "-s", f"zone={zone}") for zone in sorted(self.filter.zones)]
                or [("-m", "-s")])

    def _connections(self, texts: Iterable[str]) -> Iterator[Connection]:
        """The dumps' connections the filter accepts (blocking: a worker thread's job)."""
        return itertools.chain.from_iterable(self._pieces(texts))  # no generator per entry

    def _pieces(self, texts: Iterable[str]) -> Iterator[list[Connection]]:
        # A parse allocates objects per entry and nothing cyclic; the cyclic collector would
        # run over them dozens of times for nothing (as in the kernel source's dump).
        collecting = gc.isenabled()
        gc.disable()
        errors, first_error = 0, None
        # Each dump is of one configured zone (ovs-vswitchd's `zone=` filter) or of every
        # zone when none is: with every protocol exported (and no mark rule), the filter
        # would keep them all.
        every_protocol = (self.filter.protocols.numbers is None
                          and not self.filter.antrea_allowed_only)
        try:
            for connections, piece_errors in parse_pieces(texts):
                if piece_errors:
                    errors += len(piece_errors)
                    first_error = first_error or piece_errors[0]
                yield connections if every_protocol else self.filter.apply(connections)
        finally:
            if collecting:
                gc.enable()
        if errors:
            self.parse_errors += errors
            log.warning("dpctl/dump-conntrack: %d line(s) not understood, first: %s",
                        errors, first_error)
