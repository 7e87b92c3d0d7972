"""Sockets to the collector: thin asyncio adapters around the sans-IO IPFIX codec.

UDP sends datagrams that fit the path MTU, sized by the address family the collector's name
resolves to at connect time; TCP and TLS keep one stream, and watch its read side so that a
collector that went away is noticed at once rather than at the next write.

A stream says exactly which messages reached the kernel: `write` hands over one message,
`drain` returns once every byte written is in the kernel's socket buffer (the stream's
write buffer has a high-water mark of zero), so what an abort can throw away is the last
message written, and `close` says whether it did. TLS is done here over memory BIOs on that same
plain stream (not by asyncio's TLS layer, whose buffers would hide where a message ends).
TLS files rotated in place are read again when they change (`TlsFiles`).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import socket
import ssl
import struct
import termios
import time

from .config import CollectorAddress, ConfigError, IpfixConfig, TlsSettings, client_tls_context
from .ipfix.messages import MAX_MESSAGE_SIZE

log = logging.getLogger(__name__)

UDP_HEADER, IPV4_HEADER, IPV6_HEADER = 8, 20, 40
TLS_REFUSAL_WAIT = 0.2  # seconds
CLOSE_TIMEOUT = 2.0
READ_SIZE = 65536


class DatagramRefused(ConnectionError):
    """A datagram did not reach the collector: the kernel refused it, or refused one just
    before it (ICMP port unreachable, or host or network unreachable)."""


class UdpTransport:
    """A connected UDP socket of our own, not asyncio's datagram transport: on a connected
    socket the kernel reports an ICMP port unreachable (or host, network unreachable) as an
    error on the socket, and this adapter reads it after every datagram (`SO_ERROR`) and
    while idle (the socket's reader), so that each message is known to have gone out or
    been refused (`drain` raises `DatagramRefused`). On one host (loopback, veth) the
    refusal of a datagram is there when its send returns; from farther away it comes a
    round trip later, and is then charged to the next datagram, or noticed while idle."""

    reliable = False

    def __init__(self, host: str, port: int, path_mtu: int = 1500):
        self.host, self.port, self.path_mtu = host, port, path_mtu
        self.address = CollectorAddress(host, port, "udp")
        self.max_message_size = self._message_size(socket.AF_INET)  # until connect resolves
        self._sock: socket.socket | None = None
        self._pending: bytes | None = None  # written, for `drain` to send
        self.send_errors = 0  # datagrams refused, and errors the kernel reported while idle
        self.datagrams_sent = 0  # sent without a refusal
        self.refused_since: float | None = None  # monotonic; None: not refused (`recovered`)
        self.last_refusal = float("-inf")  # monotonic time of the last refusal
        self.last_error = ""
        self.on_refusal = lambda: None  # called when the kernel reports one while idle

    def _message_size(self, family: int) -> int:
        ip_header = IPV6_HEADER if family == socket.AF_INET6 else IPV4_HEADER
        return min(self.path_mtu - ip_header - UDP_HEADER, MAX_MESSAGE_SIZE)

    @property
    def failing_since(self) -> float | None:
        return self.refused_since

    @property
    def connected(self) -> bool:
        return self._sock is not None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        # Resolved here, not once at start: a name may move, and its family decides the
        # largest datagram that fits the path MTU.
        family, _, _, _, address = (await loop.getaddrinfo(
            self.host, self.port, type=socket.SOCK_DGRAM))[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(address)  # no packet: it only fixes the peer
        except BaseException:
            sock.close()
            raise
        self.max_message_size = self._message_size(family)
        self._sock = sock
        loop.add_reader(sock.fileno(), self._read_error)

    def _read_error(self) -> None:
        """The collector sends nothing: what wakes the reader is an error the kernel holds
        for the socket."""
        try:
            while self._sock is not None:
                self._sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as err:
            self._refused(err)
            self.on_refusal()

    def _refused(self, err: OSError) -> None:
        self.send_errors += 1
        self.last_error = str(err) or type(err).__name__
        self.last_refusal = time.monotonic()
        if self.refused_since is None:
            self.refused_since = self.last_refusal
        log.debug("UDP to %s:%s refused: %s", self.host, self.port, self.last_error)

    def recovered(self) -> None:
        """A datagram went out and none was refused since: sends are no longer refused."""
        self.refused_since, self.last_error = None, ""

    def write(self, message: bytes) -> None:
        """Hand over one datagram; `drain` sends it."""
        if self._sock is None:
            raise ConnectionError(f"not connected to {self.host}:{self.port}")
        self._pending = message

    async def drain(self) -> None:
        """Send the datagram written. Raises `DatagramRefused` when the kernel refused it
        (the error it returned, or one it holds for the socket once it is sent)."""
        message, sock = self._pending, self._sock
        if message is None:
            return
        if sock is None:
            raise ConnectionError(f"not connected to {self.host}:{self.port}")
        try:
            try:
                sock.send(message)
            except BlockingIOError:  # the socket's send buffer is full: wait for room
                await asyncio.get_running_loop().sock_sendall(sock, message)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
        except OSError as err:
            self._pending = None
            self._refused(err)
            raise DatagramRefused(f"UDP to {self.host}:{self.port} refused: "
                                  f"{self.last_error}") from err
        self._pending = None
        self.datagrams_sent += 1

    async def send(self, messages: list[bytes]) -> None:
        for message in messages:
            self.write(message)
            await self.drain()

    def renew_tls(self) -> bool:
        return False

    async def close(self) -> bool:
        """True unless a datagram written was left unsent."""
        sock, flushed = self._sock, self._pending is None
        self._sock = self._pending = None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        return flushed


class TlsFiles:
    """The client TLS context, built from the files of `ipfix.tls`, and built again when
    their content changes: cert-manager and kubelet-mounted Secrets rotate them in place
    (Kubernetes by swapping a `..data` symlink), under the same paths. Content, not
    mtime/inode, is compared: it follows any symlink swap, and a rewrite with the same
    content changes nothing."""

    def __init__(self, settings: TlsSettings):
        self.settings = settings
        self._digest = self._read_digest()
        self.context = client_tls_context(settings)  # ConfigError names the key and file
        self._refused_digest: bytes | None = None

    def _read_digest(self) -> bytes | None:
        digest = hashlib.sha256()
        for path in (self.settings.ca_file, self.settings.cert_file, self.settings.key_file):
            if path is None:
                digest.update(b"\0")
                continue
            try:
                with open(path, "rb") as file:
                    digest.update(file.read())
            except OSError:
                return None  # mid-swap, or gone: look again later
            digest.update(b"\0")
        return digest.digest()

    def renew(self) -> bool:
        """Build the context again when the files changed since it was built; True when a
        new one is in place. Files that do not load (a rotation half done: a new certificate
        with the old key) keep the current context; they are tried again at the next call
        and logged once per content."""
        digest = self._read_digest()
        if digest is None or digest == self._digest:
            return False
        try:
            context = client_tls_context(self.settings)
        except ConfigError as err:
            if digest != self._refused_digest:
                self._refused_digest = digest
                log.error("TLS files changed but do not load, keeping the current ones: %s",
                          "; ".join(err.problems))
            return False
        # a half-written file can load and still differ from what ends up there: the digest
        # read before loading is the one kept, so a change after it is seen next time
        self.context, self._digest, self._refused_digest = context, digest, None
        return True


class StreamTransport:
    """TCP, or TLS when given an SSL context (or `TlsFiles`, which may renew it)."""

    reliable = True
    max_message_size = MAX_MESSAGE_SIZE
    # A stream's failures raise from connect and send, and the exporter tracks them.
    failing_since: float | None = None
    last_error = ""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | TlsFiles | None = None,
                 server_name: str | None = None):
        self.host, self.port = host, port
        self.address = CollectorAddress(host, port, "tcp" if tls is None else "tls")
        self.tls_files = tls if isinstance(tls, TlsFiles) else None
        self.tls = tls.context if isinstance(tls, TlsFiles) else tls
        self.server_name = server_name or (host if tls else None)
        self._writer: asyncio.StreamWriter | None = None
        self._watcher: asyncio.Task | None = None
        self._session: ssl.SSLObject | None = None  # TLS: what encrypts `write`'s messages
        self._outgoing: ssl.MemoryBIO | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    def renew_tls(self) -> bool:
        """Re-read the TLS files; True when they changed and the next connection will use
        them (the current session goes on with the old ones)."""
        if self.tls_files is None or not self.tls_files.renew():
            return False
        self.tls = self.tls_files.context
        return True

    async def connect(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.transport.set_write_buffer_limits(0)  # see the module's docstring
        incoming = None
        try:
            if self.tls is not None:
                incoming = await self._handshake(reader, writer)
        except BaseException:
            writer.transport.abort()
            raise
        self._writer = writer
        self._watcher = asyncio.create_task(self._watch(reader, writer, incoming,
                                                        self._session))
        if self.tls is not None:
            # With TLS 1.3 a collector that refuses our certificate says so only after the
            # handshake has completed on our side: give it a moment before records go out.
            await asyncio.sleep(TLS_REFUSAL_WAIT)
            if not self.connected:
                raise ConnectionError(f"collector {self.host}:{self.port} closed the TLS "
                                      "connection right away (client certificate refused?)")

    async def _handshake(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> ssl.MemoryBIO:
        assert self.tls is not None
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        session = self.tls.wrap_bio(incoming, outgoing, server_hostname=self.server_name)
        while True:
            try:
                session.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            writer.write(outgoing.read())
            await writer.drain()
            if done:
                break
            data = await reader.read(READ_SIZE)
            if not data:
                raise ConnectionError(f"collector {self.host}:{self.port} closed the "
                                      "connection during the TLS handshake")
            incoming.write(data)
        self._session, self._outgoing = session, outgoing
        return incoming

    async def _watch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     incoming: ssl.MemoryBIO | None, session: ssl.SSLObject | None) -> None:
        """Collectors send nothing (over TLS: session tickets, alerts, close_notify); end of
        stream or an error means the peer is gone."""
        why = "closed the connection"
        try:
            while data := await reader.read(READ_SIZE):
                if session is not None:
                    incoming.write(data)
                    try:
                        while session.read(READ_SIZE):
                            pass
                    except ssl.SSLWantReadError:
                        pass
        except ssl.SSLZeroReturnError:
            pass
        except (OSError, ssl.SSLError) as err:
            why = f"closed the connection ({err})"
        log.warning("collector %s:%s %s", self.host, self.port, why)
        writer.close()

    def write(self, message: bytes) -> None:
        """Hand one message to the stream, whole: it goes out unless the session ends
        before `drain` returns (see `close`)."""
        if not self.connected:
            raise ConnectionError(f"not connected to {self.host}:{self.port}")
        if self._session is not None:
            self._session.write(message)
            message = self._outgoing.read()
        self._writer.write(message)

    async def drain(self) -> None:
        """Wait until every byte written is in the kernel."""
        if self._writer is None:
            raise ConnectionError(f"not connected to {self.host}:{self.port}")
        await self._writer.drain()

    async def send(self, messages: list[bytes]) -> None:
        await asyncio.sleep(0)  # let the watcher see a close that already arrived
        for message in messages:
            # one message at a time: the write buffer holds what the socket has not taken,
            # not a whole batch's messages besides
            self.write(message)
            await self.drain()

    async def close(self) -> bool:
        """End the session. True when every byte written reached the kernel; False when
        the last message written (the only one `drain` may not have seen out) was thrown
        away: a peer that reads nothing would keep it, and us, for ever."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        writer, session, outgoing = self._writer, self._session, self._outgoing
        self._writer = self._session = self._outgoing = None
        if writer is None:
            return True
        unsent = writer.transport.get_write_buffer_size()
        if session is not None and not writer.is_closing():
            try:
                session.unwrap()  # close_notify; the peer's answer is not awaited
            except ssl.SSLError:
                pass
            writer.write(outgoing.read())
        writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await writer.wait_closed()
            return True
        except TimeoutError:
            log.warning("collector %s:%s reads nothing: session aborted with %d bytes it had "
                        "not acknowledged (they arrive only if it reads again) and %d not "
                        "handed to the kernel", self.host, self.port,
                        _unacknowledged(writer), writer.transport.get_write_buffer_size())
            writer.transport.abort()
        except (OSError, ssl.SSLError):
            pass
        return unsent == 0


def _unacknowledged(writer: asyncio.StreamWriter) -> int:
    """Bytes in the socket's send queue the peer has not acknowledged (SIOCOUTQ)."""
    try:
        out = fcntl.ioctl(writer.get_extra_info("socket").fileno(), termios.TIOCOUTQ,
                          b"\0" * 4)
    except OSError:
        return 0
    return struct.unpack("i", out)[0]


def transport_for(collector: CollectorAddress, ipfix: IpfixConfig):
    if collector.transport == "udp":
        return UdpTransport(collector.host, collector.port, ipfix.path_mtu)
    tls = TlsFiles(ipfix.tls) if collector.transport == "tls" else None
    return StreamTransport(collector.host, collector.port, tls, ipfix.tls.server_name)
