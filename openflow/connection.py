"""A thin asyncio OpenFlow connection over the sans-IO codec in `messages`.

It negotiates the version (offering 1.3 and 1.5 by default, taking the highest the switch
also offers: `version`), answers echo requests, matches replies and errors to requests by
transaction id, and queues everything else (packet-ins) for the caller. A malformed
message is logged and skipped: one bad message must not end the session.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from . import messages as m

log = logging.getLogger(__name__)


class ConnectionClosed(ConnectionError):
    pass


class OpenFlowConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 versions: tuple[int, ...] = m.VERSIONS):
        self._reader, self._writer = reader, writer
        self.offered = versions
        self.version = 0  # negotiated in the handshake
        self._xids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._errors: dict[int, m.OpenFlowError] = {}  # of running transactions only
        self._pending_xids: set[int] = set()  # sent by transact(), answered by a barrier
        self._parts: dict[int, list[m.Message]] = {}  # multipart replies being gathered
        self.events: asyncio.Queue[m.Message | None] = asyncio.Queue()
        self.malformed = 0
        self._task: asyncio.Task | None = None

    @classmethod
    async def open_unix(cls, path: str, timeout: float = 10.0,
                        versions: tuple[int, ...] = m.VERSIONS) -> OpenFlowConnection:
        """Connect to a switch's unix socket (e.g. OVS's `<bridge>.mgmt`) and handshake,
        offering `versions`."""
        reader, writer = await asyncio.open_unix_connection(path)
        connection = cls(reader, writer, versions)
        try:
            async with asyncio.timeout(timeout):
                await connection._handshake()
        except BaseException:
            writer.close()
            raise
        return connection

    def next_xid(self) -> int:
        return next(self._xids)

    async def _handshake(self) -> None:
        self._writer.write(m.hello(self.next_xid(), self.offered))
        reader = m.MessageReader()
        while True:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionClosed("the switch closed the connection during HELLO")
            frames = reader.feed(data)
            if frames:
                break
        hello = m.decode(frames[0])
        if not isinstance(hello, m.Hello):
            raise ConnectionClosed(f"the switch began with {type(hello).__name__}, not HELLO")
        version = m.negotiate(self.offered, hello)
        if version is None:
            raise ConnectionClosed(
                f"no OpenFlow version in common: the switch offers "
                f"{_names(hello.versions or (hello.version,))}, this connection "
                f"{_names(self.offered)}")
        self.version = version
        self._task = asyncio.create_task(self._read_loop(reader, frames[1:]))

    async def _read_loop(self, reader: m.MessageReader, pending: list[bytes]) -> None:
        try:
            for frame in pending:
                self._dispatch(frame)
            while data := await self._reader.read(1 << 16):
                for frame in reader.feed(data):
                    self._dispatch(frame)
        except (OSError, m.DecodeError) as err:
            log.warning("OpenFlow connection lost: %s", err)
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionClosed("OpenFlow connection closed"))
            self.events.put_nowait(None)  # end of stream for `events` readers

    def _dispatch(self, frame: bytes) -> None:
        try:
            message = m.decode(frame)
        except m.DecodeError as err:
            self.malformed += 1
            log.warning("malformed OpenFlow message skipped: %s", err)
            return
        if isinstance(message, m.EchoRequest):
            self.send(m.echo_reply(message.xid, message.data, version=self.version))
        elif isinstance(message, m.Error):
            future = self._waiting.pop(message.xid, None)
            if future is not None and not future.done():
                future.set_exception(message.error)
            elif message.xid in self._pending_xids:
                self._errors[message.xid] = message.error
            else:
                log.warning("%s", message.error)
        elif message.xid in self._waiting:
            parts = self._parts.get(message.xid)
            if parts is not None:
                parts.append(message)
                if getattr(message, "more", False):
                    return  # more parts of this reply follow
            future = self._waiting.pop(message.xid)
            if not future.done():
                future.set_result(message if parts is None else parts)
        else:
            self.events.put_nowait(message)

    def send(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionClosed("OpenFlow connection closed")
        self._writer.write(data)

    async def request(self, build, timeout: float = 10.0) -> m.Message:
        """Send `build(xid)` and wait for the reply with that xid."""
        xid = self.next_xid()
        future = asyncio.get_running_loop().create_future()
        self._waiting[xid] = future
        self.send(build(xid))
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._waiting.pop(xid, None)

    async def request_all(self, build, timeout: float = 10.0) -> list[m.Message]:
        """A multipart request: every part of its reply, in order."""
        xid = self.next_xid()
        future = asyncio.get_running_loop().create_future()
        self._waiting[xid], self._parts[xid] = future, []
        try:
            self.send(build(xid))
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._waiting.pop(xid, None)
            self._parts.pop(xid, None)

    async def transact(self, requests: list, timeout: float = 10.0) -> None:
        """Send requests (each a callable xid -> bytes) then a barrier; raise the first
        OFPT_ERROR any of them drew. Errors are kept only while their transaction runs:
        a connection that sees many refusals does not collect them."""
        xids = []
        for build in requests:
            xid = self.next_xid()
            xids.append(xid)
            self._pending_xids.add(xid)
            self.send(build(xid))
        try:
            await self.request(
                lambda xid: m.barrier_request(xid, version=self.version), timeout)
        finally:
            self._pending_xids.difference_update(xids)
            errors = [self._errors.pop(xid) for xid in xids if xid in self._errors]
        if len(errors) > 1:
            log.warning("%d more OpenFlow error(s) in the same transaction, the last: %s",
                        len(errors) - 1, errors[-1])
        if errors:
            raise errors[0]

    @property
    def closed(self) -> bool:
        return self._task is None or self._task.done()

    async def close(self) -> None:
        self._writer.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def _names(versions: tuple[int, ...]) -> str:
    return ", ".join(m.VERSION_NAMES.get(v, f"{v:#04x}") for v in sorted(versions))
