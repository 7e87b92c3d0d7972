"""The kernel source on Debian 12's kernel (Linux 6.1), booted under qemu by
`../shared/tools/kernel-vm` beside the checkout (docs/kernels.md): 6.1 ignores the zone
filter of a dump request but applies the family and the protocol filters. The script
tests/conntrack_compare.py runs in the VM; the comparison with `conntrack -L` happens here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import conntrack_compare

REPO = Path(__file__).resolve().parents[1]
KERNEL_VM = REPO.parent / "shared" / "tools" / "kernel-vm"

pytestmark = pytest.mark.skipif(
    not KERNEL_VM.exists(),
    reason=f"{KERNEL_VM} is absent: the Debian 12 kernel tests need the kernel-vm tool "
           "(docs/kernels.md says how to run them elsewhere)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One VM boot for every test here (about 30 s under TCG)."""
    directory = tmp_path_factory.mktemp("kernel-vm")
    script = directory / "run.sh"
    script.write_text(f'exec {sys.executable} {REPO / "tests" / "conntrack_compare.py"} '
                      '"$KVM_OUT/report.json"\n')
    out = directory / "out"
    result = subprocess.run([str(KERNEL_VM), "run", "--timeout", "240", "--out", str(out),
                             str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "report.json").read_text())


def test_the_vm_runs_debian_12s_kernel(report):
    assert report["kernel"].startswith("6.1.")
    assert report["created"] == len(report["conntrack"]) == 80


def test_the_probe_finds_the_zone_filter_ignored(report):
    # the destination port of TCP and UDP filtered, not of SCTP, DCCP or UDP-Lite
    assert report["probe"] == {"family": True, "protocol": True, "zone": False,
                               "ports": [6, 17]}


def test_no_dump_per_zone_where_the_kernel_ignores_zones(report):
    # zones [65520, 100], protocols tcp and udp: one dump per family and protocol, no more
    assert report["cases"][0]["dumps"] == 4
    # zones [65520, 100], tcp/2000-2600 (in userspace) and udp/2520: one dump per family
    # for TCP, one per family for UDP's port
    assert report["cases"][7]["dumps"] == 4


def test_tcp_and_udp_ports_are_dumped_one_port_at_a_time(report):
    # every zone, tcp/2520, udp/2007, udp/2100, sctp/2510 and icmp: as on the host's kernel
    assert report["cases"][6]["dumps"] == 9


@pytest.mark.parametrize("case", range(len(conntrack_compare.CASES)),
                         ids=[f"zones={z}-protocols={p}" for z, p in conntrack_compare.CASES])
def test_conntrack_command_lists_what_conntrack_tools_list(report, case):
    conntrack_compare.check(report, case)


def test_the_probe_leaves_no_entry_behind(report):
    assert [e for e in report["conntrack"] if e[2] == "192.0.2.1"] == []


def test_the_conntrack_command_writes_no_sysctl(report):
    assert report["sysctls"] == {"nf_conntrack_acct": "0", "nf_conntrack_timestamp": "0"}
