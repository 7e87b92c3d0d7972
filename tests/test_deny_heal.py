"""Flows that heal (`ovs.denySource: table`): ovsflow reads its flows and meter back every
second and puts back what someone else deleted or changed, while denied traffic runs."""

import asyncio
import re
import subprocess
import time
import urllib.request

import pytest

from lab.ovs_lab import OvsLab
from test_deny import (
    TABLE, agent_session, deny_flows, in_process_source, pipeline, stop, wait_for,
)

COOKIE = "0x6f7673666c6f7700"


@pytest.fixture
def lab(tmp_path):
    lab = OvsLab(tmp_path / "ovs")
    try:
        lab.pod1 = lab.add_pod("10.56.0.1/24")
        lab.pod2 = lab.add_pod("10.56.0.2/24")
        pipeline(lab)
        yield lab
    finally:
        lab.stop()


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def restored_within(lab, flows_before, seconds=2.0) -> float:
    """How long until ovsflow's flows are back as they were; fails past `seconds`."""
    started = time.monotonic()
    wait_for(lambda: _actions(deny_flows(lab)) == flows_before, timeout=seconds,
             what="ovsflow's flows put back")
    return time.monotonic() - started


def _actions(flows: list[str]) -> list[str]:
    return sorted(re.sub(r".*priority=(\d+),?(\S*) actions=(\S+)", r"\1 \2 \3", f)
                  for f in flows)


def test_flows_and_meter_come_back_within_two_seconds_while_traffic_runs(lab, tmp_path):
    damage = [
        # Antrea's DeleteMeterAll, as at each of its connects: OVS deletes the flows too
        ("meter", lambda: lab.ofctl("del-meters")),
        ("flows", lambda: lab.ofctl("del-flows", f"cookie={COOKIE}/-1")),
        # someone's flow with the same match and priority replaces ours (cookie 0)
        ("replaced", lambda: lab.ofctl("add-flow", f"table={TABLE},priority=200,udp,"
                                                   "actions=drop")),
        # our cookie, our match, other actions
        ("changed", lambda: lab.ofctl("mod-flows", f"table={TABLE},cookie={COOKIE}/-1,"
                                                   "icmp,actions=drop")),
    ]
    with agent_session(tmp_path, lab, protocols=["udp", "icmp"],
                       metrics="127.0.0.1:9531") as session:
        installed = _actions(wait_for(lambda: len(deny_flows(lab)) == 4 and deny_flows(lab),
                                      what="ovsflow's deny flows"))
        pinger = lab.pod1.popen("ping", "-i", "0.05", "-W", "1", lab.pod2.address,
                                stdout=subprocess.DEVNULL)
        took = {}
        for port, (what, act) in enumerate(damage, start=5001):
            time.sleep(0.5)
            act()  # (a check may come at once: the log below says what each one saw)
            took[what] = restored_within(lab, installed)
            lab.pod1.traffic("udp", lab.pod2.address, str(port), "3", "50")
        assert "meter=28518 pktps burst stats bands=" in lab.ofctl("dump-meters")
        time.sleep(1.5)
        metrics = urllib.request.urlopen("http://127.0.0.1:9531/metrics",
                                         timeout=5).read().decode()
        health = urllib.request.urlopen("http://127.0.0.1:9531/healthz", timeout=5).status
        pinger.terminate()
        pinger.wait()
    assert all(seconds < 2.0 for seconds in took.values()), took
    assert metric(metrics, "ovsflow_deny_flows_restored_total") == 4
    assert health == 200
    lines = [line for line in session.log.splitlines() if "put back in table" in line]
    assert len(lines) == 4, session.log
    # the drop flow uses no meter: OVS keeps it when the meter goes
    assert "3 of our 4 flows gone; meter 28518 gone" in lines[0]
    assert "4 of our 4 flows gone" in lines[1]
    assert "1 of our 4 flows gone" in lines[2]
    assert "1 of our 4 flows gone; 1 flows with our cookie changed" in lines[3]
    deny = [r for r in session.records if r["_templateId"] == 260]
    by_port = {}
    for r in deny:
        if r["protocolIdentifier"] == 17:
            port = r["destinationTransportPort"]
            by_port[port] = by_port.get(port, 0) + r["packetDeltaCount"]
    assert by_port == {5001: 3, 5002: 3, 5003: 3, 5004: 3}  # records resume after each
    pings = [r for r in deny if r["protocolIdentifier"] == 1]
    assert sum(r["packetDeltaCount"] for r in pings) >= 20


def test_health_says_the_flows_are_missing_while_the_switch_refuses_them_back(lab):
    """The flows are deleted and OVS refuses them back (a flow limit of 1 with
    overflow_policy=refuse in the deny table): problem() names what is missing, then the
    error, until the limit goes and they are back."""
    async def scenario():
        source = in_process_source(lab.run_dir, lab.bridge)
        source.check_interval = 0.2
        task = asyncio.create_task(source.run())
        try:
            await asyncio.wait_for(source.installed_event.wait(), 10)
            assert source.problem() is None
            lab.vsctl("--", "--id=@ft", "create", "Flow_Table", "flow_limit=1",
                      "overflow_policy=refuse", "--", "set", "Bridge", lab.bridge,
                      f"flow_tables:{TABLE}=@ft")
            damaged = time.monotonic()
            lab.ofctl("del-flows", f"cookie={COOKIE}/-1")
            await asyncio.sleep(1.0)
            missing = source.problem(), source.healthy, source.restorations
            lab.vsctl("clear", "Bridge", lab.bridge, "flow_tables")
            await asyncio.sleep(2.5)  # backoff 0.1-1 s, a session, a check
            return damaged, missing, (source.problem(), source.healthy)
        finally:
            await stop(task)

    damaged, (problem, healthy, restorations), recovered = asyncio.run(scenario())
    since, why = problem
    assert damaged <= since <= damaged + 0.5 and not healthy and restorations == 0
    assert "FLOW_MOD_FAILED/TABLE_FULL" in why, why
    assert recovered == (None, True)
    assert len(deny_flows(lab)) == 3


def test_reading_flows_back_does_not_disturb_a_reload(lab, tmp_path):
    """A SIGHUP's reconcile and the checks share a lock: no restoration is counted for a
    reconcile the check saw half done."""
    import signal

    from test_deny import write_config
    with agent_session(tmp_path, lab, metrics="127.0.0.1:9532") as session:
        wait_for(lambda: len(deny_flows(lab)) == 3, what="ovsflow's deny flows")
        for protocols in (["tcp"], ["udp", "icmp"], ["udp"]) * 3:
            write_config(tmp_path, lab, session.port, protocols=protocols,
                         metrics="127.0.0.1:9532")
            session.agent.send_signal(signal.SIGHUP)
            time.sleep(0.4)
        wait_for(lambda: len(deny_flows(lab)) == 3, what="udp flows again")
        time.sleep(1.5)
        metrics = urllib.request.urlopen("http://127.0.0.1:9532/metrics",
                                         timeout=5).read().decode()
    assert metric(metrics, "ovsflow_deny_flows_restored_total") == 0
    assert "put back" not in session.log
