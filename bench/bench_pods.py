"""The OVSDB Pod map (ovsflow/pods.py) with a large Port table: how long the first load takes,
how much it stalls an asyncio loop running beside it (the agent's), what a lookup costs, and
how soon a Pod added to the full table is seen.

Runs ovsdb-server (no ovs-vswitchd: no datapath opens 10k ports) in a private run directory,
in a network namespace of its own; needs root and Open vSwitch installed.

Run: python bench/bench_pods.py [--ports 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import ipaddress
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.ovs_lab import OvsLab, pod_external_ids  # noqa: E402
from ovsflow.connection import Connection, identity  # noqa: E402
from ovsflow.enrich import Enricher, PodNetworks  # noqa: E402
from ovsflow.pods import PodMap  # noqa: E402
from ovsflow.store import ConnectionStore  # noqa: E402

RECORDS_DUE = 10_000


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def loop_stalls(done: threading.Event) -> tuple[float, int]:
    """The longest time a 1 ms sleep took beyond its 1 ms while `done` was not set, and how
    many sleeps ran: what the map's thread costs the event loop."""
    worst, count = 0.0, 0
    while not done.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        worst = max(worst, time.perf_counter() - started - 0.001)
        count += 1
    return worst, count


def polls_with_records_due(enricher: Enricher, sources: list[bytes],
                           pods: PodMap | None) -> list[float]:
    """Seconds of three store updates in which RECORDS_DUE connections (from `sources` to a
    Pod) all come due: their first records (Pods looked up, each distinct run of strings
    encoded: here every connection has its own Pod), the next ones (nothing changed: what
    was found is reused), and the next after a change elsewhere in the Pod map (each
    connection's Pods looked up again, found the same)."""
    destination = sources[0]
    connections = [Connection(6, source, destination, 1024 + index % 60000, 80,
                              state="ESTABLISHED", packets=2, reply_packets=1, id=index,
                              key=identity(6, source, destination, 1024 + index % 60000, 80,
                                           0, 0, 0, 0))
                   for index, source in enumerate(sources[:RECORDS_DUE])]
    # a heartbeat of 1 s: the connections do not move, and every one is due at each update
    store = ConnectionStore(1.0, 60.0, enricher=enricher, heartbeat=1.0)
    store.update(connections, 0.0)
    timings = []
    for now in (1.0, 2.0, 3.0):
        if now == 3.0 and pods is not None:
            pods.changes += 1  # as a Pod added or deleted elsewhere makes it
        started = time.perf_counter()
        records = store.update(connections, now)
        timings.append(time.perf_counter() - started)
        made = sum(map(len, records))
        assert made == len(connections), made
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=10_000)
    args = parser.parse_args()
    json_parser = "C (ovs._json)" if importlib.util.find_spec("ovs._json") else "pure Python"
    print(f"python-ovs {json_parser} JSON parser; {args.ports} Pod ports")
    with tempfile.TemporaryDirectory(prefix="bench-pods-") as directory:
        lab = OvsLab(Path(directory) / "ovs", switch=False)
        pods = PodMap(f"unix:{lab.run_dir}/db.sock")
        try:
            started = time.perf_counter()
            addresses = lab.add_pod_rows(args.ports, "10.128.0.1")
            print(f"inserting the ports (one transaction):   {time.perf_counter() - started:.2f} s")

            async def load() -> tuple[float, float, int]:
                started = time.perf_counter()
                pods.start()
                stalls = asyncio.create_task(loop_stalls(pods.synced))
                await asyncio.to_thread(pods.synced.wait, 300)
                loaded = time.perf_counter() - started
                worst, count = await stalls
                return loaded, worst, count

            rss_before = rss_mb()
            loaded, worst, count = asyncio.run(load())
            assert len(pods) == args.ports, len(pods)
            print(f"initial load (start -> all {len(pods)} addresses): {loaded:.2f} s")
            print(f"resident memory added (IDL replica + map): {rss_mb() - rss_before:.0f} MB")
            print(f"event loop beside it: worst extra delay {worst * 1000:.1f} ms over "
                  f"{count} 1-ms sleeps")

            hit = ipaddress.ip_address(addresses[len(addresses) // 2]).packed
            miss = ipaddress.ip_address("192.0.2.1").packed
            for name, address in (("hit", hit), ("miss", miss)):
                runs = 1_000_000
                seconds = min(timeit.repeat(lambda: pods.lookup(address), number=runs,
                                            repeat=3))
                print(f"lookup ({name}):                          "
                      f"{seconds / runs * 1e9:.0f} ns")

            packed_sources = [ipaddress.ip_address(a).packed for a in addresses]
            networks = PodNetworks(["10.128.0.0/16"])
            timings = {name: [min(runs) for runs in zip(*(
                polls_with_records_due(Enricher(map_, "node", networks), packed_sources, map_)
                for _ in range(5)))]
                for name, map_ in (("without a Pod map", None), ("with the map", pods))}
            for name, (first, again, changed) in timings.items():
                print(f"a poll with {RECORDS_DUE} records due, {name}: first records "
                      f"{first * 1000:.1f} ms, next {again * 1000:.1f} ms, next after a change "
                      f"elsewhere in the map {changed * 1000:.1f} ms")
            extra = [with_map - without for with_map, without in zip(
                timings["with the map"], timings["without a Pod map"])]
            print("  Pod names and flowType cost per record: " + ", ".join(
                f"{label} {seconds / RECORDS_DUE * 1e6:.2f} us" for label, seconds in zip(
                    ("first", "next", "after a change"), extra))
                + " (connections not due cost nothing: the map is read only for records)")

            ids = pod_external_ids("late", "bench", ["10.255.255.1"], "02:00:00:00:00:09",
                                   "/x")
            started = time.perf_counter()
            lab.vsctl("--no-wait", "--", "--id=@i", "create", "Interface", "name=late",
                      "--", "--id=@p", "create", "Port", "name=late", "interfaces=@i",
                      *(f'external_ids:{k}="{v}"' for k, v in ids.items()),
                      "--", "add", "Bridge", lab.bridge, "ports", "@p")
            late = ipaddress.ip_address("10.255.255.1").packed
            while pods.lookup(late) is None:
                time.sleep(0.001)
            print(f"one Pod added to the full table, seen after: "
                  f"{(time.perf_counter() - started) * 1000:.0f} ms (ovs-vsctl included)")
        finally:
            pods.stop()
            lab.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
