"""The deny path on a real Open vSwitch (userspace datapath): the pipeline sends pod 1's
packets to pod 2 into the deny table with a rule id in reg3; ovsflow's flows there let only
the configured protocols reach it as packet-ins."""

import re
import signal
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from helpers import OVSFLOW, Collector, agent_config
from lab.ovs_lab import OvsLab

TABLE = 250
OTHER_FLOW = "table=7,priority=5,cookie=0x1234,ip,nw_src=192.0.2.1,actions=drop"


def pipeline(lab):
    """Deny every IP packet from pod 1 to pod 2 (rule 42); everything else NORMAL."""
    p1 = lab.ofport(lab.pod1)
    lab.ofctl("add-flow", f"table=0,priority=100,ip,in_port={p1},nw_dst={lab.pod2.address},"
                          f"actions=load:42->NXM_NX_REG3[],resubmit(,{TABLE})")
    lab.ofctl("add-flow", "table=0,priority=1,actions=NORMAL")
    lab.ofctl("add-flow", OTHER_FLOW)


@pytest.fixture
def lab(tmp_path):
    lab = OvsLab(tmp_path / "ovs")
    try:
        lab.pod1 = lab.add_pod("10.55.0.1/24")
        lab.pod2 = lab.add_pod("10.55.0.2/24")
        pipeline(lab)
        yield lab
    finally:
        lab.stop()


def deny_flows(lab) -> list[str]:
    text = lab.ofctl("dump-flows", f"table={TABLE}")
    return [line.strip() for line in text.splitlines() if "cookie=0x6f7673666c6f7700" in line]


