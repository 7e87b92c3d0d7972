"""The one filter: conntrack zones and IP protocols, shared by both layers.

The conntrack sources ask the kernel to filter where it can, but older kernels ignore
filters silently and zone 0 cannot be selected, so every polled connection passes through
here too. Membership tests on frozensets: the cost does not grow with the number of
configured protocols or zones.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from .protocols import ProtocolSet

if TYPE_CHECKING:
    from .connection import Connection


class ConnectionFilter:
    def __init__(self, zones: frozenset[int], protocols: ProtocolSet):
        self.zones = zones  # empty: every zone
        self.protocols = protocols
        self.rejected: Counter[int] = Counter()  # protocol -> connections the kernel
        # handed over that the filter dropped (older kernels ignore dump filters; zone 0)

    def accepts_protocol(self, protocol: int) -> bool:
        return protocol in self.protocols

    def accepts(self, zone: int, protocol: int) -> bool:
        return (not self.zones or zone in self.zones) and protocol in self.protocols

    def apply(self, connections: list[Connection]) -> list[Connection]:
        zones, numbers = self.zones, self.protocols.numbers
        if zones and numbers is not None:
            kept = [c for c in connections if c.zone in zones and c.protocol in numbers]
        elif zones:
            kept = [c for c in connections if c.zone in zones]
        elif numbers is not None:
            kept = [c for c in connections if c.protocol in numbers]
        else:
            return connections
        if len(kept) != len(connections):
            kept_ids = set(map(id, kept))
            self.rejected.update(c.protocol for c in connections if id(c) not in kept_ids)
        return kept
