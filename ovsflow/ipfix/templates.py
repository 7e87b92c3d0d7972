"""The templates ovsflow exports, and how a `FlowRecord` fills each of them.

Each template is a list of (information element, FlowRecord attribute); one
`operator.attrgetter` per template pulls a record's values in wire order in a single C call.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

from ..record import CONNTRACK, CONNTRACK_UNCOUNTED, DENY, FlowRecord
from .codec import Template, TemplateField
from .elements import element

_TIMES = [
    ("flowStartSeconds", "start_seconds"), ("flowEndSeconds", "end_seconds"),
    # nfdump and some others read only the millisecond forms
    ("flowStartMilliseconds", "start_ms"), ("flowEndMilliseconds", "end_ms"),
    ("flowEndReason", "end_reason"),
]
_V4_TUPLE = [
    ("sourceIPv4Address", "source_address"), ("destinationIPv4Address", "destination_address"),
    ("sourceTransportPort", "source_port"), ("destinationTransportPort", "destination_port"),
    ("protocolIdentifier", "protocol"),
    ("icmpTypeIPv4", "icmp_type"), ("icmpCodeIPv4", "icmp_code"),
]
_V6_TUPLE = [
    ("sourceIPv6Address", "source_address"), ("destinationIPv6Address", "destination_address"),
    ("sourceTransportPort", "source_port"), ("destinationTransportPort", "destination_port"),
    ("protocolIdentifier", "protocol"),
    ("icmpTypeIPv6", "icmp_type"), ("icmpCodeIPv6", "icmp_code"),
]
_COUNTERS = [
    ("packetTotalCount", "packets"), ("octetTotalCount", "octets"),
    ("packetDeltaCount", "packet_delta"), ("octetDeltaCount", "octet_delta"),
]
_REVERSE_COUNTERS = [
    ("reversePacketTotalCount", "reverse_packets"), ("reverseOctetTotalCount", "reverse_octets"),
    ("reversePacketDeltaCount", "reverse_packet_delta"),
    ("reverseOctetDeltaCount", "reverse_octet_delta"),
]
_CONNTRACK_TAIL = [("flowId", "flow_id"), ("flowType", "flow_type"), ("tcpState", "tcp_state")]
_DENY_TAIL = [
    ("ingressNetworkPolicyRuleAction", "ingress_rule_action"),
    ("egressNetworkPolicyRuleAction", "egress_rule_action"),
    ("ingressNetworkPolicyRuleName", "ingress_rule_name"),
    ("egressNetworkPolicyRuleName", "egress_rule_name"),
]


@dataclass(frozen=True)
class RecordTemplate:
    template: Template
    values: attrgetter  # FlowRecord -> tuple in the template's field order

    def encode(self, record: FlowRecord) -> bytes:
        return self.template.encode_record(self.values(record))


def _record_template(template_id: int, fields: list[tuple[str, str]]) -> RecordTemplate:
    template = Template(template_id, [
        TemplateField(element(name), element(name).default_length) for name, _ in fields])
    return RecordTemplate(template, attrgetter(*(attribute for _, attribute in fields)))


# (kind, is IPv6) -> template. Ids are fixed so that collectors see stable templates.
RECORD_TEMPLATES: dict[tuple[str, bool], RecordTemplate] = {
    (CONNTRACK, False): _record_template(
        256, _TIMES + _V4_TUPLE + _COUNTERS + _REVERSE_COUNTERS + _CONNTRACK_TAIL),
    (CONNTRACK, True): _record_template(
        257, _TIMES + _V6_TUPLE + _COUNTERS + _REVERSE_COUNTERS + _CONNTRACK_TAIL),
    (CONNTRACK_UNCOUNTED, False): _record_template(258, _TIMES + _V4_TUPLE + _CONNTRACK_TAIL),
    (CONNTRACK_UNCOUNTED, True): _record_template(259, _TIMES + _V6_TUPLE + _CONNTRACK_TAIL),
    (DENY, False): _record_template(260, _TIMES + _V4_TUPLE + _COUNTERS + _DENY_TAIL),
    (DENY, True): _record_template(261, _TIMES + _V6_TUPLE + _COUNTERS + _DENY_TAIL),
}

ALL_TEMPLATES = [t.template for t in RECORD_TEMPLATES.values()]


def template_for(record: FlowRecord) -> RecordTemplate:
    return RECORD_TEMPLATES[record.kind, len(record.source_address) == 16]
