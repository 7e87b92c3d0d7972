"""What a stopping agent does with what still comes at it: a SIGHUP during the final flush
(the final records go where the running configuration sends them, none dropped), and deny
records while every conntrack poll fails (the deny path does not wait for the poll).
Kernel conntrack in a namespace and real Open vSwitch, `ovsflow run` and `ovsflow collect`
as processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from collecting import Output
from helpers import OVSFLOW, Collector, agent_config, filled_namespace
from ipfix_sink import DatagramSink
from lab.ovs_lab import OvsLab
from ovsflow.record import FORCED_END, IDLE_TIMEOUT

ENTRIES = 60_000


def test_a_sighup_during_shutdown_drops_nothing(tmp_path):
    with filled_namespace("hupstop", ENTRIES) as node:
        old = Collector("tcp://127.0.0.1:0", timeout=300, prefix=node.prefix())
        new = Collector("tcp://127.0.0.1:0", timeout=300, prefix=node.prefix())
        old_output, new_output = Output(old), Output(new)
        path = Path(agent_config(tmp_path, old.port, ["udp"], flowExporter={
            "flowCollectorAddr": f"127.0.0.1:{old.port}:tcp",
            "activeFlowExportTimeout": "10m", "idleFlowExportTimeout": "10m"}))
        agent = node.popen(OVSFLOW, "run", "--config", str(path), stderr=subprocess.PIPE,
                           text=True)
        try:
            time.sleep(5)  # every entry tracked
            config = yaml.safe_load(path.read_text())
            config["flowExporter"]["flowCollectorAddr"] = f"127.0.0.1:{new.port}:tcp"
            path.write_text(yaml.safe_dump(config))
            agent.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # the final records are on their way
            agent.send_signal(signal.SIGHUP)
            assert agent.wait(timeout=120) == 0
            log = agent.stderr.read()
            final = old_output.until_disconnected()
        finally:
            old.stop()
            new_output.stop()
            new.stop()
    reasons = Counter(r["flowEndReason"] for r in final)
    assert reasons[FORCED_END] == ENTRIES, (reasons, log)
    assert len({r["sourceIPv4Address"] for r in final
                if r["flowEndReason"] == FORCED_END}) == ENTRIES
    assert new_output.records() == []
    assert "reload: refused, the agent is stopping" in log
    assert set(re.findall(r"(\d+) (?:records )?dropped", log)) <= {"0"}, log
    assert "unsent" not in log, log


@pytest.fixture
def lab(tmp_path):
    lab = OvsLab(tmp_path / "ovs")
    try:
        lab.client = lab.add_pod("10.68.0.1/24", name="client")
        lab.server = lab.add_pod("10.68.0.2/24", name="server")
        lab.ofctl("add-flow", f"table=0,priority=100,ip,nw_src={lab.client.address},"
                  "actions=load:5->NXM_NX_REG3[],resubmit(,250)")
        lab.ofctl("add-flow", "table=0,priority=1,actions=NORMAL")
        yield lab
    finally:
        lab.stop()


def test_deny_records_flow_while_conntrack_polls_fail(lab, tmp_path):
    sink = DatagramSink(tmp_path / "datagrams")
    config = agent_config(
        tmp_path, sink.port, ["udp"],
        flowExporter={"flowPollInterval": "300ms", "activeFlowExportTimeout": "1s",
                      "idleFlowExportTimeout": "2s"},
        conntrack={"source": "ovs", "zones": [65520]},
        ovs={"runDir": lab.run_dir, "bridge": lab.bridge, "denyTable": 250})
    pidfile = Path(lab.run_dir, "ovs-vswitchd.pid")
    pid = pidfile.read_text()
    agent = subprocess.Popen([OVSFLOW, "run", "--config", config], stderr=subprocess.PIPE,
                             text=True)
    try:
        time.sleep(2)
        # Every conntrack poll now fails (the unixctl socket it names is not there); the
        # deny path's OpenFlow connection is another socket and works on.
        pidfile.write_text(f"{os.getpid() + 1_000_000}\n")
        time.sleep(1)
        lab.client.traffic("udp", lab.server.address, "53", "7", "40")
        time.sleep(4)  # active, then idle timeout, while polls fail
        records = [r for r in sink.records() if r.get("destinationTransportPort") == 53]
    finally:
        pidfile.write_text(pid)
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=60)
        log = agent.stderr.read()
        sink.stop()
    assert code == 0, log
    assert "conntrack poll failed" in log
    assert sum(r["packetDeltaCount"] for r in records) == 7, (records, log)
    assert records[-1]["flowEndReason"] == IDLE_TIMEOUT
