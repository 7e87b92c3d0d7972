"""The README's first command's main part: the demo runs, shows the configured protocols
only, from both layers, and cleans up after itself."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_demo(tmp_path):
    before = netns_names()
    result = subprocess.run([sys.executable, "-m", "lab.demo"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("conntrack (", "deny path"))]
    protocols = {row[2] if row[0] == "conntrack" else row[2] for row in rows}
    assert protocols == {"tcp", "udp", "icmp"}, out
    assert any(row[:2] == ["deny", "path"] and row[-1] == "deny" for row in rows)
    assert any(row[:2] == ["conntrack", "(kernel)"] and row[-3] != "-" for row in rows)
    assert any(row[:2] == ["conntrack", "(ovs)"] for row in rows)
    assert out.count("filtered out: gre, sctp") == 2
    assert netns_names() == before
