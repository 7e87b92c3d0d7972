"""IPFIX collectors for tests that ovsflow's own decoder has no part in: a process (in a
network namespace, where the agent exports) writes every datagram (`DatagramSink`) or every
TCP connection's bytes (`StreamSink`) it receives to files, and the PyPI `ipfix` package
decodes them."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
from pathlib import Path

import ipfix.message
import ipfix.reader

from helpers import ipfix_package_records, use_antrea_information_model

_RECEIVER = """
import signal, socket, struct, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
sock.bind(("127.0.0.1", int(sys.argv[2])))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(sock.getsockname()[1], flush=True)
with open(sys.argv[1], "ab", buffering=0) as out:
    while True:
        data = sock.recv(65535)
        out.write(struct.pack("<I", len(data)) + data)
"""


class DatagramSink:
    def __init__(self, path: Path, prefix: list[str] | None = None, port: int = 0):
        self.path = path
        path.touch()
        self.process = subprocess.Popen([*(prefix or []), sys.executable, "-c", _RECEIVER,
                                         str(path), str(port)], stdout=subprocess.PIPE,
                                        text=True)
        self.port = int(self.process.stdout.readline())
        use_antrea_information_model()

    def records(self, options: bool = False) -> list[dict]:
        """Every flow record received so far (with `options`, every options record), as
        the `ipfix` package names their fields."""
        records = []
        buffer = ipfix.message.MessageBuffer()
        for datagram in self.datagrams():
            buffer.from_bytes(datagram)
            records += ipfix_package_records(buffer, options)
        return records

    def datagrams(self) -> list[bytes]:
        """Every datagram received so far, in order."""
        data, pos, datagrams = self.path.read_bytes(), 0, []
        while pos + 4 <= len(data):
            (length,) = struct.unpack_from("<I", data, pos)
            if pos + 4 + length > len(data):
                break
            datagrams.append(data[pos + 4:pos + 4 + length])
            pos += 4 + length
        return datagrams

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


_STREAM_RECEIVER = """
import os, signal, socket, sys, threading
directory, port = sys.argv[1], int(sys.argv[2])
server = socket.create_server(("127.0.0.1", port))
server.settimeout(0.1)
stopping = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopping.set())
print(server.getsockname()[1], flush=True)
connections, readers = [], []

def read(connection, path):
    with open(path, "ab", buffering=0) as out:
        while data := connection.recv(65536):
            out.write(data)
    connection.close()

while not stopping.is_set():
    try:
        connection, _ = server.accept()
    except (TimeoutError, InterruptedError):
        continue
    connection.settimeout(None)
    path = os.path.join(directory, f"{os.getpid()}-{len(connections):03d}.ipfix")
    connections.append(connection)
    readers.append(threading.Thread(target=read, args=(connection, path)))
    readers[-1].start()
server.close()
for connection in connections:  # going away: the exporter sees the end and stops writing
    try:
        connection.shutdown(socket.SHUT_WR)
    except OSError:
        pass
for reader in readers:  # everything it wrote before it saw the end is read
    reader.join(timeout=20)
"""


class StreamSink:
    """A TCP collector that can go away (`stop`: it closes its side of each connection,
    so the exporter sees the end, and reads what was sent before that) and come back on
    the same port (`start`)."""

    def __init__(self, directory: Path, prefix: list[str] | None = None):
        self.directory, self.prefix, self.port = directory, prefix or [], 0
        directory.mkdir(exist_ok=True)
        self.process: subprocess.Popen | None = None
        use_antrea_information_model()
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen([*self.prefix, sys.executable, "-c", _STREAM_RECEIVER,
                                         str(self.directory), str(self.port)],
                                        stdout=subprocess.PIPE, text=True)
        self.port = int(self.process.stdout.readline())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)

    def records(self) -> list[dict]:
        """Every data record of every connection so far. The package stops at a session's
        end, where ovsflow withdraws its templates (RFC 7011 §8.1: a template set of id 2
        and no fields, which it calls a bad template id), and at a message cut short."""
        records = []
        for path in sorted(self.directory.glob("*.ipfix")):
            with open(path, "rb") as stream:
                try:
                    for record in ipfix.reader.from_stream(stream).namedict_iterator():
                        records.append(dict(record))
                except (EOFError, ValueError, struct.error):
                    pass
        return records
