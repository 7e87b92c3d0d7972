"""An IPFIX collector for tests that ovsflow's own decoder has no part in: a process (in a
network namespace, where the agent exports) writes every datagram it receives to a file,
and the PyPI `ipfix` package decodes them."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
from pathlib import Path

import ipfix.message

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
