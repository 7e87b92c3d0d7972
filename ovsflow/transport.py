"""Sockets to the collector: thin asyncio adapters around the sans-IO IPFIX codec.

UDP sends datagrams that fit the path MTU, sized by the address family the collector's name
resolves to at connect time; TCP and TLS keep one stream, and watch its read side so that a
collector that went away is noticed at once rather than at the next write.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time

from .config import CollectorAddress, IpfixConfig, client_tls_context
from .ipfix.codec import MAX_MESSAGE_SIZE

log = logging.getLogger(__name__)

UDP_HEADER, IPV4_HEADER, IPV6_HEADER = 8, 20, 40
TLS_REFUSAL_WAIT = 0.2  # seconds
CLOSE_TIMEOUT = 2.0


class UdpTransport:
    reliable = False

    def __init__(self, host: str, port: int, path_mtu: int = 1500):
        self.host, self.port, self.path_mtu = host, port, path_mtu
        self.max_message_size = self._message_size(socket.AF_INET)  # until connect resolves
        self._transport: asyncio.DatagramTransport | None = None
        self.send_errors = 0
        self.datagrams_sent = 0  # handed to the kernel without an error
        self.failing_since: float | None = None  # monotonic time of the first failed send
        self.last_error = ""  # since the last datagram that went out

    def _message_size(self, family: int) -> int:
        ip_header = IPV6_HEADER if family == socket.AF_INET6 else IPV4_HEADER
        return min(self.path_mtu - ip_header - UDP_HEADER, MAX_MESSAGE_SIZE)

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def connect(self) -> None:
        owner = self

        class Protocol(asyncio.DatagramProtocol):
            def error_received(self, exc: Exception) -> None:
                # ICMP port unreachable and the like: the collector is not there right now.
                # UDP gives no delivery guarantee; count it and carry on.
                owner.send_errors += 1
                owner.last_error = str(exc)
                if owner.failing_since is None:
                    owner.failing_since = time.monotonic()
                log.debug("UDP send to %s:%s failed: %s", owner.host, owner.port, exc)

        loop = asyncio.get_running_loop()
        # Resolved here, not once at start: a name may move, and its family decides the
        # largest datagram that fits the path MTU.
        family, _, _, _, address = (await loop.getaddrinfo(
            self.host, self.port, type=socket.SOCK_DGRAM))[0]
        self.max_message_size = self._message_size(family)
        self._transport, _ = await loop.create_datagram_endpoint(
            Protocol, remote_addr=address[:2], family=family)  # asyncio takes (host, port)

    async def send(self, messages: list[bytes]) -> None:
        assert self._transport is not None
        for message in messages:
            errors = self.send_errors
            self._transport.sendto(message)  # an immediate failure calls error_received
            if self.send_errors == errors:
                self.datagrams_sent += 1
                self.failing_since, self.last_error = None, ""

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class StreamTransport:
    """TCP, or TLS when given an SSL context."""

    reliable = True
    max_message_size = MAX_MESSAGE_SIZE
    # A stream's failures raise from connect and send, and the exporter tracks them.
    failing_since: float | None = None
    last_error = ""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None,
                 server_name: str | None = None):
        self.host, self.port, self.tls = host, port, tls
        self.server_name = server_name or (host if tls else None)
        self._writer: asyncio.StreamWriter | None = None
        self._watcher: asyncio.Task | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.tls, server_hostname=self.server_name)
        self._writer = writer
        self._watcher = asyncio.create_task(self._watch(reader, writer))
        if self.tls is not None:
            # With TLS 1.3 a collector that refuses our certificate says so only after the
            # handshake has completed on our side: give it a moment before records go out.
            await asyncio.sleep(TLS_REFUSAL_WAIT)
            if not self.connected:
                raise ConnectionError(f"collector {self.host}:{self.port} closed the TLS "
                                      "connection right away (client certificate refused?)")

    async def _watch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Collectors send nothing; end of stream or an error means the peer is gone."""
        try:
            while await reader.read(4096):
                pass
        except (OSError, ssl.SSLError):
            pass
        log.warning("collector %s:%s closed the connection", self.host, self.port)
        writer.close()

    async def send(self, messages: list[bytes]) -> None:
        await asyncio.sleep(0)  # let the watcher see a close that already arrived
        if not self.connected:
            raise ConnectionError(f"not connected to {self.host}:{self.port}")
        writer = self._writer
        assert writer is not None
        for message in messages:
            # one message at a time: the write buffer holds what the socket has not taken
            # (drain waits above its high-water mark), not a whole batch's messages besides
            writer.write(message)
            await writer.drain()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._writer is not None:
            self._writer.close()
            try:
                # a peer that reads nothing would keep the unsent bytes, and us, for ever
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._writer.wait_closed()
            except TimeoutError:
                self._writer.transport.abort()
            except (OSError, ssl.SSLError):
                pass
            self._writer = None


def transport_for(collector: CollectorAddress, ipfix: IpfixConfig):
    if collector.transport == "udp":
        return UdpTransport(collector.host, collector.port, ipfix.path_mtu)
    tls = client_tls_context(ipfix.tls) if collector.transport == "tls" else None
    return StreamTransport(collector.host, collector.port, tls, ipfix.tls.server_name)
