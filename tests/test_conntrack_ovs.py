"""The OVS userspace datapath's conntrack: real ovs-vswitchd, pods in namespaces, the
dpctl text through our unixctl client and parser, and `ovsflow run` on top."""

import json
import signal
import subprocess
import time

import pytest

from helpers import OVSFLOW, Collector, agent_config
from lab.netns import LAB, PYTHON
from lab.ovs_lab import CONNTRACK_PIPELINE, OvsLab


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = OvsLab(tmp_path_factory.mktemp("ovs"))
    try:
        lab.client = lab.add_pod("10.66.0.1/24")
        lab.server = lab.add_pod("10.66.0.2/24")
        for flow in CONNTRACK_PIPELINE:
            lab.ofctl("add-flow", flow)
        yield lab
    finally:
        lab.stop()


def config(tmp_path, lab, source="auto", protocols=(), port=4739):
    return agent_config(tmp_path, port, list(protocols), conntrack={"source": source},
                        ovs={"runDir": lab.run_dir, "bridge": lab.bridge})


def tcp_exchange(lab, port: int) -> dict:
    server = lab.server.popen(PYTHON, "-u", str(LAB / "traffic.py"), "tcp-server", str(port),
                              "3000", stdout=subprocess.PIPE, text=True)
    assert "listening" in server.stdout.readline()
    client = json.loads(lab.client.traffic("tcp-client", lab.server.address, str(port),
                                           "5000", "1", "0").stdout)
    server.wait(timeout=30)
    assert client["received"] == 3000  # the bytes really crossed the bridge
    return client


@pytest.mark.parametrize("source", ["ovs", "auto"])
def test_conntrack_command_reads_the_userspace_datapath(lab, tmp_path, source):
    client = tcp_exchange(lab, 8000 + (source == "auto"))
    lab.client.traffic("udp", lab.server.address, "5353", "2", "50")
    lab.client.run("ping", "-c", "1", "-W", "1", lab.server.address)
    result = subprocess.run([OVSFLOW, "conntrack", "--config", config(tmp_path, lab, source)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    [tcp] = [e for e in entries if e["protocol"] == 6 and e["sourcePort"] == client["sport"]]
    assert (tcp["source"], tcp["destination"]) == ("10.66.0.1", "10.66.0.2")
    assert (tcp["replySource"], tcp["replyDestinationPort"]) == ("10.66.0.2", client["sport"])
    assert tcp["zone"] == 65520
    assert tcp["state"] in ("FIN_WAIT_2", "TIME_WAIT", "CLOSING", "CLOSE_WAIT", "LAST_ACK")
    assert tcp["octets"] is None and tcp["packets"] is None  # none kept: none invented
    assert any(e["protocol"] == 17 and e["destinationPort"] == 5353 for e in entries)
    assert any(e["protocol"] == 1 and e["icmpType"] == 8 for e in entries)


def test_agent_exports_userspace_connections_without_counters(lab, tmp_path):
    collector = Collector("udp://127.0.0.1:0", timeout=60)
    agent = subprocess.Popen([OVSFLOW, "run", "--config",
                              config(tmp_path, lab, "auto", ["tcp"], collector.port)],
                             stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        client = tcp_exchange(lab, 8100)
        lab.client.traffic("udp", lab.server.address, "5354", "2", "50")
        time.sleep(2)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, agent.stderr.read()
    finally:
        if agent.poll() is None:
            agent.kill()
        records = collector.stop_and_read()
    assert records and {r["protocolIdentifier"] for r in records} == {6}
    ours = [r for r in records if r["sourceTransportPort"] == client["sport"]]
    assert ours and {r["_templateId"] for r in ours} == {258}
    assert all("octetTotalCount" not in r and "packetDeltaCount" not in r for r in ours)
    assert ours[0]["destinationIPv4Address"] == "10.66.0.2"
    assert ours[0]["destinationTransportPort"] == 8100
    assert ours[-1]["tcpState"] in ("FIN_WAIT_2", "TIME_WAIT", "CLOSING", "CLOSE_WAIT")
