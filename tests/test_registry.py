"""ovsflow's information elements and templates against Antrea's: the go-ipfix registry (a
copy in tests/data, source named in its header) and the order of Antrea's templates."""

import csv
from pathlib import Path

import pytest

from ovsflow.ipfix.elements import ANTREA_PEN, _BY_KEY, lookup
from ovsflow.ipfix.templates import RECORD_TEMPLATES
from ovsflow.record import CONNTRACK, CONNTRACK_UNCOUNTED

REGISTRY = Path(__file__).parent / "data" / "go_ipfix_registry.csv"

# pkg/agent/flowexporter/exporter/ipfix.go (antrea-io/antrea fc70f2bb): the IPv4 template is
# IANAInfoElementsIPv4 + IANAReverseInfoElements + AntreaInfoElementsIPv4, in this order.
ANTREA_IPV4_TEMPLATE = [
    "flowStartSeconds", "flowEndSeconds", "flowEndReason", "sourceTransportPort",
    "destinationTransportPort", "protocolIdentifier", "packetTotalCount", "octetTotalCount",
    "packetDeltaCount", "octetDeltaCount", "sourceIPv4Address", "destinationIPv4Address",
    "reversePacketTotalCount", "reverseOctetTotalCount", "reversePacketDeltaCount",
    "reverseOctetDeltaCount",
    "sourcePodName", "sourcePodNamespace", "sourceNodeName", "destinationPodName",
    "destinationPodNamespace", "destinationNodeName", "destinationServicePort",
    "destinationServicePortName", "ingressNetworkPolicyName", "ingressNetworkPolicyNamespace",
    "ingressNetworkPolicyType", "ingressNetworkPolicyRuleName", "ingressNetworkPolicyRuleAction",
    "egressNetworkPolicyName", "egressNetworkPolicyNamespace", "egressNetworkPolicyType",
    "egressNetworkPolicyRuleName", "egressNetworkPolicyRuleAction", "tcpState", "flowType",
    "egressName", "egressIP", "egressNodeName", "proxySnatPort", "destinationClusterIPv4",
    "proxySnatIPv4", "destinationServiceIPv4",
]
ANTREA_IPV6_TEMPLATE = [name.replace("IPv4", "IPv6") for name in ANTREA_IPV4_TEMPLATE]


def go_ipfix_rows() -> list[dict]:
    lines = [line for line in REGISTRY.read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines))


def test_every_element_matches_go_ipfix():
    rows = go_ipfix_rows()
    expected = {(int(r["enterprise"]), int(r["elementId"])): (r["name"], r["dataType"])
                for r in rows}
    ours = {key: (e.name, e.data_type) for key, e in _BY_KEY.items()}
    assert ours == expected


@pytest.mark.parametrize("element_id, name", [
    (100, "sourcePodNamespace"), (101, "sourcePodName"), (102, "destinationPodNamespace"),
    (103, "destinationPodName"), (104, "sourceNodeName"), (105, "destinationNodeName")])
def test_pod_and_node_elements_are_antrea_strings(element_id, name):
    found = lookup(ANTREA_PEN, element_id)
    assert (found.name, found.data_type) == (name, "string")


@pytest.mark.parametrize("key", list(RECORD_TEMPLATES))
def test_shared_elements_in_antreas_order(key):
    names = [f.element.name for f in RECORD_TEMPLATES[key].template.fields]
    antrea = ANTREA_IPV6_TEMPLATE if key[1] else ANTREA_IPV4_TEMPLATE
    shared = [name for name in names if name in antrea]
    assert shared == [name for name in antrea if name in shared]
    # and the shared ones lead: what Antrea does not send comes after
    assert names[:len(shared)] == shared


COUNTERS = ["packetTotalCount", "octetTotalCount", "packetDeltaCount", "octetDeltaCount"]
REVERSE_COUNTERS = ["reverse" + name[0].upper() + name[1:] for name in COUNTERS]


@pytest.mark.parametrize("key", list(RECORD_TEMPLATES))
def test_deltas_after_totals(key):
    """nfdump takes the first packet and octet counter of a record and ignores a second one of
    the same kind: totals come before deltas, in both directions."""
    names = [f.element.name for f in RECORD_TEMPLATES[key].template.fields]
    kind = key[0]
    assert [n for n in names if n in COUNTERS] == ([] if kind == CONNTRACK_UNCOUNTED
                                                   else COUNTERS)
    assert [n for n in names if n in REVERSE_COUNTERS] == (REVERSE_COUNTERS if kind == CONNTRACK
                                                           else [])


def test_icmp_type_code_beside_type_and_code():
    for (kind, ipv6), record_template in RECORD_TEMPLATES.items():
        names = [f.element.name for f in record_template.template.fields]
        family = "IPv6" if ipv6 else "IPv4"
        position = names.index(f"icmpTypeCode{family}")
        assert names[position:position + 3] == [
            f"icmpTypeCode{family}", f"icmpType{family}", f"icmpCode{family}"]


def test_flow_id_only_where_it_is_unique():
    with_flow_id = {key for key, rt in RECORD_TEMPLATES.items()
                    if "flowId" in [f.element.name for f in rt.template.fields]}
    assert with_flow_id == {(CONNTRACK, False), (CONNTRACK, True)}
