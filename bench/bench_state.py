"""Export state: writing and reading it at 100k and 500k tracked connections (issue 18).
Each size runs in a fresh process, so that the peak RSS it adds is its own: the store is
filled and exported once, then the state is written (as the agent does: the snapshot and
the file, in one call) and read back (the file, decoded, restored into a new store), in
/dev/shm: a tmpfs, as /var/run, the default state directory, is on a node.
Targets: <= 150 ms to write 500k (off the event loop: the agent writes in the poll's
worker thread), <= 10 MB added to the peak RSS by the write (measured as the write's peak
allocation, with tracemalloc: the whole table's RSS peak was set when it was filled). Reference in the same run:
writing the same number of bytes with one `write` (the floor of any format).

Run: python bench/bench_state.py [--sizes 100000 500000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ovsflow.connection import Connection, identity  # noqa: E402
from ovsflow.state import Origin  # noqa: E402
from ovsflow.state_file import ExportState  # noqa: E402
from ovsflow.store import ConnectionStore  # noqa: E402

DST = (0x0AFF0001).to_bytes(4, "big")


def connections(size: int) -> list[Connection]:
    made = []
    for i in range(size):
        source = (0x0A000000 + i).to_bytes(4, "big")
        made.append(Connection(6, source, DST, 1024 + i % 60000, 80, DST, source, 80,
                               1024 + i % 60000, zone=65520, state="ESTABLISHED",
                               packets=10 + i % 7, octets=1000 + i, reply_packets=9,
                               reply_octets=900, id=i, start_ns=1_700_000_000 * 10**9 + i,
                               key=identity(6, source, DST, 1024 + i % 60000, 80, 0, 0, 0,
                                            65520, 1_700_000_000 * 10**9 + i)))
    return made


def one_size(size: int, rounds: int) -> dict:
    store = ConnectionStore(5.0, 15.0, max_connections=size)
    polled = connections(size)
    store.update(polled, 0.0)
    store.update(polled, 5.0)  # every connection exported once
    del polled
    # a tmpfs, as the default /var/run/ovsflow is on a node
    directory = tempfile.mkdtemp(prefix="ovsflow-bench-state-", dir="/dev/shm")
    state = ExportState(directory, Origin("bench", 1, "node", 1))
    writes = []
    for _ in range(rounds):
        started = time.perf_counter()
        assert state.save({"conntrack": store.snapshot("kernel")}, 5.0)
        writes.append(time.perf_counter() - started)
    # what the write allocates at its peak (Python and numpy report to tracemalloc): the RSS
    # it adds when nothing freed before can take it
    tracemalloc.start()
    assert state.save({"conntrack": store.snapshot("kernel")}, 5.0)
    added = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    size_bytes = os.path.getsize(state.path)
    reference = []
    blob = os.urandom(size_bytes)
    for _ in range(rounds):
        started = time.perf_counter()
        with open(state.path + ".ref", "wb") as file:
            file.write(blob)
            file.flush()
            os.fsync(file.fileno())
        reference.append(time.perf_counter() - started)
    del blob
    reads = []
    for _ in range(rounds):
        started = time.perf_counter()
        loaded = ExportState(directory, state.origin)
        loaded.load()
        section = loaded.take("conntrack", "kernel")
        restored = ConnectionStore(5.0, 15.0, max_connections=size)
        assert sum(restored.restore(keys, rows, section.written_at)
                   for keys, rows in section.parts) == size
        reads.append(time.perf_counter() - started)
        del loaded, section, restored
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)
    return {"size": size, "write_ms": statistics.median(writes) * 1000,
            "reference_ms": statistics.median(reference) * 1000,
            "read_ms": statistics.median(reads) * 1000, "added_mb": added,
            "file_mb": size_bytes / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 500_000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.rounds)))
        return
    for size in args.sizes:
        result = json.loads(subprocess.run(
            [sys.executable, __file__, "--one", str(size), "--rounds", str(args.rounds)],
            capture_output=True, text=True, check=True).stdout)
        verdict = ""
        if size == 500_000:
            verdict = (f"  targets: write <= 150 ms {'met' if result['write_ms'] <= 150 else 'NOT met'}"
                       f", peak +<= 10 MB {'met' if result['added_mb'] <= 10 else 'NOT met'}")
        print(f"export state, {size:>6} connections: write {result['write_ms']:.0f} ms "
              f"(one plain write of the same {result['file_mb']:.1f} MB: "
              f"{result['reference_ms']:.0f} ms, {result['write_ms'] / result['reference_ms']:.1f}x), "
              f"read and restore {result['read_ms']:.0f} ms, the write's peak allocation "
              f"{result['added_mb']:.1f} MB{verdict}")


if __name__ == "__main__":
    main()
