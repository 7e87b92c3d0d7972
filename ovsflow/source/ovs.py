"""The OVS userspace datapath's conntrack, read through ovs-vswitchd's unixctl socket.

Unixctl is JSON-RPC over `<runDir>/ovs-vswitchd.<pid>.ctl`. python-ovs has a client, but
without its C extension (Debian has no libopenvswitch-dev, so pip builds it pure-Python) its
JSON parser took 155 s for a 10k-entry dump here; this small asyncio client with the stdlib
json takes ~40 ms. python-ovs stays in use for OVSDB (`bridge_datapath_type`), where replies
are tiny.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import os

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..filter import ConnectionFilter
from ..connection import Connection
from .dpctl import count_entries, parse_pieces

if TYPE_CHECKING:
    from ..record import EncodedRecords
    from ..store import ConnectionStore

log = logging.getLogger(__name__)

UNIXCTL_TIMEOUT = 30.0


class UnixctlError(RuntimeError):
    pass


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


async def unixctl(path: str, method: str, *params: str) -> str:
    """One unixctl command; its text output. The reply is read on the event loop, chunk by
    chunk into a list (a dump is megabytes: `buffer += chunk` copied it again per chunk), and
    decoded in a worker thread, so a large dump never stalls the loop."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(json.dumps({"id": 0, "method": method, "params": list(params)}).encode())
        await writer.drain()
        chunks: list[bytes] = []
        async with asyncio.timeout(UNIXCTL_TIMEOUT):
            while True:
                chunk = await reader.read(1 << 20)
                if not chunk:
                    raise UnixctlError(f"{path}: connection closed before the reply to "
                                       f"{method}")
                chunks.append(chunk)
                if chunk.rstrip().endswith(b"}"):
                    result = await asyncio.to_thread(_result, method, chunks)
                    if result is not None:
                        return result
                    # else a '}' inside the text, not the end of the reply
    finally:
        writer.close()


def _result(method: str, chunks: list[bytes]) -> str | None:
    """The text of a complete JSON-RPC reply; None while it is incomplete. The chunks are
    replaced by their join (the loop waits meanwhile): a reply is not held twice while
    decoded."""
    chunks[:] = [b"".join(chunks)]
    try:
        decoded = json.loads(chunks[0])
    except json.JSONDecodeError:
        return None
    if decoded.get("error") is not None:
        raise UnixctlError(f"{method}: {decoded['error']}")
    return decoded.get("result") or ""


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

    async def update(self, store: ConnectionStore, now: float) -> list[EncodedRecords]:
        """One poll into the store. The dumps are read on the loop; the parse and the store
        update run in a worker thread, the store taking the connections piece by piece as
        they are parsed, so a poll never holds them all (at 100k: ~35 MB of them)."""
        texts = await self._dumps()
        return await asyncio.to_thread(store.update, self._connections(texts), now)

    def dump_all(self) -> list[Connection]:
        """One poll, outside any event loop (`ovsflow conntrack`)."""
        return asyncio.run(self.poll())

    def count(self) -> int:
        """How many connections the filter accepts (`ovsflow conntrack --count`): each
        dump's lines counted by protocol, not parsed. The zones need no check here: each
        dump is of one configured zone (ovs-vswitchd's `zone=` filter), or of every zone
        when none is configured."""
        return asyncio.run(self._count())

    async def _count(self) -> int:
        return sum(lines for text in await self._dumps()
                   for protocol, lines in count_entries(text).items()
                   if self.filter.accepts_protocol(protocol))

    def replan(self) -> None:
        """Nothing to recompute: every poll reads the filter's zones."""

    async def poll(self) -> list[Connection]:
        texts = await self._dumps()
        return await asyncio.to_thread(lambda: list(self._connections(texts)))

    async def _dumps(self) -> list[str]:
        path = vswitchd_control_socket(self.run_dir)
        return [await unixctl(path, "dpctl/dump-conntrack", *arguments)
                for arguments in self._queries()]

    def _queries(self) -> list[tuple[str, ...]]:
        """dpctl/dump-conntrack's arguments: a dump per configured zone, or one of all."""
        return ([("-m", "-s", f"zone={zone}") for zone in sorted(self.filter.zones)]
                or [("-m", "-s")])

    def _connections(self, texts: list[str]) -> Iterator[Connection]:
        """The dumps' connections the filter accepts (blocking: a worker thread's job)."""
        return itertools.chain.from_iterable(self._pieces(texts))  # no generator per entry

    def _pieces(self, texts: list[str]) -> Iterator[list[Connection]]:
        # A parse allocates objects per entry and nothing cyclic; the cyclic collector would
        # run over them dozens of times for nothing (as in the kernel source's dump).
        collecting = gc.isenabled()
        gc.disable()
        errors, first_error = 0, None
        try:
            for text in texts:
                for connections, piece_errors in parse_pieces(text):
                    if piece_errors:
                        errors += len(piece_errors)
                        first_error = first_error or piece_errors[0]
                    yield self.filter.apply(connections)
        finally:
            if collecting:
                gc.enable()
        if errors:
            self.parse_errors += errors
            log.warning("dpctl/dump-conntrack: %d line(s) not understood, first: %s",
                        errors, first_error)
