"""A record says something or is not sent (docs/ipfix.md § When a record is sent), end to
end: real kernel conntrack in a network namespace, `ovsflow run` at Antrea's defaults scaled
down five times (poll 1 s, active 1 s, idle 3 s), the records decoded by the PyPI `ipfix`
package (tests/ipfix_sink.py), the totals read from `conntrack -L`."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

from helpers import OVSFLOW, agent_config
from ipfix_sink import DatagramSink
from lab.netns import PYTHON, Netns
from ovsflow.record import ACTIVE_TIMEOUT, IDLE_TIMEOUT
from test_restart import COUNTERS, conntrack_totals, sums

LAB = Path(__file__).resolve().parents[1] / "lab"
IDLE = 10_000
SERVER_PORT = 7070  # test_restart's conntrack_totals reads this port's entries


def test_an_idle_table_costs_two_records_a_connection_and_the_moving_ones_add_up(tmp_path):
    """10,000 TCP entries that never move (lab/ctfill.py) get their first record and their
    idle record each, and nothing more in the ~10 s that follow, nor at SIGTERM (the export
    state carries them). Beside them, connections that pause longer than the active timeout
    between chunks skip the records that would say nothing, and their deltas still sum to
    conntrack's totals."""
    ns = Netns("sent")
    sink = None
    try:
        ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1",
               "net.netfilter.nf_conntrack_timestamp=1")
        for chain in ("OUTPUT", "PREROUTING"):
            ns.run("iptables", "-t", "raw", "-A", chain, "-j", "CT", "--zone", "65520")
        ns.run(PYTHON, "-m", "lab.ctfill", "udp", "0", "--tcp", str(IDLE))
        sink = DatagramSink(tmp_path / "datagrams", ns.prefix())
        config = agent_config(
            tmp_path, sink.port, ["tcp"],
            flowExporter={"flowPollInterval": "1s", "activeFlowExportTimeout": "1s",
                          "idleFlowExportTimeout": "3s"},
            state={"directory": str(tmp_path / "state")})
        control = tmp_path / "control"
        control.mkdir()
        server = ns.popen(PYTHON, str(LAB / "traffic.py"), "steady-server", str(SERVER_PORT),
                          "300", stdout=subprocess.PIPE, text=True)
        assert "listening" in server.stdout.readline()
        agent = ns.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.PIPE,
                         text=True)
        time.sleep(1.5)  # the agent has switched accounting on: then the moving ones
        clients = ns.popen(PYTHON, str(LAB / "traffic.py"), "steady-clients", "127.0.0.1",
                           str(SERVER_PORT), "4", "700", "2.3", str(control),
                           stdout=subprocess.PIPE, text=True)
        ports = json.loads(clients.stdout.readline())["ports"]
        time.sleep(12)
        (control / "stop").touch()
        time.sleep(1.5)
        totals = conntrack_totals(ns)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, agent.stderr.read()
        (control / "close").touch()
        time.sleep(0.5)
        records = sink.records()
    finally:
        if sink is not None:
            sink.stop()
        ns.delete()

    by_connection = defaultdict(list)
    for r in records:
        by_connection[r["sourceTransportPort"], r["destinationTransportPort"]].append(r)
    idle = [found for (sport, dport), found in by_connection.items() if dport == 53]
    assert len(idle) == IDLE
    assert all([r["flowEndReason"] for r in found] == [ACTIVE_TIMEOUT, IDLE_TIMEOUT]
               for found in idle), [found for found in idle if len(found) != 2][:3]
    assert all(sum(r[name] for r in found) == 0 for found in idle for name in COUNTERS)

    moving = {sport: found for (sport, dport), found in by_connection.items()
              if dport == SERVER_PORT}
    assert sorted(moving) == sorted(ports) == sorted(totals)
    for port, found in moving.items():
        assert sums(found) == totals[port], port
        assert all(r["octetDeltaCount"] > 0 for r in found[1:]), found  # none says nothing
        lifetime = (found[-1]["flowEndMilliseconds"] - found[0]["flowStartMilliseconds"]
                    ).total_seconds()
        # a chunk every 2.3 s, an active timeout every second: about one record per chunk,
        # where a record per active timeout would be twice as many
        assert 3 <= len(found) <= lifetime / 1.5, (lifetime, found)
