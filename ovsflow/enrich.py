"""What Antrea's records say beyond addresses: which Pods talk, on which node, the kind of
flow (Antrea's flowType) and the NetworkPolicy rules that allowed the connection. Sans-IO: the
Pods come from `ovsflow.pods`, the labels from the conntrack sources.

Rule ids: Antrea's pipeline commits an allowed connection with the ingress rule's id in
ct_label bits 0-31 and the egress rule's id in bits 32-63 (antrea-io/antrea,
pkg/agent/openflow/fields.go: IngressRuleCTLabel, EgressRuleCTLabel). Labels are carried as
in the kernel's layout (`ovsflow.connection.labels_value` reads them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .connection import labels_value
from .pods import PodMap, PodRef
from .record import RULE_ALLOW, FlowRecord

if TYPE_CHECKING:
    from .config import IpfixConfig

# Antrea's flowType values (pkg/apis/flow/v1alpha1/flow.proto, FlowType)
FLOW_TYPE_UNKNOWN, INTRA_NODE, INTER_NODE, TO_EXTERNAL, FROM_EXTERNAL = 0, 1, 2, 3, 4


def rule_ids(labels: bytes) -> tuple[int, int]:
    """(ingress rule id, egress rule id) from a connection's labels; 0 = none."""
    value = labels_value(labels)
    return value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF


class PodNetworks:
    """The cluster's Pod CIDRs (every node's, IPv4 and IPv6): what tells an inter-node peer
    from an external one. Empty: that cannot be told."""

    def __init__(self, cidrs: Iterable[str] = ()):
        self.networks = []
        for text in cidrs:
            try:
                self.networks.append(ipaddress.ip_network(text, strict=True))
            except ValueError as err:
                raise ValueError(f"{text!r} is not a CIDR (e.g. 10.10.0.0/16, fd00:10::/48): "
                                 f"{err}") from None
        # address length -> [(network, mask)] as ints: a check creates no ipaddress object
        self._ranges: dict[int, list[tuple[int, int]]] = {4: [], 16: []}
        for n in self.networks:
            self._ranges[len(n.network_address.packed)].append(
                (int(n.network_address), int(n.netmask)))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: bytes) -> bool:
        value = int.from_bytes(address, "big")
        for network, mask in self._ranges[len(address)]:
            if value & mask == network:
                return True
        return False


def configured_pod_networks(ipfix: IpfixConfig) -> PodNetworks:
    """The Pod networks `ipfix.clusterPodCIDRs` names."""
    return PodNetworks(str(network) for network in ipfix.cluster_pod_cidrs)


def flow_type(source_pod: PodRef | None, destination_pod: PodRef | None,
              source_address: bytes, destination_address: bytes,
              pod_networks: PodNetworks) -> int:
    """Antrea's flowType as seen from this node (source_pod/destination_pod: the Pods of this
    node the addresses belong to, if any)."""
    if source_pod is not None and destination_pod is not None:
        return INTRA_NODE
    if not pod_networks:
        return FLOW_TYPE_UNKNOWN
    if source_pod is not None:
        return INTER_NODE if destination_address in pod_networks else TO_EXTERNAL
    if destination_pod is not None:
        return INTER_NODE if source_address in pod_networks else FROM_EXTERNAL
    return FLOW_TYPE_UNKNOWN


def name(record: FlowRecord, source_pod: PodRef | None, destination_pod: PodRef | None,
         node_name: str) -> None:
    """Fill a record's Pod, node and (from `record.labels`) allowing-rule fields: its run of
    strings. The Pods are the ones remembered for the connection, so that it keeps its names
    after a Pod is gone. Rules already set (deny records) are left alone when there are no
    labels."""
    if source_pod is not None:
        record.source_pod_namespace, record.source_pod_name = \
            source_pod.namespace, source_pod.name
        record.source_node_name = node_name
    if destination_pod is not None:
        record.destination_pod_namespace, record.destination_pod_name = \
            destination_pod.namespace, destination_pod.name
        record.destination_node_name = node_name
    ingress, egress = rule_ids(record.labels)
    if ingress:
        record.ingress_rule_name, record.ingress_rule_action = str(ingress), RULE_ALLOW
    if egress:
        record.egress_rule_name, record.egress_rule_action = str(egress), RULE_ALLOW


def enrich(record: FlowRecord, source_pod: PodRef | None, destination_pod: PodRef | None,
           node_name: str, pod_networks: PodNetworks) -> None:
    """`name` the record, and set its flowType."""
    name(record, source_pod, destination_pod, node_name)
    record.flow_type = flow_type(source_pod, destination_pod, record.source_address,
                                 record.destination_address, pod_networks)


NO_PODS: tuple[PodRef | None, PodRef | None] = (None, None)


class Enricher:
    """What the stores need to fill records as Antrea's agent does: the live Pod map (None
    without a bridge), this node's name and the cluster's Pod CIDRs."""

    def __init__(self, pods: PodMap | None, node_name: str, pod_networks: PodNetworks):
        self.node_name, self._pod_networks = node_name, pod_networks
        self._map = pods
        self._lookup = pods.lookup if pods is not None else None
        self.settings = 0  # counts reloads of the Pod CIDRs: every flowType may change

    @property
    def pod_networks(self) -> PodNetworks:
        return self._pod_networks

    @pod_networks.setter
    def pod_networks(self, networks: PodNetworks) -> None:  # a reload
        self._pod_networks = networks
        self.settings += 1

    @property
    def knows_pods(self) -> bool:
        """Whether a lookup can find a Pod now."""
        return self._map is not None and len(self._map) > 0

    @property
    def has_pod_map(self) -> bool:
        """Whether Pods can be found at all (a bridge's Pod map): without one no connection
        ever holds any."""
        return self._map is not None

    @property
    def generation(self) -> int:
        """Changes whenever a Pod lookup may answer otherwise: the store keeps what it found
        per connection until then. 32 bits, as the store keeps it."""
        return self._map.changes & 0xFFFFFFFF if self._map is not None else 0

    def pods(self, source: bytes, destination: bytes,
             known: tuple[PodRef | None, PodRef | None] = NO_PODS
             ) -> tuple[PodRef | None, PodRef | None]:
        """The Pods of this node at the two ends of a connection that was at `known` when
        last asked. A Pod once known for an end stays: a connection keeps its names after
        its Pod is gone, and a new Pod that reuses the address is not credited with it. An
        end with no Pod yet is looked up now: a connection seen before the map learnt of
        its Pod gets the names at its next record."""
        lookup = self._lookup
        if lookup is None:
            return known
        return (known[0] or lookup(source), known[1] or lookup(destination))

    def __call__(self, record: FlowRecord, pods: tuple[PodRef | None, PodRef | None]) -> None:
        enrich(record, pods[0], pods[1], self.node_name, self.pod_networks)

    def name(self, record: FlowRecord, pods: tuple[PodRef | None, PodRef | None]) -> None:
        name(record, pods[0], pods[1], self.node_name)
