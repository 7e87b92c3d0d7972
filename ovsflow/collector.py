"""`ovsflow collect`: a small IPFIX collector that prints one JSON object per data record.

Meant for debugging, demos and tests: it keeps templates per exporter and transport session,
decodes UDP datagrams and TCP/TLS streams with the same sans-IO decoder, and writes a line
per record, flushed at once so that a pipe sees records as they come.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import sys
from collections.abc import Callable
from typing import TextIO
from urllib.parse import urlsplit

from .ipfix.codec import DecodeError, MessageDecoder, MessageStream

log = logging.getLogger(__name__)


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
    """Decodes messages and prints their data records; stops the collector after `count`."""

    def __init__(self, out: TextIO, count: int | None, done: Callable[[], None]):
        self.out, self.count, self.done = out, count, done
        self.decoder = MessageDecoder()
        self.printed = 0

    def message(self, data: bytes, exporter: str) -> None:
        decoded = self.decoder.decode(data, exporter)
        for set_id in decoded.unknown_template_sets:
            log.warning("%s: data set for template %d before its template; skipped",
                        exporter, set_id)
        for template_id, record in decoded.records:
            if self.count is not None and self.printed >= self.count:
                return
            line = {"_exporter": exporter,
                    "_observationDomainId": decoded.observation_domain_id,
                    "_templateId": template_id, "_exportTime": decoded.export_time, **record}
            self.out.write(json.dumps(line) + "\n")
            self.out.flush()
            self.printed += 1
            if self.count is not None and self.printed >= self.count:
                self.done()

    def forget(self, exporter: str) -> None:
        """A TCP/TLS session ended: its templates end with it (RFC 7011 §8)."""
        for key in [k for k in self.decoder.templates if k[0] == exporter]:
            del self.decoder.templates[key]


def _peer(address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def collect(url: str, *, count: int | None = None, timeout: float | None = None,
                  cert: str | None = None, key: str | None = None,
                  client_ca: str | None = None,
                  out: TextIO = sys.stdout) -> int:
    """Run until `count` records were printed or `timeout` passed. Returns the exit status:
    1 when a count was asked for and not reached, else 0."""
    scheme, host, port = parse_listen_url(url)
    finished = asyncio.Event()
    printer = RecordPrinter(out, count, finished.set)
    loop = asyncio.get_running_loop()

    if scheme == "udp":
        class Datagrams(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr) -> None:
                try:
                    printer.message(data, _peer(addr))
                except DecodeError as err:
                    log.warning("%s: malformed IPFIX message dropped: %s", _peer(addr), err)

        transport, _ = await loop.create_datagram_endpoint(Datagrams, local_addr=(host, port))
        bound = transport.get_extra_info("sockname")
        closer = transport.close
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
            exporter = _peer(writer.get_extra_info("peername"))
            stream = MessageStream()
            log.info("%s connected", exporter)
            try:
                while data := await reader.read(65536):
                    for message in stream.feed(data):
                        printer.message(message, exporter)
            except DecodeError as err:
                log.warning("%s: malformed IPFIX, closing the session: %s", exporter, err)
            except (OSError, ssl.SSLError) as err:
                log.warning("%s: %s", exporter, err)
            finally:
                printer.forget(exporter)
                writer.close()
                log.info("%s disconnected", exporter)

        server = await asyncio.start_server(session, host, port, ssl=tls)
        bound = server.sockets[0].getsockname()
        closer = server.close

    print(f"ovsflow collect: listening on {scheme}://{_peer(bound)}", file=sys.stderr,
          flush=True)
    try:
        await asyncio.wait_for(finished.wait(), timeout)
    except TimeoutError:
        pass
    finally:
        closer()
    if count is not None and printer.printed < count:
        log.info("timed out after %d of %d records", printer.printed, count)
        return 1
    return 0
