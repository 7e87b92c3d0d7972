"""Flow records: what the stores hand to the exporter.

`FlowRecord` is one record as an object (deny records; conntrack records in tests): `kind`
selects the IPFIX template (see `ovsflow.ipfix.templates`), and the address length (4 or
16 bytes) the IPv4 or IPv6 one. `EncodedRecords` is a batch of records already written as
their templates' data records: what the connection store makes, and what the exporter
queues.

Each record carries its connection's identity (the store's key; the deny store's key for
deny records): a collector's queue keeps at most one undelivered record per identity,
folding an older one's deltas into the newer (`exporter/pending.py`).
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .ipfix.codec import Template

BATCH = 5000  # records encoded at once, and sent at once (then the event loop runs)

# flowEndReason values (IANA IPFIX registry)
IDLE_TIMEOUT, ACTIVE_TIMEOUT, END_OF_FLOW, FORCED_END, LACK_OF_RESOURCES = 1, 2, 3, 4, 5

# Record kinds, one template pair (IPv4, IPv6) each.
CONNTRACK = "conntrack"  # kernel conntrack: counters and start times
CONNTRACK_UNCOUNTED = "conntrack-uncounted"  # OVS userspace conntrack keeps no counters
DENY = "deny"  # packet-ins of denied packets

# Antrea's NetworkPolicy rule actions
RULE_ALLOW, RULE_DROP, RULE_REJECT = 1, 2, 3


@dataclass(slots=True)
class FlowRecord:
    kind: str
    source_address: bytes  # packed, 4 or 16 bytes
    destination_address: bytes
    protocol: int
    source_port: int = 0
    destination_port: int = 0
    icmp_type: int = 0
    icmp_code: int = 0
    start_ms: int = 0  # milliseconds since the Unix epoch
    end_ms: int = 0
    start_seconds: int = 0  # the same in seconds: kept, not derived, for encoding speed
    end_seconds: int = 0
    end_reason: int = 0
    packets: int = 0  # totals since the flow started, original direction
    octets: int = 0
    packet_delta: int = 0  # since the previous record of this flow
    octet_delta: int = 0
    reverse_packets: int = 0
    reverse_octets: int = 0
    reverse_packet_delta: int = 0
    reverse_octet_delta: int = 0
    flow_id: int = 0  # conntrack id
    flow_type: int = 0  # Antrea flowType; 0 = not determined
    tcp_state: str = ""
    ingress_rule_action: int = 0
    egress_rule_action: int = 0
    ingress_rule_name: str = ""
    egress_rule_name: str = ""
    # Antrea's Pod and node elements: filled for Pods of this node (see ovsflow.enrich)
    source_pod_name: str = ""
    source_pod_namespace: str = ""
    source_node_name: str = ""
    destination_pod_name: str = ""
    destination_pod_namespace: str = ""
    destination_node_name: str = ""
    labels: bytes = b""  # conntrack labels (ovsflow.connection.labels_value); not exported
    # deny records: the share of denied packets the packet-in meter let through while the
    # record's packets came (1.0: all of them); see ovsflow.deny.sampling
    sampling_probability: float = 1.0
    # The connection's identity for the export queues (b"": none, never folded into another)
    identity: bytes = b""

    @property
    def ipv6(self) -> bool:
        return len(self.source_address) == 16

    @property
    def icmp_type_code(self) -> int:
        """icmpTypeCodeIPv4/IPv6: type * 256 + code (Debian 12's nfdump reads only these)."""
        return self.icmp_type << 8 | self.icmp_code


@dataclass(slots=True)
class EncodedRecords:
    """Up to `BATCH` records as their templates' data records: per template, the records'
    bytes joined and where each starts (one more offset than records). `rejected` lists the
    (element, value) of each record left out because a value did not fit its field;
    `protocols` counts the records made, rejected or not, per IP protocol. `identities`:
    each record's connection identity, in the records' order (group after group), or empty
    when the maker gives none (b"" for one record: none)."""
    groups: list[tuple[Template, bytes, array]] = field(default_factory=list)
    rejected: list[tuple[str, object]] = field(default_factory=list)
    protocols: Counter = field(default_factory=Counter)
    identities: list[bytes] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(starts) - 1 for _, _, starts in self.groups)

    def drop_oldest(self, count: int) -> None:
        """Leave out the first `count` records (fewer than there are)."""
        if self.identities:
            self.identities = self.identities[count:]
        groups = []
        for template, data, starts in self.groups:
            if not count:
                groups.append((template, data, starts))
                continue
            kept = len(starts) - 1 - count
            count = max(0, -kept)
            if kept > 0:
                first = starts[-kept - 1]
                groups.append((template, data[first:],
                               array("I", (start - first for start in starts[-kept - 1:]))))
        self.groups = groups

    def data_records(self) -> list[tuple[Template, list[bytes]]]:
        """(template, its data records) for `MessageEncoder.data_messages`."""
        return [(template, [data[start:end] for start, end in pairwise(starts)])
                for template, data, starts in self.groups]
