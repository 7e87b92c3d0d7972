"""The deny path while its collector is away (issue 29): denied packets on a real Open
vSwitch (userspace datapath) reach ovsflow as packet-ins; the TCP collector goes away
while the agent runs, is still away at its SIGTERM, and comes back while the next agent
runs. The PyPI `ipfix` package decodes what it received (tests/ipfix_sink.py): each
denied flow's packet deltas add up to the packets sent, once (before issue 29 the
collector summed 30 of 60)."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import yaml

from helpers import OVSFLOW, agent_config, free_port
from ipfix_sink import StreamSink
from test_delivery import handling_signals, until_received
from test_deny import TABLE, deny_flows, lab, wait_for

__all__ = ["lab"]  # the fixture, from test_deny

UDP_PORT = 5353
PAYLOAD = 100  # bytes: 128 on the IP layer


def start(lab, directory: Path, collector: str) -> subprocess.Popen:
    """An agent, once its own OpenFlow session is up and its flows in place (the previous
    agent's flows stay on the bridge: packets denied before the session is up reach no
    controller)."""
    port = free_port()
    config = agent_config(directory, 0, ["udp"],
                          flowExporter={"idleFlowExportTimeout": "60s"},
                          ovs={"runDir": lab.run_dir, "bridge": lab.bridge, "denyTable": TABLE},
                          ipfix={"collectors": [collector]},
                          metrics={"bindAddress": f"127.0.0.1:{port}"},
                          state={"directory": str(directory / "state")})
    settings = yaml.safe_load(Path(config).read_text())
    del settings["flowExporter"]["flowCollectorAddr"]
    Path(config).write_text(yaml.safe_dump(settings))
    agent = handling_signals(subprocess.Popen([OVSFLOW, "run", "--config", config],
                                              stderr=subprocess.PIPE, text=True))
    wait_for(lambda: session_up(port), what="the agent's OpenFlow session")
    wait_for(lambda: len(deny_flows(lab)) == 3, what="ovsflow's deny flows")
    return agent


def session_up(port: int) -> bool:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    except OSError:
        return False
    return any(line.startswith("ovsflow_openflow_connections_total ") and
               float(line.split()[1]) >= 1 for line in text.splitlines())


def stop(agent: subprocess.Popen) -> str:
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0
    return agent.stderr.read()


def deny(lab, sent: Counter, ports: range, count: int) -> None:
    """`count` denied UDP datagrams from each source port in `ports`."""
    for port in ports:
        lab.pod1.traffic("udp", lab.pod2.address, str(UDP_PORT), str(count), str(PAYLOAD),
                         str(port))
        sent[port] += count


def test_denied_packets_reach_a_collector_away_across_a_restart_each_once(lab, tmp_path):
    sink = StreamSink(tmp_path / "collector")
    collector = f"127.0.0.1:{sink.port}:tcp"
    sent: Counter[int] = Counter()
    agents = []
    try:
        agent = start(lab, tmp_path, collector)
        agents.append(agent)
        deny(lab, sent, range(5001, 5005), 10)
        time.sleep(2.5)
        sink.stop()  # away while the agent runs...
        deny(lab, sent, range(5001, 5006), 10)
        time.sleep(2.5)
        first = stop(agent)  # ...and at its SIGTERM
        agent = start(lab, tmp_path, collector)
        agents.append(agent)
        deny(lab, sent, range(5001, 5004), 10)
        time.sleep(1.5)
        before = len(sink.records())
        sink.start()
        until_received(sink, before)
        deny(lab, sent, range(5006, 5007), 10)
        time.sleep(2.5)
        second = stop(agent)
        sink.stop()
        records = [r for r in sink.records() if r.get("destinationTransportPort") == UDP_PORT
                   and r.get("ingressNetworkPolicyRuleName") == "42"]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        sink.stop()
    assert "kept for the next agent" in first, first
    assert "queued again" in second, second
    received: Counter[int] = Counter()
    octets: Counter[int] = Counter()
    for r in records:
        received[r["sourceTransportPort"]] += r["packetDeltaCount"]
        octets[r["sourceTransportPort"]] += r["octetDeltaCount"]
    assert received == sent, (received, sent)
    assert octets == Counter({port: count * (PAYLOAD + 28) for port, count in sent.items()})
