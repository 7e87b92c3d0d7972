"""The templates ovsflow exports, and how records fill each of them.

Each template is a list of (information element, FlowRecord attribute). Records come in two
forms. `FlowRecord` objects (the deny path, a few per second): one `operator.attrgetter` per
template pulls a record's values in wire order in a single C call, and
`RecordTemplate.encode_many` encodes a batch without a Python loop over them. Columns (the
connection store, up to 500k records a poll): `RecordTemplate.encode_columns` writes the
records as rows of a numpy structured array, big-endian fields in wire order, so that no
Python code runs per record but fetching its run of strings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter

import numpy as np

from ..record import CONNTRACK, CONNTRACK_UNCOUNTED, DENY, FlowRecord
from .codec import Template, TemplateField, numpy_type
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
# Deny records: the share of packets the packet-in meter let through (IANA 311)
_SAMPLING = [("samplingProbability", "sampling_probability")]


def template_fields(kind: str, ipv6: bool) -> list[tuple[str, str]]:
    """One template's (element name, FlowRecord attribute) list, in the order above."""
    counted, conntrack = kind != CONNTRACK_UNCOUNTED, kind != DENY
    return (_HEAD + (_COUNTERS if counted else []) + (_V6_ADDRESSES if ipv6 else _V4_ADDRESSES)
            + (_REVERSE_COUNTERS if counted and conntrack else []) + _PODS + _RULES
            + (_TCP_STATE if conntrack else []) + _FLOW_TYPE + _MILLISECONDS
            + (_V6_ICMP if ipv6 else _V4_ICMP) + (_FLOW_ID if kind == CONNTRACK else [])
            + (_SAMPLING if kind == DENY else []))


@dataclass(frozen=True)
class RecordTemplate:
    template: Template
    values: attrgetter  # FlowRecord -> tuple in the template's field order
    # FlowRecords of this template -> their data records, in order (Template.bulk_encoder)
    encode_many: Callable[[Sequence[FlowRecord]], list[bytes]]
    # The fields as columns: (attribute, numpy type) of the fixed fields before and after the
    # span, the run from the first to the last variable-length field (Pod, node and rule
    # names, tcpState), which `span` encodes from a record's `span_values`.
    head: tuple[tuple[str, str], ...]
    span: Template
    span_values: attrgetter
    tail: tuple[tuple[str, str], ...]
    _row_types: dict[int, np.dtype] = field(default_factory=dict, compare=False)

    def encode(self, record: FlowRecord) -> bytes:
        return self.template.encode_record(self.values(record))

    def _rows(self, span_length: int) -> np.dtype:
        """Data records whose span is `span_length` bytes: one fixed-size row each."""
        dtype = self._row_types.get(span_length)
        if dtype is None:
            dtype = self._row_types[span_length] = np.dtype(
                [*self.head, (_SPAN, f"V{span_length}"), *self.tail])
        return dtype

    def encode_columns(self, columns: Mapping[str, np.ndarray | int], span_ids: np.ndarray,
                       spans: Sequence[bytes], span_lengths: np.ndarray
                       ) -> tuple[bytes, np.ndarray]:
        """Data records from columns: each fixed field's attribute names an array (one value
        per record) or a number (the same for all); record i's encoded span is
        `spans[span_ids[i]]`, `span_lengths` the lengths of `spans`. Returns the records'
        bytes and where each starts (one more offset than records). Records with spans of
        one length are written together as rows of one structured array, so they come out
        grouped by that length, not in the order given. Values must fit their fields (numpy
        would wrap them): the caller checks what can overflow."""
        lengths = span_lengths[span_ids]
        if lengths[0] == lengths.min() == lengths.max():  # one length, as usual: in order
            groups = [(None, int(lengths[0]))]
        else:
            order = np.argsort(lengths, kind="stable")
            sorted_lengths = lengths[order]
            firsts = np.flatnonzero(sorted_lengths[1:] != sorted_lengths[:-1]) + 1
            groups = [(order[first:end], int(sorted_lengths[first])) for first, end in
                      zip([0, *firsts.tolist()], [*firsts.tolist(), len(order)])]
        parts, row_lengths, counts = [], [], []
        for chosen, span_length in groups:
            dtype = self._rows(span_length)
            rows = np.empty(len(span_ids) if chosen is None else len(chosen), dtype)
            for name, _ in self.head + self.tail:
                column = columns[name]
                rows[name] = column if chosen is None or not isinstance(column, np.ndarray) \
                    else column[chosen]
            group_ids = span_ids if chosen is None else span_ids[chosen]
            rows[_SPAN] = np.frombuffer(b"".join(pick(spans, group_ids.tolist())),
                                        dtype.fields[_SPAN][0])
            parts.append(rows.tobytes())
            row_lengths.append(dtype.itemsize)
            counts.append(len(rows))
        if len(groups) == 1:
            starts = np.arange(len(span_ids) + 1, dtype=np.int64) * row_lengths[0]
        else:
            starts = np.zeros(len(span_ids) + 1, np.int64)
            np.cumsum(np.repeat(row_lengths, counts), out=starts[1:])
        return b"".join(parts), starts


