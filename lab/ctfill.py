"""Fill the current network namespace's conntrack fast: batched IPCTNL_MSG_CT_NEW messages
(~70k entries/s here; `conntrack -I` manages ~800/s).

    python -m lab.ctfill mixed COUNT        IPv4 TCP/UDP/ICMP, IPv6 UDP/ICMPv6; zones 65520, 7
    python -m lab.ctfill udp COUNT [--tcp N] COUNT UDP entries and N TCP ones, zone 65520
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Iterable, Iterator

from ovsflow.source.ctnetlink import NETLINK_NETFILTER, NLMSG_ERROR, NLMSGHDR, new_request

Entry = tuple[int, bytes, bytes, int, int, int]  # protocol, src, dst, sport, dport, zone
V4_DST = socket.inet_aton("10.255.0.1")
V6_DST = socket.inet_pton(socket.AF_INET6, "fd00::ffff")


def mixed_entry(index: int) -> Entry:
    """A deterministic mix: kind by index modulo 5, zone 7 for every third entry."""
    kind = index % 5
    v6 = kind >= 3
    src = (socket.inet_pton(socket.AF_INET6, f"fd00::{index:x}") if v6
           else (0x0A000000 + index).to_bytes(4, "big"))
    protocol = (6, 17, 1, 17, 58)[kind]
    return (protocol, src, V6_DST if v6 else V4_DST, 1024 + index % 60000, 53,
            65520 if index % 3 else 7)


def udp_tcp_entries(udp: int, tcp: int) -> Iterator[Entry]:
    for index in range(udp + tcp):
        protocol = 6 if index < tcp else 17
        yield (protocol, (0x0A000000 + index).to_bytes(4, "big"), V4_DST,
               1024 + index % 60000, 53, 65520)


def fill(entries: Iterable[Entry], batch: int = 128) -> int:
    """Create the entries; returns how many. Fails on the first entry the kernel refuses."""
    created = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        pending: list[bytes] = []

        def flush() -> None:
            sock.send(b"".join(pending))
            acks = 0
            while acks < len(pending):
                data, pos = sock.recv(1 << 16), 0
                while pos < len(data):
                    length, kind = NLMSGHDR.unpack_from(data, pos)[:2]
                    if kind == NLMSG_ERROR:
                        error = int.from_bytes(data[pos + 16:pos + 20], "little", signed=True)
                        if error:
                            raise OSError(-error, "conntrack refused an entry")
                        acks += 1
                    pos += (length + 3) & ~3
            pending.clear()

        for sequence, (protocol, src, dst, sport, dport, zone) in enumerate(entries):
            pending.append(new_request(sequence, protocol, src, dst, sport, dport, zone=zone))
            created += 1
            if len(pending) == batch:
                flush()
        if pending:
            flush()
    return created


def main() -> None:
    parser = argparse.ArgumentParser(description="fill conntrack in this namespace")
    parser.add_argument("kind", choices=["mixed", "udp"])
    parser.add_argument("count", type=int)
    parser.add_argument("--tcp", type=int, default=0, help="with udp: this many TCP too")
    args = parser.parse_args()
    if args.kind == "mixed":
        print(fill(mixed_entry(i) for i in range(args.count)))
    else:
        print(fill(udp_tcp_entries(args.count, args.tcp)))


if __name__ == "__main__":
    main()
