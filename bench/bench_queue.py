"""A collector's export queue while the collector is away, at 500k connections (issue 29):
what it costs to queue a wave of records (every connection due, as at a common active
timeout), what folding a wave into the one still waiting costs, and the queue's memory
after many waves. The records are the store's own (`ConnectionStore`, every connection due
each poll), the queue the exporter's (`ExportQueue`, its collector unreachable).

Same-run references: making the wave (store update and encode, which the poll's worker
thread does in the agent) in the same process; the waves alternate with and without the
queue (A B A B), medians.

Last, the export state written with that queue (every 10 s during an outage), against the
same state without it, in /dev/shm (a tmpfs, as /var/run is on a node).

Run: python bench/bench_queue.py [--size 500000] [--waves 5]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ovsflow.exporter.carried import PREFIX, section  # noqa: E402
from ovsflow.exporter.queue import ExportQueue  # noqa: E402
from ovsflow.polled import LABELS, Polled, key_rows  # noqa: E402
from ovsflow.store import ConnectionStore  # noqa: E402
from ovsflow.state import Origin  # noqa: E402
from ovsflow.state_file import ExportState  # noqa: E402
from ovsflow.store.table import KEYS  # noqa: E402

PIECE = 4096


def keys(count: int) -> np.ndarray:
    """`count` IPv4 TCP identities (as the kernel source makes them), each distinct, as
    `KEY` rows."""
    rows = np.zeros(count, KEYS[False])
    index = np.arange(count, dtype=np.uint64)
    rows["protocol"], rows["zone"] = 6, 65520
    rows["source_port"] = 1024 + index % 60000
    rows["destination_port"] = 80
    rows["start_ns"] = 1_700_000_000_000_000_000 + index
    rows["source_address"] = (0x0A000000 + index).astype(">u4").view("V4")
    rows["destination_address"] = np.full(count, 0x0AFF0001, ">u4").view("V4")
    raw, size = rows.tobytes(), rows.dtype.itemsize
    return key_rows([raw[at:at + size] for at in range(0, len(raw), size)])


def poll(identities: np.ndarray, round_: int) -> list[Polled]:
    """One poll: every connection moved since the one before."""
    pieces = []
    for first in range(0, len(identities), PIECE):
        n = min(PIECE, len(identities) - first)
        grown = np.full(n, round_ + 1, "u8")
        pieces.append(Polled(
            identities[first:first + n], np.full(n, 6, "u1"), np.full(n, 65520, "u2"),
            np.full(n, 80, "u2"), np.arange(first, first + n, dtype="u4"), grown,
            grown * 100, grown, grown * 200, np.ones(n, bool),
            np.full(n, 1_700_000_000 * 10**9, "u8"), np.full(n, 300, "u4"),
            np.zeros(n, "u2"), np.zeros(n, LABELS), np.zeros(n, bool), np.zeros(n, "u4")))
    return pieces


def rss_mb() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def wave(store: ConnectionStore, identities: np.ndarray, round_: int,
         queue: ExportQueue | None) -> tuple[float, float, int]:
    """A poll with every connection due: (seconds making and encoding the records,
    seconds queueing them, records)."""
    pieces = poll(identities, round_)
    queued, made = [0.0], [0]
    if queue is not None:
        queue.new_poll()

    def hand_over(batch):
        made[0] += len(batch)
        if queue is not None:
            started = time.perf_counter()
            queue.enqueue(batch)
            queued[0] += time.perf_counter() - started
    store.hand_over = hand_over
    started = time.perf_counter()
    store.update_polled(pieces, float(round_))
    return time.perf_counter() - started - queued[0], queued[0], made[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=500_000)
    parser.add_argument("--waves", type=int, default=5)
    args = parser.parse_args()
    size = args.size
    identities = keys(size)
    store = ConnectionStore(active_timeout=0.5, idle_timeout=1e9, max_connections=size)
    wave(store, identities, 0, None)  # the connections are tracked; nothing queued
    before = rss_mb()
    queue = ExportQueue(max_buffered=100_000, stall_timeout=10.0, max_waiting_live=size)
    queue.reachable = False
    round_ = 1
    make, first_queue, _ = wave(store, identities, round_, queue)
    print(f"{size} connections, every one due each poll, the collector away")
    print(f"  wave 1 into an empty queue: queueing {first_queue:.3f} s "
          f"({first_queue / size * 1e6:.2f} us a record); making it {make:.3f} s")
    alone, made, folding = [], [], []
    for _ in range(args.waves):
        round_ += 1
        alone.append(wave(store, identities, round_, None)[0])  # A: no queue
        round_ += 1
        make, queued, records = wave(store, identities, round_, queue)  # B: folds
        assert records == size and queue.queued == size, (records, queue.queued)
        made.append(make)
        folding.append(queued)
    after = rss_mb()
    backlog = queue.backlog
    data = sum(len(data) for batch in backlog.batches for _, data, _ in batch.groups)
    index = sys.getsizeof(backlog.index)
    print(f"  a wave folding into the waiting one ({args.waves} waves, medians): queueing "
          f"{statistics.median(folding):.3f} s ({statistics.median(folding) / size * 1e6:.2f}"
          f" us a record, spread {min(folding):.3f}-{max(folding):.3f} s); making it "
          f"{statistics.median(made):.3f} s; the same wave made with no queue "
          f"{statistics.median(alone):.3f} s (spread {min(alone):.3f}-{max(alone):.3f} s)")
    print(f"  queueing / making: {statistics.median(folding) / statistics.median(alone):.2f}x")
    print(f"  after {args.waves + 1} waves: {queue.queued} records waiting (one per "
          f"connection), {queue.stats.records_folded} folded, "
          f"{queue.stats.records_dropped} dropped")
    print(f"  queue memory: RSS +{after - before:.1f} MB ({(after - before) * 2**20 / size:.0f}"
          f" bytes a connection); of it records' bytes {data / 2**20:.1f} MB, the index "
          f"dict {index / 2**20:.1f} MB and its tickets {size * 32 / 2**20:.1f} MB; "
          f"{len(backlog.batches)} batches")
    directory = tempfile.mkdtemp(prefix="ovsflow-bench-queue-", dir="/dev/shm")
    try:
        state = ExportState(directory, Origin("bench", 1, "node", 1))
        times = {"without": [], "with": []}
        sizes = {}
        for _ in range(3):
            for kind in times:
                sections = {"conntrack": store.snapshot("kernel")}
                if kind == "with":
                    sections[PREFIX + "collector"] = section("collector", queue.snapshot())
                started = time.perf_counter()
                assert state.save(sections, 0.0)
                times[kind].append(time.perf_counter() - started)
                sizes[kind] = os.path.getsize(state.path) / 2**20
        print(f"  the export state with this queue: {statistics.median(times['with']):.2f} s, "
              f"{sizes['with']:.0f} MB; without it {statistics.median(times['without']):.2f} s,"
              f" {sizes['without']:.0f} MB (medians of 3, alternating)")
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
