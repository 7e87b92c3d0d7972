"""The floor of any conntrack poller: the CPU of the kernel's own dump of the table, received
and thrown away (no decoding), as the agent asks for it (one dump of zone 65520, its receive
size). Prints the median CPU seconds (user + system) and wall seconds of --dumps dumps.
`bench_agent.py` runs it in its namespace as the reference of its CPU figures.

Needs CAP_NET_ADMIN in the table's network namespace. Run: python bench/kernel_dump.py
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ovsflow.source.ctnetlink import NETLINK_NETFILTER, dump_request  # noqa: E402
from ovsflow.source.kernel import RECEIVE_SIZE, SOCKET_BUFFER  # noqa: E402

NLMSG_ERROR, NLMSG_DONE = 2, 3
_HEADER = struct.Struct("=IHHII")


def dump(sock: socket.socket, sequence: int) -> int:
    """One dump; returns the bytes received. Its end is the NLMSG_DONE message (20 bytes)
    the kernel puts last in the last buffer: looked for at each buffer's tail only, so that
    nothing but the kernel's side is measured."""
    sock.send(dump_request(sequence, 0, 65520))
    received = 0
    while True:
        data = sock.recv(RECEIVE_SIZE)
        received += len(data)
        if _HEADER.unpack_from(data)[1] == NLMSG_ERROR:
            raise OSError(f"the dump failed: {data[16:20].hex()}")
        length, kind = _HEADER.unpack_from(data, len(data) - 20)[:2]
        if (length, kind) == (20, NLMSG_DONE):
            return received

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dumps", type=int, default=5)
    parser.add_argument("--interval", type=float, default=0.0,
                        help="seconds from one dump's start to the next (an agent's polls)")
    args = parser.parse_args()
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.bind((0, 0))
    cpu, wall = [], []
    for sequence in range(1, args.dumps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        received = dump(sock, sequence)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start)
        if sequence < args.dumps:
            time.sleep(max(0.0, start + args.interval - time.perf_counter()))
    print(f"{statistics.median(cpu):.4f} {statistics.median(wall):.4f} {received}")


if __name__ == "__main__":
    main()
