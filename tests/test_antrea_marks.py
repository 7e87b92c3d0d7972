"""Beside Antrea, the conntrack layer leaves out what Antrea's policy denied after a commit
(filter.py, docs/antrea.md § Connections Antrea committed and then denied): the lab's
stand-in for Antrea's agent (lab/antrea.py) on a bridge of the userspace datapath, and
`conntrack.source: ovs`. The stand-in's EndpointDNAT commits a Service's connections before
the policy stages, and its ConntrackCommit table writes the packet's source into ct_mark
[0..3] once policy allowed them, as Antrea's pipeline does (docs/design/ovs-pipeline.md).
Records are read with the PyPI `ipfix` package; conntrack's own view with `ovs-appctl`."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest
import yaml

from helpers import OVSFLOW, free_port, use_antrea_information_model
from lab.antrea import SERVICE_IP, route_services_via_gateway
from test_antrea_mode import lab, metric, start_antrea  # noqa: F401 - lab: a fixture
from test_antrea_records import Datagrams
from test_deny import wait_for

DENIED_PORT, ALLOWED_PORT = 41001, 41002  # the clients' source ports
DNS_ADDRESS = "10.58.0.4"  # the Service's Endpoint, the stand-in's dns Pod


@pytest.fixture(scope="module", autouse=True)
def information_model():
    use_antrea_information_model()


def config(tmp_path, lab, name: str, collector: int, deny_source: str,
           metrics: str = "") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "flowExporter": {"flowCollectorAddr": f"127.0.0.1:{collector}:udp",
                         "flowPollInterval": "500ms", "activeFlowExportTimeout": "1s",
                         "idleFlowExportTimeout": "30s", "protocols": ["udp"]},
        "conntrack": {"source": "ovs", "zones": [65520]},
        "ovs": {"runDir": lab.run_dir, "bridge": lab.bridge, "denySource": deny_source},
        "metrics": {"bindAddress": metrics}, "state": {"directory": ""}}))
    return str(path)


def conntrack_entries(lab) -> dict[int, int]:
    """ovs-vswitchd's own view of the Service's entries: client source port -> ct_mark."""
    text = lab.appctl("dpctl/dump-conntrack", "zone=65520")
    return {int(re.search(r"sport=(\d+)", line)[1]): int(re.search(r"mark=(\d+)", line)[1])
            if "mark=" in line else 0
            for line in text.splitlines() if f"dst={SERVICE_IP}," in line}


def ovsflow_conntrack(path: str, *options: str) -> str:
    return subprocess.run([OVSFLOW, "conntrack", "--config", path, *options],
                          capture_output=True, text=True, check=True).stdout


def test_a_denied_service_connection_is_the_deny_layers_alone(lab, tmp_path):  # noqa: F811
    """The client Pod is isolated for egress (a Kubernetes NetworkPolicy's default drop):
    its packets to the DNS Service are DNAT-ed and committed by EndpointDNAT, then dropped.
    The server Pod's packets to the same Service are allowed. Both are in conntrack; only
    the allowed one is a conntrack record, the denied one is a deny record."""
    route_services_via_gateway(lab.server)
    start_antrea(lab, tmp_path)
    sink, metrics_port = Datagrams(), free_port()
    beside_antrea = config(tmp_path, lab, "antrea", sink.port, "antrea",
                           f"127.0.0.1:{metrics_port}")
    agent = subprocess.Popen([OVSFLOW, "run", "--config", beside_antrea],
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: metric(metrics_port, "ovsflow_antrea_controller_id") is not None,
                 timeout=15, what="ovsflow on Antrea's controller id")
        lab.client.traffic("udp", SERVICE_IP, "53", "3", "100", str(DENIED_PORT))
        lab.server.traffic("udp", SERVICE_IP, "53", "2", "100", str(ALLOWED_PORT))
        time.sleep(2.5)  # polls, the allowed one's first record
        marks = conntrack_entries(lab)
        filtered = metric(metrics_port, "ovsflow_conntrack_filtered_out_total",
                          '{protocol="udp"}')
        default = config(tmp_path, lab, "table", sink.port, "table")
        listed = {mode: {c["sourcePort"]: c["mark"]
                         for c in map(json.loads, ovsflow_conntrack(path).splitlines())
                         if c["destination"] == SERVICE_IP}
                  for mode, path in (("antrea", beside_antrea), ("table", default))}
        counted = int(ovsflow_conntrack(beside_antrea, "--count"))
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, agent.stderr.read()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    time.sleep(0.5)
    records = [r for r in sink.records()
               if r.get("sourceTransportPort") in (DENIED_PORT, ALLOWED_PORT)]

    # conntrack holds both: the denied one with ServiceCTMark (bit 4) alone, the allowed
    # one with its source too (FromPod, 3), as Antrea's ConntrackCommit writes it
    assert marks == {DENIED_PORT: 0x10, ALLOWED_PORT: 0x13}, marks
    assert listed["table"] == marks  # without the rule: both, with their marks
    assert listed["antrea"] == {ALLOWED_PORT: 0x13}
    assert counted == 1
    assert filtered is not None and filtered >= 1
    # the OVS source's records carry no counters (templates 258/259), deny records do
    conntrack = [r for r in records if "packetDeltaCount" not in r]
    assert {r["sourceTransportPort"] for r in conntrack} == {ALLOWED_PORT}, records
    assert {str(r["destinationIPv4Address"]) for r in conntrack} == {SERVICE_IP}
    denied = [r for r in records if "packetDeltaCount" in r]
    assert all(r["egressNetworkPolicyRuleAction"] == 2 for r in denied)
    assert {r["sourceTransportPort"] for r in denied} == {DENIED_PORT}, records
    assert sum(r["packetDeltaCount"] for r in denied) == 3
    assert {str(r["destinationIPv4Address"]) for r in denied} == {DNS_ADDRESS}
