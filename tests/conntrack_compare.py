"""Fill this network namespace's conntrack (zones 0, 7, 100, 65510 and 65520; eight
protocols; IPv4 and IPv6; a destination port per zone), then for each of CASES run
`ovsflow conntrack` and list the table
with `conntrack -L`; write both, with the filter probe's answer, to a JSON report.

It runs where the kernel under test runs: inside `kernel-vm` on Debian 12's 6.1 kernel
(tests/test_kernel_61.py) and in a network namespace on the host's kernel
(tests/test_conntrack_kernel.py). The tests compare the lists entry by entry.

    PYTHON tests/conntrack_compare.py REPORT.json      (as root, in a namespace of its own)
"""

from __future__ import annotations

import json
import platform
import re
import socket
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # lab/ and ovsflow/ of this checkout, also inside the VM

import yaml  # noqa: E402

from lab.ctfill import fill  # noqa: E402
from ovsflow.source.kernel_filters import probe_filters  # noqa: E402

OVSFLOW = str(Path(sys.executable).with_name("ovsflow"))
ZONES = (0, 7, 100, 65510, 65520)
V4_PROTOCOLS = (6, 17, 1, 132, 47, 33, 136, 103)  # 103 (PIM): tracked generically
V6_PROTOCOLS = (6, 17, 58, 132, 47, 33, 136, 103)
# (zones, protocols) as a user writes them in the configuration
CASES = (
    ([65520, 100], ["tcp", "udp"]),  # issue 13: every entry came twice on 6.1
    ([0, 7], ["icmp", "ipv6-icmp", "sctp"]),  # zone 0: the kernel cannot select it
    ([65510, 7, 100], []),
    ([], ["gre", "dccp", "udplite", 103]),
    ([], []),
    ([65520, 100], ["tcp", "udp", "icmp", "ipv6-icmp", "sctp", "gre", "dccp", "udplite",
                    103]),  # too many filtered dumps: the plan falls back to fewer
    # service ports (the original destination port, 2000 + zone % 1000 here): TCP and UDP
    # by the kernel's port filter, a dump per port; SCTP's in userspace (kernels ignore it)
    ([], ["tcp/2520", "udp/2007", "udp/2100", "sctp/2510", "icmp"]),
    ([65520, 100], ["tcp/2000-2600", "udp/2520"]),  # a range: in userspace
    ([], ["dccp/2100", "udplite/2520", "gre"]),  # ports the kernel does not filter
)
# The reference filter's own protocol names (not ovsflow's table).
NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "sctp": 132, "gre": 47,
           "dccp": 33, "udplite": 136}
SYSCTLS = ("nf_conntrack_acct", "nf_conntrack_timestamp")


def entries() -> list[tuple[int, bytes, bytes, int, int, int]]:
    """One entry per zone, protocol and address family, with addresses that name the zone."""
    made = []
    for index, zone in enumerate(ZONES):
        for protocol in V4_PROTOCOLS:
            made.append((protocol, bytes((10, 9, index, 1)), bytes((10, 9, index, 2)),
                         1000 + protocol, 2000 + zone % 1000, zone))
        for protocol in V6_PROTOCOLS:
            made.append((protocol, socket.inet_pton(socket.AF_INET6, f"fd09:{index}::1"),
                         socket.inet_pton(socket.AF_INET6, f"fd09:{index}::2"),
                         1000 + protocol, 2000 + zone % 1000, zone))
    return made


