"""The flow record: what both stores hand to the exporter.

One class for conntrack and deny records; `kind` selects the IPFIX template (see
`ovsflow.ipfix.templates`), and the address length (4 or 16 bytes) the IPv4 or IPv6 one.
Addresses are kept packed so that encoding is a single struct call.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def ipv6(self) -> bool:
        return len(self.source_address) == 16

    @property
    def icmp_type_code(self) -> int:
        """icmpTypeCodeIPv4/IPv6: type * 256 + code (Debian 12's nfdump reads only these)."""
        return self.icmp_type << 8 | self.icmp_code
