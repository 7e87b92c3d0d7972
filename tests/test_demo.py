"""The README's first command's main part: the demo runs, shows the configured protocols
only, from both layers, with Pod names, flow types and rule ids, and cleans up after itself."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("verdict", "rules", "flow-type", "source-pod", "destination-pod")


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def demo():
    """(its output, its table's rows) from one run; every cell of a row is one word, but for
    the layer (two words), the addresses and the ports (two or three)."""
    process = subprocess.Popen([sys.executable, "-m", "lab.demo"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, errors = process.communicate(timeout=300)
    assert process.returncode == 0, out + errors
    # lab/netns.py names its namespaces of-ROLE-PID-N: none of the demo's may be left
    # (other tests may be running theirs meanwhile)
    assert not [name for name in netns_names() if f"-{process.pid}-" in name]
    rows = []
    for line in out.splitlines():
        if line.startswith(("conntrack (", "deny path")):
            words = line.split()
            row = dict(zip(COLUMNS, words[-len(COLUMNS):]))
            row.update(layer=" ".join(words[:2]), proto=words[2], addresses=" ".join(words[3:6]),
                       packets=words[-len(COLUMNS) - 3])
            rows.append(row)
    return out, rows


def test_demo(demo):
    out, rows = demo
    assert {row["proto"] for row in rows} == {"tcp", "udp", "icmp"}, out
    assert any(row["layer"] == "deny path" and row["verdict"] == "deny" for row in rows)
    assert any(row["layer"] == "conntrack (kernel)" and row["packets"] != "-" for row in rows)
    assert any(row["layer"] == "conntrack (ovs)" for row in rows)
    assert out.count("filtered out: gre, sctp") == 2
    # what the deny table's flows matched, from their counters (template 270)
    [totals] = [line for line in out.splitlines() if line.startswith("Deny totals")]
    assert re.search(r"tcp [1-9]", totals) and re.search(r"udp [1-9]", totals), totals


def test_demo_shows_pods_flow_types_and_rules(demo):
    out, rows = demo

    def one(layer: str, addresses: str, proto: str = "udp") -> dict:
        found = [r for r in rows if r["layer"] == layer and r["addresses"] == addresses
                 and r["proto"] == proto]
        assert found, f"no {layer} {proto} row for {addresses}:\n{out}"
        return found[0]

    intra = one("conntrack (ovs)", "10.60.0.1 > 10.60.0.2", "tcp")
    assert (intra["source-pod"], intra["destination-pod"]) == (
        "demo/pod1@node-ovs", "demo/pod2@node-ovs"), out
    assert (intra["flow-type"], intra["rules"]) == ("intra-node", "in:12,out:11"), out
    inter = one("conntrack (ovs)", "10.60.0.1 > 10.60.0.50")
    assert (inter["flow-type"], inter["rules"], inter["destination-pod"]) == (
        "inter-node", "out:11", "-"), out
    to_external = one("conntrack (ovs)", "10.60.0.1 > 10.60.0.200")
    assert (to_external["flow-type"], to_external["rules"]) == ("to-external", "out:13"), out
    from_external = one("conntrack (ovs)", "10.60.0.200 > 10.60.0.2")
    assert (from_external["flow-type"], from_external["rules"]) == (
        "from-external", "in:12"), out
    denied = one("deny path", "10.60.0.3 > 10.60.0.2")
    assert (denied["source-pod"], denied["destination-pod"], denied["flow-type"],
            denied["rules"]) == ("demo/pod3@node-ovs", "demo/pod2@node-ovs", "intra-node",
                                 "in:7,out:7"), out
    kernel = one("conntrack (kernel)", "10.61.0.1 > 10.61.0.2")
    assert (kernel["rules"], kernel["source-pod"]) == ("out:21", "-"), out


def test_demo_shows_the_antrea_mode(demo):
    out, _ = demo
    assert "Antrea mode (ovs.denySource: antrea)" in out, out
    part = out.split("Antrea mode (ovs.denySource: antrea)")[1]
    rows = {(w[0], w[3], w[6], w[7], w[8], w[9], w[10], w[11])
            for w in (line.split() for line in part.splitlines())
            if w and w[0] in ("udp", "tcp", "icmp")}
    client, server = "shop/client@node-antrea", "shop/server@node-antrea"
    assert rows == {
        ("udp", "10.62.0.2", "5353", "3", "-", "drop:5", client, server),
        ("udp", "10.62.0.3", "8080", "2", "drop:4", "-", client, "shop/web@node-antrea"),
        # the ClusterIP's packets, DNAT-ed to its Endpoint, dropped by the K8s policy
        ("udp", "10.62.0.4", "53", "2", "-", "drop:k8s-default", client,
         "kube-system/dns@node-antrea"),
        ("udp", "10.62.0.5", "5355", "2", "-", "reject:9", client, "vault/vault@node-antrea"),
        ("udp", "10.62.0.2", "5354", "1", "-", "drop:5", client, server),
        ("udp", "fd00:62::2", "5356", "2", "-", "drop:6", "shop/client6@node-antrea",
         "shop/server6@node-antrea"),
    }, out
    assert "ovsflow started first and spoke OpenFlow 1.5" in part
    took = re.search(r"Antrea's controller took (\d+) NetworkPolicy packet-ins in its first "
                     r"run, every one its flows sent \((\d+)\)", part)
    assert took and took.group(1) == took.group(2), part
    assert "installed nothing, and followed the restarted agent" in part
