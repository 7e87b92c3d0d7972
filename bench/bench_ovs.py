"""The OVS userspace source at node scale (issue 21), against ovs-vswitchd's own dump of the
same table in the same run.

The table: ovs-vswitchd (userspace datapath) in a private run directory (lab/ovs_lab.py),
one pod whose raw UDP frames (AF_PACKET, --size distinct tuples: 250 source addresses,
one destination address per 250 entries) go through `ct(commit,zone=65520)` and are
dropped; a zone timeout policy (600 s for UDP) keeps the entries for the run.

Timed in one run, interleaved, median of --runs (whole processes unless said):
- reference: `ovs-appctl dpctl/dump-conntrack -m -s zone=65520 > /dev/null`
- `ovsflow conntrack --count`                       target (issue 21): <= 1.5x at 100k
- `ovsflow conntrack` (JSON lines to /dev/null)
- the agent's poll cycle in this process (dump, parse, filter, store update; nothing due)
                                                    target: <= 2.0x at 100k
With --agent-seconds S (default 60; 0 skips it): `ovsflow run` at Antrea's defaults
(poll 5 s, active 5 s, idle 15 s), records to bench/sink.py, for S seconds after its first
20: CPU as a share of one core and peak RSS. Targets at 100k: <= 12 %, <= 120 MB. Beside
it, the reference dump's wall time over 5 s (ovs-vswitchd's own cost of one dump per poll).

Needs root and Open vSwitch. Run: python bench/bench_ovs.py [--size 500000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OVSFLOW = shutil.which("ovsflow", path=str(Path(sys.executable).parent)) or "ovsflow"
ZONE = 65520
SINK_PORT = 4797  # bench/sink.py, the agent's collector
SOURCES = 250  # pod addresses 10.10.0.1-250; destinations 10.96.x.y, one per 250 entries
FLOWS = [f"table=0,priority=10,ip,actions=ct(commit,zone={ZONE})",
         "table=0,priority=1,actions=drop"]


def frames(indexes: list[int], source_mac: bytes) -> list[bytes]:
    """Ethernet/IPv4/UDP frames, one per conntrack entry (UDP checksum 0: none)."""
    header = struct.Struct("!6s6sH BBHHHBBH4s4s HHHH")
    made = []
    for index in indexes:
        source, destination, sport = entry_tuple(index)
        fields = [b"\x02\x00\x00\x00\x00\x02", source_mac, 0x0800,
                  0x45, 0, 28 + 8, 0, 0x4000, 64, 17, 0, source, destination,
                  sport, 5000 + index // (SOURCES * 62500), 8, 0]
        words = struct.unpack("!10H", header.pack(*fields)[14:34])
        checksum = sum(words)
        checksum = (checksum & 0xFFFF) + (checksum >> 16)
        fields[10] = ~((checksum & 0xFFFF) + (checksum >> 16)) & 0xFFFF
        made.append(header.pack(*fields) + b"ovsflow!")
    return made


def send_frames(interface: str, indexes: list[int]) -> None:
    """In the pod: the frames of these entries, in bursts that ovs-vswitchd's receive queue
    keeps up with (~50k frames/s)."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((interface, 0))
        mac = sock.getsockname()[4]
        for start in range(0, len(indexes), 500):
            for frame in frames(indexes[start:start + 500], mac):
                sock.send(frame)
            time.sleep(0.01)


