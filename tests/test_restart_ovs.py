"""Rolling restarts with the OVS userspace datapath: its conntrack (no counters: records and
their reasons tell the truth) and the deny path (counted by ovsflow: each packet once). Real
Open vSwitch (lab/ovs_lab.py), `ovsflow run` as processes, records decoded by the PyPI
`ipfix` package."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from helpers import OVSFLOW, agent_config
from ipfix_sink import DatagramSink
from lab.netns import PYTHON
from lab.ovs_lab import CONNTRACK_PIPELINE, OvsLab, commit_with_rules
from ovsflow.record import ACTIVE_TIMEOUT

LAB = Path(__file__).resolve().parents[1] / "lab"
DENY_TABLE, DENY_RULE, SERVER_PORT, DENIED_PORT, DENIED_SPORT = 250, 9, 7070, 5353, 40999


@pytest.fixture
def lab(tmp_path):
    lab = OvsLab(tmp_path / "ovs")
    try:
        lab.web = lab.add_pod("10.67.0.1/24", name="web")
        lab.db = lab.add_pod("10.67.0.2/24", name="db")
        lab.intruder = lab.add_pod("10.67.0.3/24", name="intruder")
        for flow in [*CONNTRACK_PIPELINE,
                     commit_with_rules(f"nw_src={lab.web.address},nw_dst={lab.db.address}",
                                       1, 2),
                     f"table=0,priority=100,ip,nw_src={lab.intruder.address},"
                     f"nw_dst={lab.db.address},actions=load:{DENY_RULE}->NXM_NX_REG3[],"
                     f"resubmit(,{DENY_TABLE})"]:
            lab.ofctl("add-flow", flow)
        lab.sink = DatagramSink(tmp_path / "datagrams")
        yield lab
    finally:
        lab.sink.stop()
        lab.stop()


def start_agent(lab, tmp_path):
    config = agent_config(
        tmp_path, lab.sink.port, ["tcp", "udp"],
        flowExporter={"flowPollInterval": "500ms", "activeFlowExportTimeout": "1s",
                      "idleFlowExportTimeout": "60s"},
        conntrack={"source": "ovs", "zones": [65520]},
        ovs={"runDir": lab.run_dir, "bridge": lab.bridge, "denyTable": DENY_TABLE},
        state={"directory": str(tmp_path / "state")})
    agent = subprocess.Popen([OVSFLOW, "run", "--config", config], stderr=subprocess.PIPE,
                             text=True)
    time.sleep(2)  # the deny flows are in place, a first poll is done
    return agent


def stop(agent) -> str:
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0, agent.stderr.read()
    return agent.stderr.read()


def deny(lab, count):
    lab.intruder.traffic("udp", lab.db.address, str(DENIED_PORT), str(count), "80",
                         str(DENIED_SPORT))


def test_two_rolling_restarts_continue_ovs_connections_and_deny_entries(lab, tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    lab.db.popen(PYTHON, str(LAB / "traffic.py"), "steady-server", str(SERVER_PORT), "100",
                 stdout=subprocess.PIPE)
    time.sleep(0.5)
    clients = lab.web.popen(PYTHON, str(LAB / "traffic.py"), "steady-clients",
                            lab.db.address, str(SERVER_PORT), "5", "300", "0.1", str(control),
                            stdout=subprocess.PIPE, text=True)
    ports = json.loads(clients.stdout.readline())["ports"]
    logs, denied = [], 0
    for round_ in range(3):
        agent = start_agent(lab, tmp_path)
        deny(lab, 10)
        denied += 10
        time.sleep(2.5)
        if round_ == 2:
            (control / "stop").touch()
        logs.append(stop(agent))
        time.sleep(1)
    (control / "close").touch()
    records = lab.sink.records()

    assert "continuing 1 deny entries" in logs[1] and "continuing" in logs[2], logs
    assert any("continuing" in line and "conntrack entries" in line
               for line in logs[2].splitlines()), logs[2]
    connections = defaultdict(list)
    for r in records:
        if r.get("destinationTransportPort") == SERVER_PORT:
            connections[r["sourceTransportPort"]].append(r)
    assert sorted(connections) == sorted(ports)
    for port in ports:
        found = connections[port]
        assert len({r["flowStartMilliseconds"] for r in found}) == 1, port
        assert {r["flowEndReason"] for r in found} == {ACTIVE_TIMEOUT}, port
        assert len(found) >= 6
    denied_records = [r for r in records if r.get("destinationTransportPort") == DENIED_PORT]
    assert sum(r["packetDeltaCount"] for r in denied_records) == denied
    assert sum(r["octetDeltaCount"] for r in denied_records) == denied * (80 + 28)
    assert len({r["flowStartMilliseconds"] for r in denied_records}) == 1
    assert {r["flowEndReason"] for r in denied_records} == {ACTIVE_TIMEOUT}
    assert {r["ingressNetworkPolicyRuleName"] for r in denied_records} == {str(DENY_RULE)}
