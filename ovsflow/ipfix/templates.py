"""The templates ovsflow exports, and how a `FlowRecord` fills each of them.

Each template is a list of (information element, FlowRecord attribute); one
`operator.attrgetter` per template pulls a record's values in wire order in a single C call,
and `RecordTemplate.encode_many` encodes a batch of records without a Python loop over them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter

from ..record import CONNTRACK, CONNTRACK_UNCOUNTED, DENY, FlowRecord
from .codec import Template, TemplateField
from .elements import element

# The elements ovsflow shares with Antrea's agent come first and in the order of Antrea's
# templates (pkg/agent/flowexporter/exporter/ipfix.go: IANA common, addresses, reverse
# counters, Antrea's), so that a collector written for Antrea's records reads ours; the
# elements Antrea does not send follow. Deltas stay after totals: nfdump relies on it.
_HEAD = [
    ("flowStartSeconds", "start_seconds"), ("flowEndSeconds", "end_seconds"),
    ("flowEndReason", "end_reason"),
    ("sourceTransportPort", "source_port"), ("destinationTransportPort", "destination_port"),
    ("protocolIdentifier", "protocol"),
]
_COUNTERS = [
    ("packetTotalCount", "packets"), ("octetTotalCount", "octets"),
    ("packetDeltaCount", "packet_delta"), ("octetDeltaCount", "octet_delta"),
]
_V4_ADDRESSES = [
    ("sourceIPv4Address", "source_address"), ("destinationIPv4Address", "destination_address"),
]
_V6_ADDRESSES = [
    ("sourceIPv6Address", "source_address"), ("destinationIPv6Address", "destination_address"),
]
_REVERSE_COUNTERS = [
    ("reversePacketTotalCount", "reverse_packets"), ("reverseOctetTotalCount", "reverse_octets"),
    ("reversePacketDeltaCount", "reverse_packet_delta"),
    ("reverseOctetDeltaCount", "reverse_octet_delta"),
]
_PODS = [
    ("sourcePodName", "source_pod_name"), ("sourcePodNamespace", "source_pod_namespace"),
    ("sourceNodeName", "source_node_name"),
    ("destinationPodName", "destination_pod_name"),
    ("destinationPodNamespace", "destination_pod_namespace"),
    ("destinationNodeName", "destination_node_name"),
]
_RULES = [
    ("ingressNetworkPolicyRuleName", "ingress_rule_name"),
    ("ingressNetworkPolicyRuleAction", "ingress_rule_action"),
    ("egressNetworkPolicyRuleName", "egress_rule_name"),
    ("egressNetworkPolicyRuleAction", "egress_rule_action"),
]
_TCP_STATE = [("tcpState", "tcp_state")]
_FLOW_TYPE = [("flowType", "flow_type")]
# Not in Antrea's templates: nfdump reads only the millisecond times and, in Debian 12's
# version, ICMP type and code only from icmpTypeCode*.
_MILLISECONDS = [("flowStartMilliseconds", "start_ms"), ("flowEndMilliseconds", "end_ms")]
_V4_ICMP = [("icmpTypeCodeIPv4", "icmp_type_code"),
            ("icmpTypeIPv4", "icmp_type"), ("icmpCodeIPv4", "icmp_code")]
_V6_ICMP = [("icmpTypeCodeIPv6", "icmp_type_code"),
            ("icmpTypeIPv6", "icmp_type"), ("icmpCodeIPv6", "icmp_code")]
# The kernel's conntrack id: unique among a node's live connections. The OVS userspace
# datapath's ids are not reliably so, and its templates leave flowId out.
_FLOW_ID = [("flowId", "flow_id")]


def _fields(kind: str, ipv6: bool) -> list[tuple[str, str]]:
    """One template's (element name, FlowRecord attribute) list, in the order above."""
    counted, conntrack = kind != CONNTRACK_UNCOUNTED, kind != DENY
    return (_HEAD + (_COUNTERS if counted else []) + (_V6_ADDRESSES if ipv6 else _V4_ADDRESSES)
            + (_REVERSE_COUNTERS if counted and conntrack else []) + _PODS + _RULES
            + (_TCP_STATE if conntrack else []) + _FLOW_TYPE + _MILLISECONDS
            + (_V6_ICMP if ipv6 else _V4_ICMP) + (_FLOW_ID if kind == CONNTRACK else []))


@dataclass(frozen=True)
class RecordTemplate:
    template: Template
    values: attrgetter  # FlowRecord -> tuple in the template's field order
    # FlowRecords of this template -> their data records, in order (Template.bulk_encoder)
    encode_many: Callable[[Sequence[FlowRecord]], list[bytes]]

    def encode(self, record: FlowRecord) -> bytes:
        return self.template.encode_record(self.values(record))


def _record_template(template_id: int, fields: list[tuple[str, str]]) -> RecordTemplate:
    template = Template(template_id, [
        TemplateField(element(name), element(name).default_length) for name, _ in fields])
    attributes = [attribute for _, attribute in fields]
    return RecordTemplate(template, attrgetter(*attributes), template.bulk_encoder(attributes))


# (kind, is IPv6) -> template. Ids are fixed so that collectors see stable templates.
RECORD_TEMPLATES: dict[tuple[str, bool], RecordTemplate] = {
    (kind, ipv6): _record_template(template_id, _fields(kind, ipv6))
    for template_id, (kind, ipv6) in enumerate(
        [(CONNTRACK, False), (CONNTRACK, True), (CONNTRACK_UNCOUNTED, False),
         (CONNTRACK_UNCOUNTED, True), (DENY, False), (DENY, True)], start=256)
}

ALL_TEMPLATES = [t.template for t in RECORD_TEMPLATES.values()]


def template_for(record: FlowRecord) -> RecordTemplate:
    return RECORD_TEMPLATES[record.kind, len(record.source_address) == 16]
