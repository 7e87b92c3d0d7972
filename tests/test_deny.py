"""The deny path on a real Open vSwitch (userspace datapath): the pipeline sends pod 1's
packets to pod 2 into the deny table with a rule id in reg3; ovsflow's flows there let only
the configured protocols reach it as packet-ins."""

import asyncio
import logging
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
from openflow import messages as m
from openflow.connection import OpenFlowConnection
from ovsflow.deny.source import DenySource
from ovsflow.deny.store import DenyStore
from ovsflow.filter import ConnectionFilter
from ovsflow.protocol_list import parse_protocol_list

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
def lab(tmp_path, request):
    """A bridge at a real Antrea node's protocols (OpenFlow 1.0 and 1.5), or those the test
    asks for."""
    lab = OvsLab(tmp_path / "ovs", **getattr(request, "param", {}))
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


def write_config(tmp_path, lab, port, protocols=("udp",), rate=5000, metrics="", idle="2s"):
    return agent_config(tmp_path, port, list(protocols),
                        flowExporter={"idleFlowExportTimeout": idle},
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


@pytest.mark.parametrize("lab", [{}, {"protocols": ("OpenFlow10", "OpenFlow13")}],
                         indirect=True, ids=["OpenFlow10,15", "OpenFlow10,13"])
def test_only_configured_protocols_leave_the_datapath(lab, tmp_path):
    other_before = lab.ofctl("dump-flows", "table=7")
    with agent_session(tmp_path, lab) as session:
        flows = wait_for(lambda: len(deny_flows(lab)) == 3 and deny_flows(lab),
                         what="ovsflow's deny flows")
        assert sorted(re.sub(r".*priority=(\d+),?(\S*) actions=(\S+)", r"\1 \2 \3", f)
                      for f in flows) == [
            "0  drop", "200 udp meter:28518,controller(max_len=128,id=28518)",
            "200 udp6 meter:28518,controller(max_len=128,id=28518)"]
        deny_traffic(lab)
        time.sleep(1.5)
        flows = deny_flows(lab)
    assert n_packets(flows, "udp ") == 5
    assert n_packets(flows, "priority=0") >= 3  # TCP SYNs and pings, dropped in the datapath
    assert "deny path: 5 packet-ins taken, 0 of other flows ignored, 0 of unwanted" in \
        session.log
    version = "1.3" if lab.openflow == "OpenFlow13" else "1.5"
    assert f"(OpenFlow {version}) for protocols udp (17)" in session.log

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
    # The UDP packets came first; the TCP SYN's 2 s timeout and the pings took longer than
    # the 2 s idle timeout before the agent stopped.
    assert deny[-1]["flowEndReason"] == 1
    # The flow ovsflow does not own is still there, as it was.
    assert _without_stats(lab.ofctl("dump-flows", "table=7")) == _without_stats(other_before)
    assert "cookie=0x1234" in other_before


def _without_stats(dump: str) -> list[str]:
    """A dump's flows without what changes as packets pass (OpenFlow 1.5 adds idle_age)."""
    return [re.sub(r"duration=[^,]*, |n_packets=\d+, |n_bytes=\d+, |idle_age=\d+, ", "",
                   line).strip() for line in dump.splitlines() if "cookie=" in line]


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
    assert session.log.count("deny path: flows installed") == 2


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
    """The meter's drops, also across a meter deleted (as Antrea's DeleteMeterAll does at
    each of its connects) and put back: the new meter counts from 0 at the switch, the
    metric goes on from what the first one had dropped."""
    def metric(text, name):
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def read():
        return urllib.request.urlopen("http://127.0.0.1:9497/metrics", timeout=5).read().decode()

    with agent_session(tmp_path, lab, rate=1, metrics="127.0.0.1:9497") as session:
        wait_for(lambda: len(deny_flows(lab)) == 3, what="ovsflow's deny flows")
        lab.pod1.traffic("udp", lab.pod2.address, "5353", "40", "10")
        time.sleep(2.5)  # polls ask the switch for the meter's statistics
        first = read()
        lab.ofctl("del-meters")
        wait_for(lambda: len(deny_flows(lab)) == 3 and "meter=28518" in lab.ofctl("dump-meters"),
                 what="ovsflow's meter and flows back")
        lab.pod1.traffic("udp", lab.pod2.address, "5353", "40", "10")
        time.sleep(2.5)
        second = read()
    dropped = metric(first, "ovsflow_packet_ins_dropped_by_meter_total")
    taken = metric(first, 'ovsflow_packet_ins_total{outcome="taken"}')
    assert taken + dropped == 40 and dropped >= 30
    dropped_in_all = metric(second, "ovsflow_packet_ins_dropped_by_meter_total")
    taken_in_all = metric(second, 'ovsflow_packet_ins_total{outcome="taken"}')
    assert taken_in_all + dropped_in_all == 80 and dropped_in_all >= 60
    deny = [r for r in session.records if r["_templateId"] == 260]
    assert sum(r["packetDeltaCount"] for r in deny) == taken_in_all
    assert f"deny path: {int(taken_in_all)} packet-ins taken" in session.log


def test_deny_records_come_only_while_packets_come_then_one_idle_record(lab, tmp_path):
    """Pings (one deny flow: same addresses, type and code) for 2 s, then silence for
    longer than the 3 s idle timeout, with a 1 s active timeout and 500 ms polls."""
    with agent_session(tmp_path, lab, protocols=["icmp"], idle="3s") as session:
        wait_for(lambda: len(deny_flows(lab)) == 2, what="ovsflow's deny flows")
        lab.pod1.run("ping", "-c", "5", "-i", "0.5", "-W", "1", lab.pod2.address,
                     check=False)
        time.sleep(5)
    pings = [r for r in session.records if r["_templateId"] == 260]
    reasons = [r["flowEndReason"] for r in pings]
    deltas = [r["packetDeltaCount"] for r in pings]
    ends = [r["flowEndMilliseconds"] for r in pings]
    assert sum(deltas) == 5 and pings[-1]["packetTotalCount"] == 5
    assert reasons[-1] == 1 and set(reasons[:-1]) == {2}, reasons
    assert 0 not in deltas[:-1], deltas  # an active record only when packets came
    assert ends == sorted(ends), ends  # flowEnd never goes backwards within the flow
    assert ends[-1] - pings[0]["flowStartMilliseconds"] in range(1800, 2600)  # 4 x 0.5 s


def in_process_source(run_dir, bridge, protocols=("udp",)):
    """The agent's deny path alone, in this process, with short backoffs (0.1 s to 1 s)."""
    connection_filter = ConnectionFilter(frozenset(), parse_protocol_list(
        list(protocols)).protocols)
    return DenySource(str(run_dir), bridge, TABLE, 300, 5000, connection_filter,
                      DenyStore(1, 2, 1000), initial_backoff=0.1, max_backoff=1.0)


async def stop(task):
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def test_the_deny_path_backs_off_while_the_switch_refuses_its_flows(lab):
    """Open vSwitch's own refusal: a flow limit of 1 with overflow_policy=refuse in the deny
    table makes the install's second ADD fail with TABLE_FULL, on every attempt."""
    lab.vsctl("--", "--id=@ft", "create", "Flow_Table", "flow_limit=1",
              "overflow_policy=refuse", "--", "set", "Bridge", lab.bridge,
              f"flow_tables:{TABLE}=@ft")

    async def scenario():
        source = in_process_source(lab.run_dir, lab.bridge)
        started = time.monotonic()
        task = asyncio.create_task(source.run())
        await asyncio.sleep(4)
        refused = source.attempts, source.healthy, source.problem()
        lab.vsctl("clear", "Bridge", lab.bridge, "flow_tables")
        try:
            await asyncio.wait_for(source.installed_event.wait(), 5)
            return started, refused, (source.healthy, source.problem())
        finally:
            await stop(task)

    started, (attempts, healthy, (since, error)), recovered = asyncio.run(scenario())
    # Delays of 0.05-0.1, 0.1-0.2, 0.2-0.4, 0.4-0.8, then 0.5-1 s: 7 to 11 attempts in 4 s,
    # one fewer if the sessions themselves are slow (the old retry without backoff made
    # 6383 sessions in 4 s against this switch).
    assert 6 <= attempts <= 11, attempts
    assert not healthy and since <= started + 0.01
    assert re.fullmatch(f"session with {lab.run_dir}/br0.mgmt: OpenFlow error "
                        r"FLOW_MOD_FAILED/TABLE_FULL \(type 5, code 1\) for the request "
                        r"with xid \d+", error), error
    assert recovered == (True, None)


def test_health_says_why_the_deny_path_cannot_connect(tmp_path):
    """No switch at all: the path that does not exist, as the agent's /healthz will say."""
    async def scenario():
        source = in_process_source(tmp_path, "br-missing")
        task = asyncio.create_task(source.run())
        await asyncio.sleep(1.5)
        try:
            return source.attempts, source.healthy, source.problem()
        finally:
            await stop(task)

    attempts, healthy, (_, error) = asyncio.run(scenario())
    assert 4 <= attempts <= 7, attempts
    assert not healthy
    assert error == (f"cannot connect to {tmp_path}/br-missing.mgmt: "
                     "[Errno 2] No such file or directory")


METERS = 262144  # OVS 3.1's userspace datapath: `ovs-ofctl meter-features` says max_meter


async def use_up_the_meters(lab):
    """OVS's real OUT_OF_METERS refusal, the same answer a datapath without meter support
    gives every METER_MOD; ids from 1000 leave ovsflow's meter 300 not yet added."""
    connection = await OpenFlowConnection.open_unix(f"{lab.run_dir}/{lab.bridge}.mgmt")
    try:
        for base in range(1000, 1000 + METERS, 16384):
            await connection.transact(
                [lambda xid, i=i: m.meter_mod(xid, version=connection.version,
                                              command=m.OFPMC_ADD, meter_id=i,
                                              flags=m.OFPMF_PKTPS,
                                              bands=[(m.OFPMBT_DROP, 10, 0)])
                 for i in range(base, base + 16384)], timeout=60)
    finally:
        await connection.close()


def test_without_meters_the_flows_go_without_one_and_it_is_said_once(lab, caplog):
    caplog.set_level(logging.INFO, logger="ovsflow.deny.source")

    async def scenario():
        await use_up_the_meters(lab)
        source = in_process_source(lab.run_dir, lab.bridge)
        task = asyncio.create_task(source.run())
        try:
            await asyncio.wait_for(source.installed_event.wait(), 10)
            flows = deny_flows(lab)
            await asyncio.to_thread(lab.pod1.traffic, "udp", lab.pod2.address, "5353", "5",
                                    "100")
            await asyncio.sleep(0.5)
            await source.connection.close()  # a second session meets the same refusal
            await asyncio.sleep(0.3)
            await asyncio.wait_for(source.installed_event.wait(), 10)
            await source.refresh_meter_stats()
            return source, flows, source.store.flush(time.time())
        finally:
            await stop(task)

    source, flows, records = asyncio.run(scenario())
    assert source.meter_supported is False and source.connections == 2
    assert sorted(re.sub(r".*priority=(\d+),?(\S*) actions=(\S+)", r"\1 \2 \3", f)
                  for f in flows) == [
        "0  drop", "200 udp controller(max_len=128,id=28518)",
        "200 udp6 controller(max_len=128,id=28518)"]
    assert [(r.destination_port, r.packets) for r in records] == [(5353, 5)]
    refusals = [r.getMessage() for r in caplog.records if "refused meter" in r.getMessage()]
    assert refusals == ["deny path: the switch refused meter 300 (OpenFlow error "
                        "METER_MOD_FAILED/OUT_OF_METERS (type 12, code 10) for the request "
                        "with xid 5); installing the deny flows without it, so packet-ins "
                        "are not rate-limited"]
    assert source.meter_drops == 0
