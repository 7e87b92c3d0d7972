"""Connection store update, in Antrea's benchmark shape: N connections, each poll 10% new and
10% gone, the rest with grown counters. Prints ms per poll (store.update only: the
connections are decoded beforehand, as the poll hands them over). Target at 10k: <= 9 ms
(Antrea's Go figure for the same shape); 100k shows how it scales.

Run: python bench/bench_store.py
"""

from __future__ import annotations

import argparse
import gc
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ovsflow.connection import Connection  # noqa: E402
from ovsflow.store import ConnectionStore  # noqa: E402

DST = socket.inet_aton("10.255.0.1")


def poll(first: int, count: int, round_: int) -> list[Connection]:
    return [Connection(6, (0x0A000000 + i).to_bytes(4, "big"), DST, 1024 + i % 60000, 80,
                       DST, (0x0A000000 + i).to_bytes(4, "big"), 80, 1024 + i % 60000,
                       zone=65520, state="ESTABLISHED", packets=round_ + 1,
                       octets=100 * (round_ + 1), reply_packets=round_, id=i)
            for i in range(first, first + count)]


def run(size: int, polls: int) -> tuple[float, float]:
    churn = size // 10
    store = ConnectionStore(active_timeout=5.0, idle_timeout=15.0)
    store.update(poll(0, size, 0), 0.0)
    times, records = [], 0
    for round_ in range(1, polls + 1):
        connections = poll(round_ * churn, size, round_)  # 1/10 gone, 1/10 new
        gc.collect()
        start = time.perf_counter()
        records += len(store.update(connections, float(round_)))
        times.append(time.perf_counter() - start)
        assert len(store) == size
    return statistics.median(times) * 1000, min(times) * 1000, records / polls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=15)
    args = parser.parse_args()
    for size in (10_000, 100_000):
        ms, best, records = run(size, args.polls)
        verdict = f"  target <= 9 ms: {'met' if ms <= 9 else 'NOT met'}" if size == 10_000 else ""
        print(f"store update, {size:>6} connections ({size // 10} new, {size // 10} gone per "
              f"poll): median {ms:.1f} ms, best {best:.1f} ms per poll, {records:.0f} records "
              f"per poll{verdict}")


if __name__ == "__main__":
    main()
