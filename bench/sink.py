"""A counting IPFIX collector for benchmarks: decodes with ovsflow's own decoder but prints
nothing per record (`ovsflow collect` flushes a JSON line per record, which would measure
the terminal, not the exporter).

    python bench/sink.py udp|tcp PORT COUNT TIMEOUT
Prints 'ready' when listening, then '<records> <seconds from the first message>' once COUNT
records are in (or after TIMEOUT), then goes on taking (and discarding) what comes until
the exporter closes the connection (TCP) or sends nothing for 2 s (UDP): an exporter whose
collector vanished would queue, retry and drop, which is not what a benchmark measures.
On SIGUSR1 (while counting) it prints 'count <records so far>'.
"""

from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ovsflow.ipfix.messages import MessageDecoder, MessageStream  # noqa: E402


def main() -> None:
    kind, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(
        sys.argv[4])
    decoder, received, first = MessageDecoder(), 0, None
    signal.signal(signal.SIGUSR1, lambda *_: print(f"count {received}", flush=True))
    if kind == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: no drops here
        sock.bind(("127.0.0.1", port))
        print("ready", flush=True)
        sock.settimeout(timeout)
        try:
            while received < count:
                message = sock.recv(65535)
                first = first or time.monotonic()
                received += len(decoder.decode(message, "exporter").records)
        except TimeoutError:
            pass
        report(received, first)
        sock.settimeout(2.0)
        try:
            while sock.recv(65535):
                pass
        except TimeoutError:
            pass
    else:
        server = socket.create_server(("127.0.0.1", port))
        print("ready", flush=True)
        server.settimeout(timeout)
        connection, _ = server.accept()
        connection.settimeout(timeout)
        stream = MessageStream()
        try:
            while received < count and (data := connection.recv(1 << 20)):
                first = first or time.monotonic()
                for message in stream.feed(data):
                    received += len(decoder.decode(message, "exporter").records)
        except TimeoutError:
            pass
        report(received, first)
        try:
            while connection.recv(1 << 20):
                pass
        except (TimeoutError, ConnectionError):
            pass


def report(received: int, first: float | None) -> None:
    print(received, time.monotonic() - (first or time.monotonic()), flush=True)


if __name__ == "__main__":
    main()