def pick(items: Sequence, indexes: list[int]) -> Sequence:
    """items[i] for each of `indexes`, in one C call (operator.itemgetter)."""
    if len(indexes) == 1:
        return [items[indexes[0]]]
    return itemgetter(*indexes)(items) if indexes else []


_SPAN = "span"  # the row field that holds the span: no attribute is named so


def _record_template(template_id: int, fields: list[tuple[str, str]]) -> RecordTemplate:
    template = Template(template_id, [
        TemplateField(element(name), element(name).default_length) for name, _ in fields])
    attributes = [attribute for _, attribute in fields]
    variable = [index for index, f in enumerate(template.fields) if f.variable]
    first, last = variable[0], variable[-1] + 1
    columns = [(attribute, numpy_type(f)) for attribute, f in zip(attributes, template.fields)]
    return RecordTemplate(
        template, attrgetter(*attributes), template.bulk_encoder(attributes),
        tuple(columns[:first]), Template(template_id, template.fields[first:last]),
        attrgetter(*attributes[first:last]), tuple(columns[last:]))


# (kind, is IPv6) -> template. Ids are fixed so that collectors see stable templates.
RECORD_TEMPLATES: dict[tuple[str, bool], RecordTemplate] = {
    (kind, ipv6): _record_template(template_id, template_fields(kind, ipv6))
    for template_id, (kind, ipv6) in enumerate(
        [(CONNTRACK, False), (CONNTRACK, True), (CONNTRACK_UNCOUNTED, False),
         (CONNTRACK_UNCOUNTED, True), (DENY, False), (DENY, True)], start=256)
}


# The deny path's totals (ovsflow/deny/totals.py): per deny rule (Antrea mode) or per
# protocol flow (table mode), what the datapath denied, read from the flows' own counters;
# one template for IPv4 and IPv6. Counters first, as in the record templates; OVS counts a
# packet's bytes as its frame's (layer 2), not as its IP length.
_DENY_TOTALS = [
    ("flowStartMilliseconds", "start_ms"), ("flowEndMilliseconds", "end_ms"),
    ("flowEndReason", "end_reason"), ("ipVersion", "ip_version"),
    ("protocolIdentifier", "protocol"), ("portRangeStart", "port_low"),
    ("portRangeEnd", "port_high"),
    ("packetTotalCount", "packets"), ("layer2OctetTotalCount", "octets"),
    ("packetDeltaCount", "packet_delta"), ("layer2OctetDeltaCount", "octet_delta"),
    ("egressInterface", "ofport"),
    ("sourcePodName", "source_pod_name"), ("sourcePodNamespace", "source_pod_namespace"),
    ("destinationPodName", "destination_pod_name"),
    ("destinationPodNamespace", "destination_pod_namespace"),
    *_RULES,
]
DENY_TOTALS = _record_template(270, _DENY_TOTALS)

ALL_TEMPLATES = [t.template for t in RECORD_TEMPLATES.values()] + [DENY_TOTALS.template]


def template_for(record: FlowRecord) -> RecordTemplate:
    return RECORD_TEMPLATES[record.kind, len(record.source_address) == 16]


# --- The completeness ledger: options templates (RFC 7011 §3.4.2.2, §4) ---------------------
# Not flow records: each options record says, for the scope its first fields name, how much
# was exported and what was not (exporter/ledger.py fills them; docs/ipfix.md). Standard IANA
# elements only: ovsflow has no enterprise number of its own.
EXPORTING_LEDGER_ID, CONNTRACK_LEDGER_ID, DENY_LEDGER_ID = 280, 281, 282
CONNTRACK_METERING_PROCESS, DENY_METERING_PROCESS = 1, 2  # meteringProcessId values
_LEDGER_TIMES = ["systemInitTimeMilliseconds", "observationTimeMilliseconds"]


def _options_template(template_id: int, scope: list[str], fields: list[str]) -> Template:
    return Template(template_id, [TemplateField(element(name), element(name).default_length)
                                  for name in scope + fields], scope_count=len(scope))


# One collector's exporting process (RFC 7011 §4.3, with §4.1's exported counts)
EXPORTING_LEDGER = _options_template(
    EXPORTING_LEDGER_ID, ["observationDomainId", "exportingProcessId"],
    ["exportedMessageTotalCount", "exportedOctetTotalCount", "exportedFlowRecordTotalCount",
     "notSentFlowTotalCount", *_LEDGER_TIMES])
# The conntrack poller, a metering process: connections it did not track (RFC 7011 §4.2)
CONNTRACK_LEDGER = _options_template(
    CONNTRACK_LEDGER_ID, ["observationDomainId", "meteringProcessId"],
    ["ignoredDataRecordTotalCount", *_LEDGER_TIMES])
# The deny path, a metering process: denied packets it never saw (the meter dropped them)
DENY_LEDGER = _options_template(
    DENY_LEDGER_ID, ["observationDomainId", "meteringProcessId"],
    ["ignoredPacketTotalCount", *_LEDGER_TIMES])
OPTIONS_TEMPLATES = [EXPORTING_LEDGER, CONNTRACK_LEDGER, DENY_LEDGER]
