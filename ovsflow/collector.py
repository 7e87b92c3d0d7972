"""`ovsflow collect`: a small IPFIX collector that prints one JSON object per data record.

Options records (an exporter's statistics, such as ovsflow's ledger) are printed too, with
`"_options": true`; `--count` counts flow records only.

Meant for debugging, demos and tests: it keeps templates per exporter and transport session,
decodes UDP datagrams and TCP/TLS streams with the same sans-IO decoder, and writes a line
per record, flushed at once so that a pipe sees records as they come. SIGTERM and SIGINT
end it with status 0, as a container's PID 1 must.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from typing import TextIO
from urllib.parse import urlsplit

from .ipfix.codec import DecodeError
from .ipfix.messages import MessageDecoder, MessageStream

log = logging.getLogger(__name__)

# Templates of a UDP exporter not heard from for this long are forgotten: three times the
# longest template refresh interval an exporter should use (RFC 7011 §8.4; ovsflow: 600 s).
UDP_TEMPLATE_LIFETIME = 1800.0
# At most this many (exporter, observation domain) sources keep UDP templates at once.
UDP_MAX_SOURCES = 4096
# Read at most this many queued datagrams when stopping: more than a receive buffer holds.
UDP_DRAIN_DATAGRAMS = 10_000


class ListenUrlError(ValueError):
    pass


def parse_listen_url(url: str) -> tuple[str, str, int]:
    """`udp://HOST:PORT`, `tcp://…`, `tls://…` (IPv6 host in brackets) to its parts."""
    parts = urlsplit(url)
    if parts.scheme not in ("udp", "tcp", "tls"):
        raise ListenUrlError(f"--listen {url!r}: the scheme must be udp://, tcp:// or tls://")
    try:
        port = parts.port
    except ValueError:
        raise ListenUrlError(f"--listen {url!r}: the port must be 0-65535") from None
    if not parts.hostname or port is None:
        raise ListenUrlError(f"--listen {url!r}: expected {parts.scheme}://HOST:PORT")
    return parts.scheme, parts.hostname, port


class RecordPrinter:
    """Decodes messages and prints their data records; stops the collector after `count`
    flow records (options records are printed, not counted)."""

    def __init__(self, out: TextIO, count: int | None, done: Callable[[], None]):
        self.out, self.count, self.done = out, count, done
        self.printed = 0

    def message(self, decoder: MessageDecoder, data: bytes, exporter: str) -> None:
        decoded = decoder.decode(data, exporter)
        for set_id in decoded.unknown_template_sets:
            log.warning("%s: data set for template %d before its template; skipped",
                        exporter, set_id)
        for template_id, record in decoded.records:
            if self.count is not None and self.printed >= self.count:
                return
            line = {"_exporter": exporter,
                    "_observationDomainId": decoded.observation_domain_id,
                    "_templateId": template_id, "_exportTime": decoded.export_time}
            options = template_id in decoded.options_sets
            if options:
                line["_options"] = True
            line.update(record)
            self.out.write(json.dumps(line) + "\n")
            self.out.flush()
            if options:
                continue
            self.printed += 1
            if self.count is not None and self.printed >= self.count:
                self.done()


def _peer(address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def collect(url: str, *, count: int | None = None, timeout: float | None = None,
                  cert: str | None = None, key: str | None = None,
                  client_ca: str | None = None,
                  out: TextIO = sys.stdout) -> int:
    """Run until `count` records were printed, `timeout` passed, or SIGTERM or SIGINT came.
    Returns the exit status: 1 when a count was asked for and the timeout came first, else
    0."""
    scheme, host, port = parse_listen_url(url)
    finished = asyncio.Event()
    printer = RecordPrinter(out, count, finished.set)
    loop = asyncio.get_running_loop()

    if scheme == "udp":
        decoder = MessageDecoder(UDP_TEMPLATE_LIFETIME, UDP_MAX_SOURCES)

        def datagram(data: bytes, addr) -> None:
            try:
                printer.message(decoder, data, _peer(addr))
            except DecodeError as err:
                log.warning("%s: malformed IPFIX message dropped: %s", _peer(addr), err)

        class Datagrams(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr) -> None:
                datagram(data, addr)

        # Our own socket, so that the datagrams it still holds can be read at the end.
        family, _, _, _, address = (await loop.getaddrinfo(host, port,
                                                           type=socket.SOCK_DGRAM))[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind(address)
        transport, _ = await loop.create_datagram_endpoint(Datagrams, sock=sock)
        bound = sock.getsockname()

        def closer() -> None:
            """Print what the kernel already received, e.g. the final records of an exporter
            stopped at the same time, then close."""
            for _ in range(UDP_DRAIN_DATAGRAMS):
                try:
                    datagram(*sock.recvfrom(65535))
                except OSError:  # BlockingIOError: nothing left
                    break
            transport.close()
    else:
        tls = None
        if scheme == "tls":
            if not (cert and key):
                raise ListenUrlError("tls:// needs --cert and --key")
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(cert, key)
            if client_ca:  # mutual TLS: exporters must present a certificate from this CA
                tls.load_verify_locations(client_ca)
                tls.verify_mode = ssl.CERT_REQUIRED

        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            """One TCP/TLS session: its templates live and end with it (RFC 7011 §8)."""
            exporter = _peer(writer.get_extra_info("peername"))
            stream, decoder = MessageStream(), MessageDecoder()
            log.info("%s connected", exporter)
            try:
                while data := await reader.read(65536):
                    for message in stream.feed(data):
                        printer.message(decoder, message, exporter)
            except DecodeError as err:
                log.warning("%s: malformed IPFIX, closing the session: %s", exporter, err)
            except (OSError, ssl.SSLError) as err:
                log.warning("%s: %s", exporter, err)
            finally:
                writer.close()
                log.info("%s disconnected", exporter)

        server = await asyncio.start_server(session, host, port, ssl=tls)
        bound = server.sockets[0].getsockname()
        closer = server.close

    signals = (signal.SIGTERM, signal.SIGINT)
    stopped_by: list[signal.Signals] = []

    def stop(signum: signal.Signals) -> None:
        stopped_by.append(signum)
        finished.set()

    for signum in signals:
        loop.add_signal_handler(signum, stop, signum)
    print(f"ovsflow collect: listening on {scheme}://{_peer(bound)}", file=sys.stderr,
          flush=True)
    try:
        await asyncio.wait_for(finished.wait(), timeout)
    except TimeoutError:
        pass
    finally:
        closer()
        for signum in signals:
            loop.remove_signal_handler(signum)
    if stopped_by:
        log.info("%s: stopping; %d records printed", stopped_by[0].name, printer.printed)
        return 0
    if count is not None and printer.printed < count:
        log.info("timed out after %d of %d records", printer.printed, count)
        return 1
    return 0