def entry_tuple(index: int) -> tuple[bytes, bytes, int]:
    """Entry `index`'s source, destination and source port."""
    target = index // SOURCES
    return (bytes((10, 10, 0, 1 + index % SOURCES)),
            bytes((10, 96, target // 250 % 250, 1 + target % 250)), 1024 + index % 60000)


class OvsTable:
    """The lab and its filled table."""

    def __init__(self, directory: str, size: int):
        from lab.ovs_lab import OvsLab

        self.lab = OvsLab(Path(directory, "ovs"))
        try:
            lab = self.lab
            lab.vsctl("--", "--id=@d", "create", "Datapath", "datapath_version=0", "--", "set",
                      "Open_vSwitch", ".", "datapaths:netdev=@d")
            lab.vsctl("add-zone-tp", "netdev", f"zone={ZONE}", "udp_first=600",
                      "udp_single=600", "udp_multiple=600")
            self.pod = lab.add_pod("10.10.0.1/16")
            for flow in FLOWS:
                lab.ofctl("add-flow", flow)
            self.control = f"{lab.run_dir}/ovs-vswitchd.{lab.pid('ovs-vswitchd')}.ctl"
            self.fill(size)
        except BaseException:
            self.lab.stop()
            raise

    def appctl(self, *args: str) -> str:
        return subprocess.run(["ovs-appctl", "-t", self.control, *args], capture_output=True,
                              text=True, check=True).stdout

    def fill(self, size: int) -> None:
        """Sends the frames, then again those of the entries missing from the table (frames
        ovs-vswitchd's receive queue dropped), until it holds them all."""
        from ovsflow.source.dpctl import parse_dump

        start = time.monotonic()
        missing = list(range(size))
        for _ in range(10):
            subprocess.run([*self.pod.prefix(), sys.executable, str(Path(__file__).resolve()),
                            "--send", "eth0"], input=" ".join(map(str, missing)), text=True,
                           check=True)
            held = {(c.source, c.destination, c.source_port) for c in parse_dump(
                self.appctl("dpctl/dump-conntrack", f"zone={ZONE}"))[0]}
            missing = [index for index in missing if entry_tuple(index) not in held]
            if not missing:
                break
        print(f"table: {size - len(missing)} entries in zone {ZONE} after "
              f"{time.monotonic() - start:.1f}s of raw UDP frames")

    def stop(self) -> None:
        self.lab.stop()


def config(directory: str, run_dir: str) -> str:
    path = os.path.join(directory, "ovs.yaml")
    with open(path, "w") as stream:
        stream.write(f"""flowExporter:
  flowCollectorAddr: "127.0.0.1:{SINK_PORT}:udp"
  flowPollInterval: 5s
  activeFlowExportTimeout: 5s
  idleFlowExportTimeout: 15s
conntrack:
  source: ovs
  zones: [{ZONE}]
  maxConnections: 1000000
ovs:
  runDir: {run_dir}
  bridge: br0
metrics:
  bindAddress: ""
state:
  directory: ""
""")
    return path


def load_average() -> str:
    """The machine's 1-minute load average: other work on it slows every process timed."""
    return f"{os.getloadavg()[0]:.2f}"


def timed_shell(command: str) -> float:
    start = time.perf_counter()
    subprocess.run(["sh", "-c", command], check=True)
    return time.perf_counter() - start


class PollCycle:
    """The agent's poll cycle, in this process: OvsSource.update into a ConnectionStore."""

    def __init__(self, run_dir: str):
        from ovsflow.filter import ConnectionFilter
        from ovsflow.protocols import ALL_PROTOCOLS
        from ovsflow.source.ovs import OvsSource
        from ovsflow.store import ConnectionStore

        self.source = OvsSource(ConnectionFilter(frozenset({ZONE}), ALL_PROTOCOLS), run_dir)
        self.store = ConnectionStore(5.0, 15.0, max_connections=1_000_000)
        self.polls = 0
        self.run()  # the first poll fills the store; the timed ones find it full

    def run(self) -> tuple[float, float]:
        """(seconds, CPU seconds) of one cycle; 0.5 s apart, so that nothing comes due."""
        start, start_cpu = time.perf_counter(), time.process_time()
        asyncio.run(self.source.update(self.store, self.polls * 0.5))
        self.polls += 1
        return time.perf_counter() - start, time.process_time() - start_cpu


def agent_cpu(directory: str, cfg: str, seconds: float, size: int) -> tuple[float, float]:
    """`ovsflow run` at Antrea's defaults: (share of one core over `seconds` after its first
    20 s, peak RSS in MB). Records go to bench/sink.py, a collector that takes them."""
    from bench.bench_agent import cpu_seconds, peak_rss_mb

    sink = subprocess.Popen([sys.executable, str(ROOT / "bench" / "sink.py"), "udp",
                             str(SINK_PORT), str(100 * size), str(seconds + 120)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "ready"
        with open(os.path.join(directory, "agent.log"), "w") as log:
            agent = subprocess.Popen([OVSFLOW, "run", "--config", cfg], stderr=log)
        try:
            time.sleep(20)  # records at 5, 10, 15 s; then polls
            start, start_cpu = time.monotonic(), cpu_seconds(agent.pid)
            time.sleep(seconds)
            share = (cpu_seconds(agent.pid) - start_cpu) / (time.monotonic() - start)
            return share, peak_rss_mb(agent.pid)
        finally:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
    finally:
        sink.kill()
        sink.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--agent-seconds", type=float, default=60.0)
    parser.add_argument("--send", metavar="INTERFACE",
                        help=argparse.SUPPRESS)  # in the pod: the frames of stdin's indexes
    args = parser.parse_args()
    if args.send:
        send_frames(args.send, [int(index) for index in sys.stdin.read().split()])
        return
    directory = tempfile.mkdtemp(prefix="ovsflow-bench-ovs-")
    table = OvsTable(directory, args.size)
    try:
        cfg = config(directory, table.lab.run_dir)
        dump = (f"ovs-appctl -t {table.control} dpctl/dump-conntrack -m -s zone={ZONE} "
                "> /dev/null")
        count_command = f"{OVSFLOW} conntrack --config {cfg} --count"
        cycle = PollCycle(table.lab.run_dir)
        timings: dict[str, list[float]] = {"reference": [], "count": [], "json": [],
                                           "cycle": [], "cycle_cpu": []}
        load = load_average()
        for _ in range(args.runs):
            timings["reference"].append(timed_shell(dump))
            timings["count"].append(timed_shell(f"{count_command} > /dev/null"))
            timings["json"].append(timed_shell(
                f"{OVSFLOW} conntrack --config {cfg} > /dev/null"))
            seconds, cpu = cycle.run()
            timings["cycle"].append(seconds)
            timings["cycle_cpu"].append(cpu)
        counted = int(subprocess.run(["sh", "-c", count_command], capture_output=True,
                                     text=True, check=True).stdout)
        tracked = len(cycle.store)
        del cycle
        gc.collect()
        median = {name: statistics.median(values) for name, values in timings.items()}
        reference = median["reference"]
        print(f"machine: {os.cpu_count()} cpus, kernel {os.uname().release}; "
              f"median of {args.runs}, interleaved; load average {load} -> {load_average()}")
        print(f"  reference: ovs-appctl dpctl/dump-conntrack -m -s zone={ZONE} > /dev/null  "
              f"{reference:.3f}s")
        big = args.size == 100_000
        for name, label, target in (
                ("count", f"ovsflow conntrack --count ({counted} counted)", 1.5),
                ("json", "ovsflow conntrack (JSON lines)", None),
                ("cycle", f"poll cycle in process (dump, parse, filter, store; {tracked} "
                          f"tracked; CPU {median['cycle_cpu']:.3f}s)", 2.0)):
            ratio = median[name] / reference
            verdict = (f"  target <= {target}x: {'met' if ratio <= target else 'NOT met'}"
                       if target and big else "")
            print(f"  {label}: {median[name]:.3f}s, {ratio:.2f}x{verdict}")
        if args.agent_seconds:
            load = load_average()
            share, rss = agent_cpu(directory, cfg, args.agent_seconds, args.size)
            start = time.perf_counter()
            timed_shell(dump)
            dump_share = (time.perf_counter() - start) / 5.0
            verdict = (f"  targets <= 12%, <= 120 MB: "
                       f"{'met' if share <= 0.12 and rss <= 120 else 'NOT met'}" if big else "")
            print(f"  ovsflow run at Antrea's defaults (5s/5s/15s), {args.agent_seconds:.0f}s "
                  f"steady state: {share * 100:.1f}% of a core, peak RSS {rss:.0f} MB; the "
                  f"reference dump once per 5s: {dump_share * 100:.1f}% of the time{verdict}; "
                  f"load average {load} -> {load_average()}")
    finally:
        table.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
