"""Traffic for the tests, run inside a network namespace with `python traffic.py KIND ...`.

    tcp-server PORT REPLY_BYTES          accept one connection, read to EOF, send, close
    tcp-client HOST PORT CHUNK COUNT PAUSE   send COUNT chunks with PAUSE seconds between,
                                         then half-close and read the reply to EOF
    tcp-syn HOST PORT                    one connection attempt (refused is fine)
    udp HOST PORT COUNT SIZE [SPORT]     datagrams (from source port SPORT)
    sctp-init SRC DST SPORT DPORT        one SCTP INIT chunk through a raw socket (this
                                         machine has no SCTP sockets)
    gre SRC DST                          one GRE packet through a raw socket
    steady-server PORT REPLY             accept connections; answer each chunk read with
                                         REPLY bytes, until the peer closes
    steady-clients HOST PORT COUNT CHUNK PAUSE CONTROL
                                         COUNT connections, each sending CHUNK bytes every
                                         PAUSE seconds until the file CONTROL/stop exists,
                                         then idle and open until CONTROL/close exists;
                                         prints its ports first
    reopen-server PORT                   per connection: read a 4-byte length and that many
                                         bytes, answer "ok" and close first
    reopen-client HOST PORT SPORT COUNT GAP
                                         COUNT connections in a row from source port SPORT,
                                         the i-th sending i * 1000 bytes, GAP seconds apart
Prints one line of JSON about what it did.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), for the SCTP checksum."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def tcp_server(port: str, reply_bytes: str) -> dict:
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", int(port)))
        server.listen()
        print(json.dumps({"listening": int(port)}), flush=True)
        connection, peer = server.accept()
        received = 0
        while chunk := connection.recv(65536):
            received += len(chunk)
        connection.sendall(b"r" * int(reply_bytes))
        connection.close()
    return {"received": received}


def tcp_client(host: str, port: str, chunk: str, count: str, pause: str) -> dict:
    with socket.create_connection((host, int(port)), timeout=30) as client:
        for index in range(int(count)):
            if index:
                time.sleep(float(pause))
            client.sendall(b"c" * int(chunk))
        client.shutdown(socket.SHUT_WR)
        received = 0
        while data := client.recv(65536):
            received += len(data)
        return {"sent": int(chunk) * int(count), "received": received,
                "sport": client.getsockname()[1]}


def tcp_syn(host: str, port: str) -> dict:
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return {"connected": True}
    except OSError as err:
        return {"connected": False, "error": err.strerror}


def udp(host: str, port: str, count: str, size: str, sport: str = "0") -> dict:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.bind(("0.0.0.0", int(sport)))
        for _ in range(int(count)):
            sender.sendto(b"u" * int(size), (host, int(port)))
        return {"sport": sender.getsockname()[1]}


def sctp_init(src: str, dst: str, sport: str, dport: str) -> dict:
    chunk = struct.pack("!BBHIIHHI", 1, 0, 20, 0x1234567, 65535, 10, 10, 1)
    header = struct.pack("!HHII", int(sport), int(dport), 0, 0)
    checksum = crc32c(header + chunk)
    packet = header[:8] + struct.pack("<I", checksum) + chunk
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_SCTP) as raw:
        raw.bind((src, 0))
        raw.sendto(packet, (dst, 0))
    return {"sent": len(packet)}


def gre(src: str, dst: str) -> dict:
    packet = struct.pack("!HH", 0, 0x0800) + b"\x45" + bytes(19)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, 47) as raw:
        raw.bind((src, 0))
        raw.sendto(packet, (dst, 0))
    return {"sent": len(packet)}


def steady_server(port: str, reply: str) -> dict:
    import threading

    def serve(connection: socket.socket) -> None:
        with connection:
            while connection.recv(65536):
                connection.sendall(b"s" * int(reply))

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", int(port)))
    server.listen(128)
    print(json.dumps({"listening": server.getsockname()[1]}), flush=True)
    while True:
        connection, _ = server.accept()
        threading.Thread(target=serve, args=(connection,), daemon=True).start()


def steady_clients(host: str, port: str, count: str, chunk: str, pause: str,
                   control: str) -> dict:
    from pathlib import Path

    clients = [socket.create_connection((host, int(port)), timeout=30)
               for _ in range(int(count))]
    print(json.dumps({"ports": [c.getsockname()[1] for c in clients]}), flush=True)
    sent = 0
    while not Path(control, "stop").exists():
        for client in clients:
            client.sendall(b"c" * int(chunk))
            client.recv(65536)
            sent += int(chunk)
        time.sleep(float(pause))
    while not Path(control, "close").exists():
        time.sleep(0.1)
    for client in clients:
        client.close()
    return {"sent": sent}


def reopen_server(port: str) -> dict:
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", int(port)))
        server.listen()
        print(json.dumps({"listening": int(port)}), flush=True)
        while True:
            connection, _ = server.accept()
            with connection:
                wanted = struct.unpack("!I", connection.recv(4, socket.MSG_WAITALL))[0]
                connection.recv(wanted, socket.MSG_WAITALL)
                connection.sendall(b"ok")
            # closed first: this side keeps the tuple in TIME_WAIT


def reopen_client(host: str, port: str, sport: str, count: str, gap: str) -> dict:
    for index in range(1, int(count) + 1):
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            client.bind(("0.0.0.0", int(sport)))
            client.connect((host, int(port)))
            client.sendall(struct.pack("!I", index * 1000) + b"r" * (index * 1000))
            while client.recv(65536):
                pass
        time.sleep(float(gap))
    return {"connections": int(count)}


KINDS = {"steady-server": steady_server, "steady-clients": steady_clients,
         "reopen-server": reopen_server, "reopen-client": reopen_client,"tcp-server": tcp_server, "tcp-client": tcp_client, "tcp-syn": tcp_syn, "udp": udp,
         "sctp-init": sctp_init, "gre": gre}

if __name__ == "__main__":
    print(json.dumps(KINDS[sys.argv[1]](*sys.argv[2:])), flush=True)
