"""7. Packet-ins: a denied UDP flood through Open vSwitch (userspace datapath) into the deny
table. With the meter effectively off (a rate far above the flood), how many packet-ins per
second the agent takes and what they cost it (CPU seconds per 1k); with the default meter
(5000 pps), that the agent's CPU stays bounded whatever the flood.

Needs root. Run: python bench/bench_packet_in.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.ovs_lab import OvsLab  # noqa: E402

OVSFLOW = shutil.which("ovsflow", path=str(Path(sys.executable).parent)) or "ovsflow"
FLOOD = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end, sent, payload = time.monotonic() + float(sys.argv[2]), 0, b"x" * 64
while time.monotonic() < end:
    for port in range(1000, 1100):
        s.sendto(payload, (sys.argv[1], port))
    sent += 100
print(sent)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(name: str, port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*outcome=\"taken\"[^}}]*}})? (\S+)$",
                                             text, re.M))


def run(lab: OvsLab, directory: str, rate: int, seconds: float, port: int) -> dict:
    config = os.path.join(directory, f"rate-{rate}.yaml")
    with open(config, "w") as stream:
        stream.write(f"""flowExporter:
  flowCollectorAddr: "127.0.0.1:4739:udp"
  protocols: [udp]
conntrack:
  source: kernel
ovs:
  runDir: {lab.run_dir}
  bridge: {lab.bridge}
  denyTable: 250
  denyPacketInRate: {rate}
metrics:
  bindAddress: "127.0.0.1:{port}"
state:
  directory: "{directory}/state"
""")
    agent = subprocess.Popen([OVSFLOW, "run", "--config", config], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while "cookie=0x6f7673666c6f7700" not in lab.ofctl("dump-flows", "table=250"):
            if time.monotonic() > deadline:
                raise RuntimeError("no deny flows")
            time.sleep(0.2)
        time.sleep(1)
        cpu_before = cpu_seconds(agent.pid)
        pod1, pod2 = lab.pods
        sent = int(pod1.run(sys.executable, "-c", FLOOD, pod2.address, str(seconds)).stdout)
        time.sleep(1)
        cpu = cpu_seconds(agent.pid) - cpu_before
        taken = metric("ovsflow_packet_ins_total", port)
        flows = lab.ofctl("dump-flows", "table=250")
        matched = sum(int(n) for n in re.findall(r"n_packets=(\d+).*udp ", flows))
        return {"sent": sent, "matched": matched, "taken": taken, "cpu": cpu}
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="ovsflow-bench-")
    lab = OvsLab(Path(directory) / "ovs")
    try:
        pod1 = lab.add_pod("10.56.0.1/24")
        pod2 = lab.add_pod("10.56.0.2/24")
        lab.ofctl("add-flow", f"table=0,priority=100,ip,in_port={lab.ofport(pod1)},"
                              f"nw_dst={pod2.address},actions=load:9->NXM_NX_REG3[],"
                              "resubmit(,250)")
        lab.ofctl("add-flow", "table=0,priority=1,actions=NORMAL")
        # pod2 never sees the flood (denied); a static neighbour spares the ARP round
        pod1.run("ip", "neigh", "replace", pod2.address, "lladdr", "02:00:00:00:00:02",
                 "dev", "eth0")
        print(f"machine: {os.cpu_count()} cpus; {args.seconds:.0f}s UDP flood, pod1 > pod2, "
              "denied into table 250")
        for rate, label in ((10_000_000, "meter off (rate 10M/s)"),
                            (5000, "default meter (5000/s)")):
            r = run(lab, directory, rate, args.seconds, 9495)
            per_second = r["taken"] / args.seconds
            cpu_per_k = r["cpu"] / max(r["taken"], 1) * 1000
            print(f"  {label}: flood {r['sent'] / args.seconds:,.0f} pkt/s sent, "
                  f"{r['matched']:,} matched ovsflow's udp flows, {r['taken']:,.0f} packet-ins "
                  f"taken ({per_second:,.0f}/s); agent CPU {r['cpu']:.2f}s "
                  f"({r['cpu'] / args.seconds:.0%} of a core, {cpu_per_k * 1000:.0f} ms per "
                  f"1k packet-ins)")
    finally:
        lab.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
