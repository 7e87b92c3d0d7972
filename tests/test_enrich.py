"""Pod, node, flowType and rule fields of a record (ovsflow/enrich.py); the rule ids decoded
from labels that a real kernel and a real OVS userspace datapath committed."""

import ipaddress
import json
import subprocess
import sys

import pytest

from helpers import OVSFLOW, agent_config
from lab.netns import Netns
from lab.ovs_lab import CONNTRACK_PIPELINE, OvsLab, commit_with_rules
from ovsflow.enrich import (
    FLOW_TYPE_UNKNOWN, FROM_EXTERNAL, INTER_NODE, INTRA_NODE, TO_EXTERNAL, PodNetworks, enrich,
    flow_type, rule_ids,
)
from ovsflow.connection import labels_bytes, labels_value
from ovsflow.pods import PodRef
from ovsflow.record import CONNTRACK, DENY, RULE_ALLOW, RULE_DROP, FlowRecord

WEB, DB = PodRef("shop", "web"), PodRef("shop", "db")
CLUSTER = PodNetworks(["10.10.0.0/16", "fd00:10::/48"])


def packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def label(ingress: int, egress: int) -> bytes:
    return labels_bytes(egress << 32 | ingress)


def test_rule_ids_from_labels():
    assert rule_ids(b"") == (0, 0)
    assert rule_ids(label(12, 11)) == (12, 11)
    assert rule_ids(label(0xFFFFFFFF, 1)) == (0xFFFFFFFF, 1)
    # bits above 63 (Antrea: the L7 VLAN id in 64-75) are not rule ids
    assert rule_ids(labels_bytes(0xABC << 64 | 5)) == (5, 0)


def test_labels_are_the_kernels_host_order_words():
    """The byte layout seen from the kernel (see test_kernel_labels_decode_to_rule_ids):
    labels 0, 1 and 33 set with iptables' connlabel came as 03 00 00 00 02 00 ... on x86-64."""
    raw = bytes.fromhex("03000000020000000000000000000000")
    if sys.byteorder == "little":
        assert raw == labels_bytes(1 << 33 | 3)
    assert labels_value(labels_bytes(1 << 127 | 1 << 64 | 7)) == 1 << 127 | 1 << 64 | 7
    assert labels_bytes(0) == b"" and labels_value(b"") == 0


@pytest.mark.parametrize("source, destination, src, dst, networks, expected", [
    (WEB, DB, "10.10.1.1", "10.10.1.2", PodNetworks(), INTRA_NODE),
    (WEB, None, "10.10.1.1", "10.10.7.9", CLUSTER, INTER_NODE),
    (None, DB, "10.10.7.9", "10.10.1.2", CLUSTER, INTER_NODE),
    (WEB, None, "10.10.1.1", "8.8.8.8", CLUSTER, TO_EXTERNAL),
    (None, DB, "192.168.1.10", "10.10.1.2", CLUSTER, FROM_EXTERNAL),
    (WEB, None, "fd00:10::1", "fd00:10:0:7::9", CLUSTER, INTER_NODE),
    (WEB, None, "fd00:10::1", "2001:db8::1", CLUSTER, TO_EXTERNAL),
    # an IPv4 address is never in an IPv6 network (and the other way round)
    (WEB, None, "10.10.1.1", "253.0.0.16", PodNetworks(["fd00::/8"]), TO_EXTERNAL),
    # without Pod CIDRs inter-node and external cannot be told apart
    (WEB, None, "10.10.1.1", "10.10.7.9", PodNetworks(), FLOW_TYPE_UNKNOWN),
    (None, DB, "8.8.8.8", "10.10.1.2", PodNetworks(), FLOW_TYPE_UNKNOWN),
    # neither end a Pod of this node: not this node's to tell
    (None, None, "10.10.7.9", "10.10.8.9", CLUSTER, FLOW_TYPE_UNKNOWN),
])
def test_flow_type(source, destination, src, dst, networks, expected):
    assert flow_type(source, destination, packed(src), packed(dst), networks) == expected


def test_pod_networks_reject_what_is_not_a_cidr():
    for bad in ["10.10.0.1/16", "10.10.0.0/33", "pods", ""]:
        with pytest.raises(ValueError, match=repr(bad)):
            PodNetworks([bad])


