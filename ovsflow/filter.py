"""The one filter: conntrack zones, IP protocols and service ports, shared by both layers.

The conntrack sources ask the kernel to filter where it can, but older kernels ignore
filters silently, zone 0 cannot be selected and a kernel filters a dump by one port at a
time, so every polled connection passes through here too; so does every denied packet.
The port is the service port: the original direction's destination port (conntrack's
`dport`), a denied packet's destination port. Lookups in sets and per-protocol port masks:
the cost does not grow with the number of configured protocols, ports or zones.

Beside Antrea (`ovs.denySource: antrea`) the conntrack layer also leaves out the entries
that Antrea's pipeline committed before its policy stages denied the connection: Service
traffic that EndpointDNAT's `ct(commit,nat)` committed before a default drop, a connection
committed at the egress stage before an ingress drop. Antrea's ConntrackCommit table writes
the packet's source into ct_mark[0..3] (ConnSourceCTMarkField) only once the connection
passed every policy stage, and Antrea's own FlowExporter skips, outside zone 0, the entries
whose source bits are 0 (antrea-io/antrea pkg/agent/flowexporter/connections/conntrack.go,
`connAllowedCTMarkMask`; pkg/agent/openflow/fields.go; docs/design/ovs-pipeline.md, "OVS Ct
Mark"). Their packets are the deny layer's, as Antrea's deny packet-ins.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import TYPE_CHECKING

from .protocols import ProtocolSet

if TYPE_CHECKING:
    import numpy as np

    from .connection import Connection
    from .polled import Polled


# ConnSourceCTMarkField, ct_mark[0..3]: 0 in an entry Antrea committed before its policy
# stages allowed the connection
ANTREA_SOURCE_MARK = 0xF


class ConnectionFilter:
    def __init__(self, zones: frozenset[int], protocols: ProtocolSet,
                 antrea_allowed_only: bool = False):
        self.zones = zones  # empty: every zone
        self.protocols = protocols
        # beside Antrea: entries outside zone 0 without ANTREA_SOURCE_MARK bits are left out
        self.antrea_allowed_only = antrea_allowed_only
        self.rejected: Counter[int] = Counter()  # protocol -> connections the kernel
        # handed over that the filter dropped (older kernels ignore dump filters; zone 0;
        # Antrea's entries of denied connections)

    @property
    def checks_connections(self) -> bool:
        """Whether a connection can be left out here at all (else `apply` keeps all)."""
        return bool(self.zones) or self.protocols.numbers is not None \
            or self.antrea_allowed_only

    def accepts_protocol(self, protocol: int) -> bool:
        """Whether any of the protocol is exported (on some port at least)."""
        return protocol in self.protocols

    def accepts(self, zone: int, protocol: int, port: int, mark: int = 0) -> bool:
        return ((not self.zones or zone in self.zones) and self.protocols.accepts(protocol, port)
                and self._allowed(zone, mark))

    def _allowed(self, zone: int, mark: int) -> bool:
        return not self.antrea_allowed_only or zone == 0 or bool(mark & ANTREA_SOURCE_MARK)

    def accepts_packet(self, protocol: int, port: int) -> bool:
        """A denied packet's protocol and destination port (it has no zone)."""
        return self.protocols.accepts(protocol, port)

    def accepts_columns(self, zones: np.ndarray, protocols: np.ndarray,
                        ports: np.ndarray, marks: np.ndarray | None = None) -> np.ndarray:
        """`accepts` over columns of zones, protocols, destination ports and marks (the
        store's keys: no mark, no mark rule): one gather from a table of the exported ports
        per protocol."""
        import numpy as np  # here: `ovsflow conntrack` imports the filter, not numpy

        accepted = np.ones(len(zones), bool)
        if self.zones:
            accepted &= _zone_table(self.zones)[zones]
        if self.protocols.numbers is not None:
            rows, table = _port_table(self.protocols)
            accepted &= table[rows[protocols], ports]
        if self.antrea_allowed_only and marks is not None:
            accepted &= (zones == 0) | (marks & ANTREA_SOURCE_MARK != 0)
        return accepted

    def apply(self, connections: list[Connection]) -> list[Connection]:
        """The connections the filter accepts; the others are counted by protocol. One pass
        for both: where the kernel could not filter (older kernels, zone 0) most of a dump
        is rejected, and a second pass to count them cost as much again."""
        zones, numbers = self.zones, self.protocols.numbers
        if not self.checks_connections:
            return connections
        any_zone, any_protocol = not zones, numbers is None
        masks = self.protocols.port_masks
        any_mark = not self.antrea_allowed_only
        kept: list[Connection] = []
        rejected: list[int] = []
        keep, reject = kept.append, rejected.append
        for c in connections:
            if (any_zone or c.zone in zones) and (any_protocol or c.protocol in numbers) and (
                    not masks or c.protocol not in masks
                    or masks[c.protocol][c.destination_port]) and (
                    any_mark or not c.zone or c.mark & ANTREA_SOURCE_MARK):
                keep(c)
            else:
                reject(c.protocol)
        if rejected:
            self.rejected.update(rejected)
        return kept

    def apply_polled(self, polled: Polled) -> Polled:
        """`apply` over columns (the kernel source's pieces)."""
        if not self.checks_connections:
            return polled
        accepted = self.accepts_columns(polled.zones, polled.protocols,
                                        polled.destination_ports, polled.marks)
        if accepted.all():
            return polled
        import numpy as np

        numbers, counts = np.unique(polled.protocols[~accepted], return_counts=True)
        self.rejected.update(dict(zip(numbers.tolist(), counts.tolist())))
        return polled.select(accepted)


@functools.lru_cache(maxsize=4)  # the running zones, and those a reload brings
def _zone_table(zones: frozenset[int]) -> np.ndarray:
    """True at each zone of `zones`, of 65536: one gather per column of zones (np.isin
    sorts them)."""
    import numpy as np

    table = np.zeros(65536, bool)
    table[sorted(zones)] = True
    return table


@functools.lru_cache(maxsize=4)  # the running list, and the one a reload brings
def _port_table(protocols: ProtocolSet) -> tuple[np.ndarray, np.ndarray]:
    """A row per protocol number (u1, 256 of them) into a table of 65536 booleans per row,
    True at the exported destination ports: row 0 every port, row 1 none (a protocol not
    exported), then one per protocol exported on some ports only. 64 KiB a row."""
    import numpy as np

    rows = np.ones(256, np.uint8)
    rows[sorted(protocols.numbers or ())] = 0
    table = np.zeros((2 + len(protocols.ports), 65536), bool)
    table[0] = True
    for row, (protocol, mask) in enumerate(protocols.port_masks.items(), 2):
        rows[protocol] = row
        table[row] = np.frombuffer(mask, bool)
    return rows, table
