"""Writes tests/data/dpctl_*.txt: `dpctl/dump-conntrack -m -s` text from a real ovs-vswitchd
(userspace datapath) holding TCP, UDP, ICMP, ICMPv6, SCTP (a raw-socket INIT) and GRE
connections, IPv4 and IPv6, in zones 65520, 65510 and 7, some with a mark and labels.
The differential test (tests/test_dpctl_fast.py) reads them. Needs root and OVS:

    .venv/bin/python tests/data/make_dpctl_dumps.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent
ROOT = DATA.parent.parent
sys.path.insert(0, str(ROOT))

from lab.netns import LAB, PYTHON, sh  # noqa: E402
from lab.ovs_lab import OvsLab  # noqa: E402

PIPELINE = [
    # ND and ARP pass untracked; IPv4 in zone 65520, IPv6 in zone 65510, UDP to 7000 in zone 7
    "table=0,priority=30,icmp6,icmp_type=135,actions=NORMAL",
    "table=0,priority=30,icmp6,icmp_type=136,actions=NORMAL",
    "table=0,priority=20,udp,tp_dst=7000,ct_state=-trk,actions=ct(table=1,zone=7)",
    "table=0,priority=20,udp6,tp_dst=7000,ct_state=-trk,actions=ct(table=1,zone=7)",
    "table=0,priority=10,ip,ct_state=-trk,actions=ct(table=1,zone=65520)",
    "table=0,priority=10,ipv6,ct_state=-trk,actions=ct(table=1,zone=65510)",
    "table=0,priority=1,actions=NORMAL",
    # zone 7: a mark and labels over 64 bits; UDP 5353: labels as Antrea's rule ids
    *(f"table=1,priority=30,{match},ct_zone=7,ct_state=+trk+new,actions=ct(commit,zone=7,"
      "exec(load:42->NXM_NX_CT_MARK[],load:0xabcd->NXM_NX_CT_LABEL[0..31],"
      "load:0x1234->NXM_NX_CT_LABEL[96..127])),NORMAL" for match in ("ip", "ipv6")),
    "table=1,priority=25,udp,tp_dst=5353,ct_zone=65520,ct_state=+trk+new,actions=ct(commit,"
    "zone=65520,exec(load:7->NXM_NX_CT_LABEL[0..31],load:9->NXM_NX_CT_LABEL[32..63],"
    "load:0xffffffff->NXM_NX_CT_MARK[])),NORMAL",
    "table=1,priority=20,ip,ct_zone=65520,ct_state=+trk+new,actions=ct(commit,zone=65520),NORMAL",
    "table=1,priority=20,ipv6,ct_zone=65510,ct_state=+trk+new,actions=ct(commit,zone=65510),NORMAL",
    "table=1,priority=10,ct_state=+trk+est,actions=NORMAL",
    "table=1,priority=10,ct_state=+trk+rel,actions=NORMAL",
    "table=1,priority=5,ct_state=+trk,actions=NORMAL",
]


def traffic(lab: OvsLab) -> list[subprocess.Popen]:
    client, server = lab.client, lab.server
    servers = [server.popen(PYTHON, "-u", str(LAB / "traffic.py"), "tcp-server", str(port),
                            "3000", stdout=subprocess.PIPE, text=True) for port in (8000, 8001)]
    for process in servers:
        process.stdout.readline()
    client.traffic("tcp-client", server.address, "8000", "500", "1", "0")  # closed: TIME_WAIT
    # an open one: ESTABLISHED while the dumps are taken
    held = client.popen(PYTHON, str(LAB / "traffic.py"), "tcp-client", server.address, "8001",
                        "100", "30", "0.2", stdout=subprocess.DEVNULL)
    client.traffic("tcp-syn", server.address, "8999")  # refused: a reset connection
    client.traffic("udp", server.address, "5353", "2", "50")
    client.traffic("udp", server.address, "7000", "2", "50")
    client.traffic("udp", server.address, "53", "1", "20")
    client.run("sh", "-c", "python3 -c \"import socket; s=socket.socket(socket.AF_INET6, "
               "socket.SOCK_DGRAM); [s.sendto(b'x', ('fd66::2', p)) for p in (53, 7000)]\"")
    client.run("ping", "-c", "2", "-i", "0.2", "-W", "1", server.address)
    client.run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", "fd66::2")
    client.traffic("sctp-init", client.address, server.address, "5000", "6000")
    client.traffic("gre", client.address, server.address)
    return [*servers, held]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ovs-dumps-") as run_dir:
        lab = OvsLab(Path(run_dir))
        try:
            lab.client = lab.add_pod("10.66.0.1/24")
            lab.server = lab.add_pod("10.66.0.2/24")
            for pod, address in ((lab.client, "fd66::1/64"), (lab.server, "fd66::2/64")):
                pod.run("ip", "-6", "addr", "add", address, "dev", "eth0", "nodad")
            for flow in PIPELINE:
                lab.ofctl("add-flow", flow)
            time.sleep(0.5)
            traffic(lab)
            time.sleep(1)
            control = f"{run_dir}/ovs-vswitchd.{lab.pid('ovs-vswitchd')}.ctl"
            for name, arguments in (("all", ["-m", "-s"]),
                                    ("zone65520", ["-m", "-s", "zone=65520"])):
                text = sh("ovs-appctl", "-t", control, "dpctl/dump-conntrack", *arguments).stdout
                (DATA / f"dpctl_{name}.txt").write_text(text)
                print(f"dpctl_{name}.txt: {len(text.splitlines())} entries")
        finally:
            lab.stop()


if __name__ == "__main__":
    main()