def test_enrich_fills_a_conntrack_record():
    record = FlowRecord(CONNTRACK, packed("10.10.1.1"), packed("10.10.1.2"), 6,
                        labels=label(12, 11))
    enrich(record, WEB, DB, "node-a", CLUSTER)
    assert (record.source_pod_namespace, record.source_pod_name, record.source_node_name) == \
        ("shop", "web", "node-a")
    assert (record.destination_pod_namespace, record.destination_pod_name,
            record.destination_node_name) == ("shop", "db", "node-a")
    assert record.flow_type == INTRA_NODE
    assert (record.ingress_rule_name, record.ingress_rule_action) == ("12", RULE_ALLOW)
    assert (record.egress_rule_name, record.egress_rule_action) == ("11", RULE_ALLOW)


def test_enrich_leaves_unknown_ends_empty_and_deny_rules_alone():
    record = FlowRecord(DENY, packed("8.8.8.8"), packed("10.10.1.2"), 6,
                        ingress_rule_action=RULE_DROP, egress_rule_action=RULE_DROP,
                        ingress_rule_name="7", egress_rule_name="7")
    enrich(record, None, DB, "node-a", CLUSTER)
    assert (record.source_pod_name, record.source_pod_namespace, record.source_node_name) == \
        ("", "", "")
    assert record.destination_node_name == "node-a"
    assert record.flow_type == FROM_EXTERNAL
    assert (record.ingress_rule_name, record.ingress_rule_action) == ("7", RULE_DROP)
    # an allowed connection with only an egress rule
    allowed = FlowRecord(CONNTRACK, packed("10.10.1.1"), packed("8.8.8.8"), 17,
                         labels=label(0, 40))
    enrich(allowed, WEB, None, "node-a", CLUSTER)
    assert (allowed.ingress_rule_name, allowed.ingress_rule_action) == ("", 0)
    assert (allowed.egress_rule_name, allowed.egress_rule_action) == ("40", RULE_ALLOW)
    assert allowed.flow_type == TO_EXTERNAL


def conntrack_entries(tmp_path, prefix: list[str], **sections) -> list[dict]:
    """`ovsflow conntrack`: the connections as the source decoded them, labels included."""
    config = agent_config(tmp_path, 4739, [], **sections)
    result = subprocess.run([*prefix, OVSFLOW, "conntrack", "--config", config],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_kernel_labels_decode_to_rule_ids(tmp_path):
    """Kernel conntrack labelled as Antrea's pipeline would (ingress rule 5 in bits 0-31,
    egress rule 9 in 32-63; iptables' connlabel sets one bit per rule), read back through
    ctnetlink."""
    node = Netns("labels")
    try:
        node.run("iptables", "-t", "raw", "-A", "OUTPUT", "-j", "CT", "--zone", "65520")
        for bit in (0, 2, 32, 35):  # 5 = 0b101, 9 = 0b1001
            node.run("iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "-m",
                     "connlabel", "--label", str(bit), "--set")
        node.run("python3", "-c", "import socket; socket.socket(2, 2).sendto(b'x', "
                                  "('127.0.0.1', 9999))")
        [entry] = [e for e in conntrack_entries(tmp_path, node.prefix())
                   if e["destinationPort"] == 9999]
    finally:
        node.delete()
    assert entry["labels"] == hex(9 << 32 | 5)  # as conntrack -L prints them
    assert rule_ids(labels_bytes(int(entry["labels"], 16))) == (5, 9)


def test_ovs_lab_labels_decode_to_rule_ids(tmp_path):
    """The lab's pipeline commits pod1 > pod2 with ingress rule 12 and egress rule 11 where
    Antrea does; the userspace datapath's dpctl text decodes to those ids."""
    lab = OvsLab(tmp_path / "ovs")
    try:
        pod1, pod2 = lab.add_pod("10.74.0.1/24"), lab.add_pod("10.74.0.2/24")
        for flow in [*CONNTRACK_PIPELINE,
                     commit_with_rules(f"nw_src={pod1.address},nw_dst={pod2.address}", 12, 11)]:
            lab.ofctl("add-flow", flow)
        for client, server in ((pod1, pod2), (pod2, pod1)):
            client.traffic("udp", server.address, "5353", "1", "10")
        entries = conntrack_entries(tmp_path, [], conntrack={"source": "ovs"},
                                    ovs={"runDir": lab.run_dir, "bridge": lab.bridge})
    finally:
        lab.stop()
    by_source = {e["source"]: e for e in entries if e["destinationPort"] == 5353}
    assert by_source["10.74.0.1"]["labels"] == hex(11 << 32 | 12)
    assert by_source["10.74.0.2"]["labels"] == "0x0"  # committed by the pipeline's plain rule
