"""ovs-ofctl as a reference for OpenFlow bytes: what it sends for a command (`ofctl_sends`,
byte for byte) and how it reads messages we wrote (`ofp_parse`). Framed here with struct,
not with the codec under test."""

from __future__ import annotations

import socket
import struct
import subprocess
from pathlib import Path

HELLO, BARRIER_REQUEST, BARRIER_REPLY = 0, 20, 21
MULTIPART_REQUEST, MULTIPART_REPLY, TABLE_FEATURES = 18, 19, 12
OPENFLOW = {0x04: "OpenFlow13", 0x06: "OpenFlow15"}


def ofp_parse(directory: Path, *encoded: bytes) -> list[str]:
    """ovs-ofctl's own decoding of our messages, one line per line it prints."""
    path = directory / "messages.bin"
    path.write_bytes(b"".join(encoded))
    result = subprocess.run(["ovs-ofctl", "ofp-parse", str(path)], capture_output=True,
                            text=True, timeout=30, check=True)
    return result.stdout.splitlines()


def ofctl_sends(directory: Path, *args: str, complete: bool = True) -> list[bytes]:
    """Every message `ovs-ofctl --no-names ARGS` sends (SWITCH in ARGS stands for the
    target), HELLO first, to a scripted switch on a unix socket: it offers OpenFlow 1.3 and
    1.5, answers barriers, and answers a multipart request with an empty last part (a table
    features request with one bare table, the least ovs-ofctl takes to look up names).
    `complete=False`: the command may fail on that answer (dump-table-features wants every
    property); its request was sent all the same."""
    path = str(directory / "switch.sock")
    Path(path).unlink(missing_ok=True)  # the previous command's
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    server.settimeout(10)
    process = subprocess.Popen(
        ["ovs-ofctl", "--no-names", *(a.replace("SWITCH", f"unix:{path}") for a in args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent: list[bytes] = []
    try:
        connection, _ = server.accept()
        with connection:
            connection.settimeout(10)
            connection.sendall(struct.pack("!BBHIHHI", 6, HELLO, 16, 1, 1, 8, 1 << 4 | 1 << 6))
            buffer = b""
            while data := connection.recv(65536):
                buffer += data
                while len(buffer) >= 8 and len(buffer) >= struct.unpack_from("!H", buffer, 2)[0]:
                    length = struct.unpack_from("!H", buffer, 2)[0]
                    message, buffer = buffer[:length], buffer[length:]
                    sent.append(message)
                    connection.sendall(_answer(message))
    finally:
        server.close()
        _, errors = process.communicate(timeout=10)
    assert process.returncode == 0 or not complete, errors
    return sent


def _answer(message: bytes) -> bytes:
    version, kind, _, xid = struct.unpack_from("!BBHI", message)
    if kind == BARRIER_REQUEST:
        return struct.pack("!BBHI", version, BARRIER_REPLY, 8, xid)
    if kind == MULTIPART_REQUEST:
        multipart = struct.unpack_from("!H", message, 8)[0]
        body = struct.pack("!HB5x32sQQII", 64, 0, b"", 0, 0, 0, 0) \
            if multipart == TABLE_FEATURES else b""
        return struct.pack("!BBHIHH4x", version, MULTIPART_REPLY, 16 + len(body), xid,
                           multipart, 0) + body
    return b""
