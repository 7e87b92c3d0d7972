"""Service ports in the conntrack poll (issue 32): what a list of ports costs against a list
of protocols, and whether the kernel or userspace should filter the ports.

A network namespace's conntrack holds 100k entries (zone 65520, IPv4): --tcp TCP ones
(90k), the rest UDP. Of the TCP ones, ports 1001-1032 hold --share of them each (0.5%), the
rest are spread over 900 other destination ports. The agent's poll cycle in process (dump,
decode, filter, store update; nothing due: the store saw the same table the poll before) is
timed, wall and CPU (user + system: the kernel's side of a dump runs in our recv calls),
for:

  reference   protocols: [tcp]                  one dump, kernel-filtered by protocol
  10 planned  protocols: [tcp/1001, ... 1010]  as ovsflow plans it (MAX_EXTRA_PORT_DUMPS)
  N kernel    protocols: [tcp/1001, ... N]     a dump per port (the kernel's port filter)
  N userspace the same list                    one tcp dump, the ports checked in userspace

for N = 1 .. 32, all variants of one round run one after the other and the rounds
repeated (A B C A B C ...), medians of --runs. Also the userspace filter alone over the
whole unfiltered table: 10 ports against the same 10 and 10,000 more where no entry is
(tcp/20000-29999), which keep the same entries: its cost must not grow with the number of
ports. MAX_EXTRA_PORT_DUMPS in
ovsflow/source/kernel.py is set from where the kernel's dumps stop being cheaper.

Needs root (a network namespace). Run: python bench/bench_ports.py [--share 0.005]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.netns import Netns  # noqa: E402

PORT_COUNTS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 32)
LISTED = range(1001, 1033)  # the ports a list may name
ENTRIES = 100_000


def table(share: float, tcp: int):
    """(protocol, source, destination, sport, dport, zone) of every entry."""
    from lab.ctfill import V4_DST
    listed_each = int(tcp * share)
    rest = tcp - listed_each * len(LISTED)
    dports = [port for port in LISTED for _ in range(listed_each)] + \
        [2000 + index % 900 for index in range(rest)]
    for index, dport in enumerate(dports):
        yield (6, (0x0A000000 + index).to_bytes(4, "big"), V4_DST, 1024 + index % 60000,
               dport, 65520)
    for index in range(ENTRIES - tcp):
        yield (17, (0x0B000000 + index).to_bytes(4, "big"), V4_DST, 1024 + index % 60000, 53,
               65520)


def worker(runs: int) -> None:
    """In the namespace: every variant's poll cycle, alternating; prints JSON."""
    import dataclasses
    import gc

    from ovsflow.filter import ConnectionFilter
    from ovsflow.protocols import ALL_PROTOCOLS
    from ovsflow.protocol_list import parse_protocol_list
    from ovsflow.source import kernel as kernel_module
    from ovsflow.source.kernel import KernelSource, probe_filters
    from ovsflow.store import ConnectionStore

    kernel = probe_filters()
    assert 6 in kernel.ports, f"this kernel does not filter TCP ports: {kernel}"
    no_ports = dataclasses.replace(kernel, ports=frozenset())

    def source(entries, filters):
        f = ConnectionFilter(frozenset({65520}), parse_protocol_list(entries).protocols)
        return KernelSource(f, filters), ConnectionStore(5.0, 15.0, 1_000_000)

    ten = [f"tcp/{port}" for port in LISTED[:10]]
    variants = {"reference": source(["tcp"], kernel), "10 planned": source(ten, kernel)}
    # then every plan as asked: the caps are what this measures
    kernel_module.MAX_EXTRA_PORT_DUMPS = kernel_module.MAX_FILTERED_DUMPS = 1 << 16
    for count in PORT_COUNTS:
        ports = [f"tcp/{port}" for port in LISTED[:count]]
        variants[f"{count} kernel"] = source(ports, kernel)
        variants[f"{count} userspace"] = source(ports, no_ports)
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    tracked, dumps = {}, {}
    gc.disable()
    for run in range(runs + 1):
        for name, (poller, store) in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            store.update_polled(poller.pieces(), float(run))
            if run:  # the first poll of each fills its store: not timed
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            tracked[name], dumps[name] = len(store), len(poller.dumps)
            gc.collect()

    everything = KernelSource(ConnectionFilter(frozenset(), ALL_PROTOCOLS), kernel)
    whole = list(everything.pieces())
    filters = {"protocols only": ["tcp", "udp"], "10 ports": [*ten, "udp"],
               "10,010 ports": [*ten, "tcp/20000-29999", "udp"]}
    filtering: dict[str, list[float]] = {name: [] for name in filters}
    for _ in range(runs):
        for name, entries in filters.items():
            f = ConnectionFilter(frozenset({65520}), parse_protocol_list(entries).protocols)
            start = time.perf_counter()
            kept = sum(len(f.apply_polled(piece)) for piece in whole)
            filtering[name].append(time.perf_counter() - start)
    print(json.dumps({
        "kernel": os.uname().release, "probe": kernel.to_json(),
        "entries": sum(map(len, whole)),
        "poll": {name: {"wall": statistics.median(wall[name]),
                        "cpu": statistics.median(cpu[name]), "tracked": tracked[name],
                        "dumps": dumps[name]} for name in variants},
        "filter": {name: statistics.median(times) for name, times in filtering.items()},
        "filter kept (last)": kept}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--share", type=float, default=0.005,
                        help="share of the TCP entries on each of ports 1001-1032")
    parser.add_argument("--tcp", type=int, default=90_000, help="TCP entries of the 100k")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.runs)
        return
    os.chdir(ROOT)
    ns = Netns("bench-ports")
    try:
        ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1",
               "net.netfilter.nf_conntrack_timestamp=1")
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                "from lab.ctfill import fill\n"
                "from bench.bench_ports import table\n"
                f"print(fill(table({args.share}, {args.tcp})))\n")
        created = int(ns.run(sys.executable, "-c", code).stdout)
        out = subprocess.run([*ns.prefix(), sys.executable, __file__, "--worker", "--runs",
                              str(args.runs)], capture_output=True, text=True, check=True,
                             timeout=3600).stdout
    finally:
        ns.delete()
    result = json.loads(out)
    poll = result["poll"]
    reference = poll["reference"]
    print(f"machine: {os.cpu_count()} cpus, kernel {result['kernel']}, probe "
          f"{result['probe']}; {created} entries ({args.tcp} tcp, the rest udp), "
          f"{args.share:.1%} of the tcp ones on each of ports 1001-1032; medians of "
          f"{args.runs} alternating runs")
    for name, label in (("reference", "reference, protocols [tcp]"),
                        ("10 planned", "10 tcp ports, as ovsflow plans them")):
        figures = poll[name]
        print(f"{label}: poll cycle {figures['wall'] * 1000:.0f} ms wall, "
              f"{figures['cpu'] * 1000:.0f} ms CPU ({figures['cpu'] / reference['cpu']:.2f}x "
              f"the reference), {figures['tracked']} tracked, {figures['dumps']} dump(s)")
    print("\nN tcp ports | kernel: dumps, wall, CPU | userspace: wall, CPU | kernel/userspace "
          "CPU | tracked | userspace CPU / reference")
    for count in PORT_COUNTS:
        k, u = poll[f"{count} kernel"], poll[f"{count} userspace"]
        print(f"{count:>11} | {k['dumps']:>3} {k['wall'] * 1000:>6.0f} ms "
              f"{k['cpu'] * 1000:>6.0f} ms"
              f" | {u['wall'] * 1000:>6.0f} ms {u['cpu'] * 1000:>6.0f} ms | "
              f"{k['cpu'] / u['cpu']:>5.2f}x | {k['tracked']:>6} | "
              f"{u['cpu'] / reference['cpu']:.2f}x")
    filters = result["filter"]
    print(f"\nuserspace filter alone over the unfiltered {result['entries']} entries: "
          + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in filters.items())
          + " (protocols only keeps every entry: nothing to select)")


if __name__ == "__main__":
    main()