def ovsflow_conntrack(directory: Path, zones: list, protocols: list) -> dict:
    config = directory / "ovsflow.yaml"
    config.write_text(yaml.safe_dump({
        "flowExporter": {"flowCollectorAddr": "127.0.0.1:4739:udp", "protocols": protocols},
        "conntrack": {"source": "kernel", "zones": zones}, "ovs": {"bridge": ""},
        "metrics": {"bindAddress": ""},
        "state": {"directory": ""}}))  # nothing left behind: the filters are probed each run
    result = subprocess.run([OVSFLOW, "conntrack", "--config", str(config), "--log-level",
                             "debug"], capture_output=True, text=True, timeout=120)
    dumps = re.search(r"kernel conntrack: (\d+) dump\(s\) per poll", result.stderr)
    return {"zones": zones, "protocols": protocols, "returncode": result.returncode,
            "stderr": result.stderr, "dumps": int(dumps.group(1)) if dumps else None,
            "ovsflow": [ovsflow_key(json.loads(line)) for line in result.stdout.splitlines()]}


def ovsflow_key(c: dict) -> list:
    return [c["id"], c["protocol"], c["source"], c["destination"], c["sourcePort"],
            c["destinationPort"], c["replySource"], c["replyDestination"], c["zone"]]


def conntrack_list() -> list[list]:
    """Every entry of both families by `conntrack -L -o xml`, keyed like `ovsflow_key`."""
    found = []
    for family in ("ipv4", "ipv6"):
        result = subprocess.run(["conntrack", "-L", "-o", "xml", "-f", family],
                                capture_output=True, text=True, check=True, timeout=60)
        for flow in ElementTree.fromstring(result.stdout).iter("flow"):
            meta = {m.get("direction"): m for m in flow.iter("meta")}
            orig, reply, other = meta["original"], meta["reply"], meta["independent"]
            layer4 = orig.find("layer4")
            # ports; GRE keys (hex); nothing for ICMP and generic protocols
            ports = [int(layer4.findtext(name) or "0", 0)
                     for name in (("srckey", "dstkey") if layer4.find("srckey") is not None
                                  else ("sport", "dport"))]
            found.append([int(other.findtext("id")), int(layer4.get("protonum")),
                          orig.findtext("layer3/src"), orig.findtext("layer3/dst"), *ports,
                          reply.findtext("layer3/src"), reply.findtext("layer3/dst"),
                          int(other.findtext("zone") or 0)])
    return found


def reference(report: dict, case: dict) -> Counter:
    """What `conntrack -L` listed, filtered by the case's zones, protocols and destination
    ports (`PROTO/PORT`, `PROTO/LOW-HIGH`)."""
    zones = set(case["zones"])
    wanted = []  # (protocol, lowest port, highest port)
    for entry in case["protocols"]:
        name, _, ports = str(entry).partition("/")
        low, _, high = ports.partition("-")
        wanted.append((NUMBERS.get(name) or int(name), int(low or 0), int(high or low or 65535)))
    return Counter(tuple(entry) for entry in report["conntrack"]
                   if (not zones or entry[-1] in zones) and
                   (not wanted or any(entry[1] == protocol and low <= entry[5] <= high
                                      for protocol, low, high in wanted)))


def sysctls() -> dict[str, str]:
    return {name: Path(f"/proc/sys/net/netfilter/{name}").read_text().strip()
            for name in SYSCTLS}


def main() -> None:
    for name in SYSCTLS:
        Path(f"/proc/sys/net/netfilter/{name}").write_text("0")
    created = fill(entries())
    probe = probe_filters()
    with tempfile.TemporaryDirectory() as directory:
        cases = [ovsflow_conntrack(Path(directory), zones, protocols)
                 for zones, protocols in CASES]
    report = {"kernel": platform.release(), "probe": probe.to_json(), "created": created,
              "cases": cases, "conntrack": conntrack_list(), "sysctls": sysctls()}
    Path(sys.argv[1]).write_text(json.dumps(report, indent=1))


def check(report: dict, case_index: int) -> None:
    """The assertions both kernels' tests make on one case of a report."""
    case = report["cases"][case_index]
    assert case["returncode"] == 0, case["stderr"]
    ours = Counter(tuple(key) for key in case["ovsflow"])
    assert [key for key, count in ours.items() if count > 1] == []  # nothing twice
    expected = reference(report, case)
    assert expected  # each case selects something
    assert ours == expected


if __name__ == "__main__":
    main()