def wait_for(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(0.1)
    return result


def n_packets(flows: list[str], fragment: str) -> int:
    [line] = [f for f in flows if fragment in f]
    return int(re.search(r"n_packets=(\d+)", line).group(1))


def write_config(tmp_path, lab, port, protocols=("udp",), rate=5000, metrics=""):
    return agent_config(tmp_path, port, list(protocols),
                        flowExporter={"idleFlowExportTimeout": "2s"},
                        ovs={"runDir": lab.run_dir, "bridge": lab.bridge, "denyTable": TABLE,
                             "denyPacketInRate": rate},
                        metrics={"bindAddress": metrics})


@contextmanager
def agent_session(tmp_path, lab, **config):
    """A collector and an agent for the block; afterwards `session.records` holds what the
    collector received and `session.log` the agent's stderr (it is stopped with SIGTERM and
    must exit 0; by PID with SIGKILL if the block failed)."""
    collector = Collector("udp://127.0.0.1:0", timeout=120)
    path = write_config(tmp_path, lab, collector.port, **config)
    agent = subprocess.Popen([OVSFLOW, "run", "--config", path], stderr=subprocess.PIPE,
                             text=True)
    session = SimpleNamespace(agent=agent, port=collector.port, records=[], log="")
    try:
        yield session
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
        session.log = agent.stderr.read()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        session.records = collector.stop_and_read()


def deny_traffic(lab, udp_count=5):
    lab.pod1.traffic("udp", lab.pod2.address, "5353", str(udp_count), "100")
    lab.pod1.traffic("tcp-syn", lab.pod2.address, "80")
    lab.pod1.run("ping", "-c", "2", "-i", "0.2", "-W", "1", lab.pod2.address, check=False)


def test_only_configured_protocols_leave_the_datapath(lab, tmp_path):
    other_before = lab.ofctl("dump-flows", "table=7")
    with agent_session(tmp_path, lab) as session:
        flows = wait_for(lambda: len(deny_flows(lab)) == 3 and deny_flows(lab),
                         what="ovsflow's deny flows")
        assert sorted(re.sub(r".*priority=(\d+),?(\S*) actions=(\S+)", r"\1 \2 \3", f)
                      for f in flows) == [
            "0  drop", "200 udp meter:250,controller(max_len=128,id=28518)",
            "200 udp6 meter:250,controller(max_len=128,id=28518)"]
        deny_traffic(lab)
        time.sleep(1.5)
        flows = deny_flows(lab)
    assert n_packets(flows, "udp ") == 5
    assert n_packets(flows, "priority=0") >= 3  # TCP SYNs and pings, dropped in the datapath
    assert "deny path: 5 packet-ins taken, 0 of other flows ignored, 0 of unwanted" in \
        session.log

    deny = [r for r in session.records if r["_templateId"] == 260]
    assert deny and {r["protocolIdentifier"] for r in deny} == {17}
    assert sum(r["packetDeltaCount"] for r in deny) == 5
    assert sum(r["octetDeltaCount"] for r in deny) == 5 * (20 + 8 + 100)
    first = deny[0]
    assert (first["sourceIPv4Address"], first["destinationIPv4Address"]) == (
        "10.55.0.1", "10.55.0.2")
    assert first["destinationTransportPort"] == 5353
    assert first["ingressNetworkPolicyRuleAction"] == 2
    assert first["egressNetworkPolicyRuleAction"] == 2
    assert first["ingressNetworkPolicyRuleName"] == "42"
    assert deny[-1]["flowEndReason"] in (1, 4)  # idle, or still open at shutdown
    # The flow ovsflow does not own is still there, as it was.
    assert _without_stats(lab.ofctl("dump-flows", "table=7")) == _without_stats(other_before)
    assert "cookie=0x1234" in other_before


def _without_stats(dump: str) -> list[str]:
    return [re.sub(r"duration=[^,]*, |n_packets=\d+, |n_bytes=\d+, ", "", line).strip()
            for line in dump.splitlines() if "cookie=" in line]


def test_rules_and_records_come_back_after_ovs_vswitchd_restarts(lab, tmp_path):
    with agent_session(tmp_path, lab) as session:
        wait_for(lambda: len(deny_flows(lab)) == 3, what="ovsflow's deny flows")
        lab.pod1.traffic("udp", lab.pod2.address, "5000", "2", "10")
        old_pid = lab.pid("ovs-vswitchd")
        lab.stop_daemon("ovs-vswitchd")
        lab.start_vswitchd()
        assert lab.pid("ovs-vswitchd") != old_pid
        lab.wait_for_bridge()
        pipeline(lab)  # the test's own pipeline flows are gone with the restart too
        wait_for(lambda: len(deny_flows(lab)) == 3, what="deny flows reinstalled")
        lab.pod1.traffic("udp", lab.pod2.address, "6000", "3", "10")
        time.sleep(1.5)
    by_port = {}
    for r in session.records:
        if r["_templateId"] == 260:
            port = r["destinationTransportPort"]
            by_port[port] = by_port.get(port, 0) + r["packetDeltaCount"]
    assert by_port == {5000: 2, 6000: 3}
    assert "flows installed" in session.log


def test_sighup_changes_the_protocols_at_both_layers_live(lab, tmp_path):
    with agent_session(tmp_path, lab) as session:
        wait_for(lambda: any("udp " in f for f in deny_flows(lab)), what="udp flows")
        write_config(tmp_path, lab, session.port, protocols=["tcp", "icmp"])
        session.agent.send_signal(signal.SIGHUP)
        flows = wait_for(lambda: (f := deny_flows(lab)) and any(",tcp " in x for x in f)
                         and not any("udp" in x for x in f) and f, what="tcp/icmp flows")
        # icmp is IPv4's alone (IPv6 has icmpv6, protocol 58): one flow, not two
        assert sorted(re.search(r"priority=\d+,?(\S*) ", f).group(1) for f in flows) == [
            "", "icmp", "tcp", "tcp6"]
        write_config(tmp_path, lab, session.port, protocols=[True])  # every entry invalid
        session.agent.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert len(deny_flows(lab)) == 4  # unchanged
        deny_traffic(lab)
        time.sleep(1.5)
    assert {r["protocolIdentifier"] for r in session.records
            if r["_templateId"] == 260} == {1, 6}
    assert "keeping the running configuration" in session.log
    assert "reload: exporting protocols icmp (1), tcp (6)" in session.log


def test_the_meter_caps_packet_ins_and_its_drops_are_a_metric(lab, tmp_path):
    with agent_session(tmp_path, lab, rate=1, metrics="127.0.0.1:9497") as session:
        wait_for(lambda: len(deny_flows(lab)) == 3, what="ovsflow's deny flows")
        lab.pod1.traffic("udp", lab.pod2.address, "5353", "40", "10")
        time.sleep(2.5)  # polls ask the switch for the meter's statistics
        text = urllib.request.urlopen("http://127.0.0.1:9497/metrics", timeout=5).read().decode()
    dropped = float(re.search(r"^ovsflow_packet_ins_dropped_by_meter_total (\S+)$", text,
                              re.M).group(1))
    taken = float(re.search(r'^ovsflow_packet_ins_total{outcome="taken"} (\S+)$', text,
                            re.M).group(1))
    assert taken + dropped == 40 and dropped >= 30
    deny = [r for r in session.records if r["_templateId"] == 260]
    assert sum(r["packetDeltaCount"] for r in deny) == taken
    assert f"deny path: {int(taken)} packet-ins taken" in session.log
