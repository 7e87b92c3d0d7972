"""The agent as a whole, on a conntrack table of 100k connections in a namespace:

4. Memory: peak RSS (VmHWM) of `ovsflow run` tracking 100k connections over several polls.
   Target: <= 150 MB (Antrea extrapolates ~500 MB at 100k).
5. Export end to end: 100k connections from the store to a local collector (bench/sink.py,
   UDP and TCP) within one poll interval (5 s): the time from the agent's start until the
   collector has all 100k records (each connection's first record comes at its active
   timeout, here 1 s). The encoder alone: bench_encode.py.

Needs root. Run: python bench/bench_agent.py
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.netns import Netns  # noqa: E402

OVSFLOW = shutil.which("ovsflow", path=str(Path(sys.executable).parent)) or "ovsflow"
SIZE = 100_000


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def agent_run(ns: Netns, directory: str, transport: str, port: int,
              seconds: float) -> tuple[float, float, int]:
    """Start a collector and the agent; return (seconds until all records arrived, the
    agent's peak RSS in MB, records received)."""
    config = os.path.join(directory, f"{transport}.yaml")
    with open(config, "w") as stream:
        stream.write(f"""flowExporter:
  flowCollectorAddr: "127.0.0.1:{port}:{transport}"
  flowPollInterval: 1s
  activeFlowExportTimeout: 1s
  idleFlowExportTimeout: 60s
conntrack:
  source: kernel
  zones: [65520]
ovs:
  bridge: ""
metrics:
  bindAddress: ""
""")
    sink = ns.popen(sys.executable, str(ROOT / "bench" / "sink.py"), transport, str(port),
                    str(SIZE), str(seconds + 30), stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    start = time.monotonic()
    agent = ns.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.DEVNULL)
    received = int(sink.stdout.readline().split()[0])
    arrived = time.monotonic() - start
    time.sleep(max(0.0, seconds - arrived))  # more polls: the store at steady state
    rss = peak_rss_mb(agent.pid)
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=60)
    sink.wait(timeout=60)
    return arrived, rss, received


def main() -> None:
    directory = tempfile.mkdtemp(prefix="ovsflow-bench-")
    ns = Netns("bench")
    try:
        ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1",
               "net.netfilter.nf_conntrack_timestamp=1")
        os.chdir(ROOT)
        ns.run(sys.executable, "-m", "lab.ctfill", "udp", str(SIZE - 10_000), "--tcp", "10000")
        print(f"machine: {os.cpu_count()} cpus; conntrack: {SIZE} connections in zone 65520")
        for transport, port in (("udp", 4739), ("tcp", 4740)):
            arrived, rss, received = agent_run(ns, directory, transport, port, 8.0)
            print(f"  {transport}: {received} records at the collector {arrived:.2f}s after the "
                  f"agent started (first records are due at the 1s active timeout); agent peak "
                  f"RSS {rss:.0f} MB")
        print(f"  targets: peak RSS <= 150 MB; 100k records within one 5s poll interval")
    finally:
        ns.delete()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
