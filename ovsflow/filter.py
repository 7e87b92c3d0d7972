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
    import numpy as np

    from .connection import Connection
    from .polled import Polled


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

    def accepts_columns(self, zones: np.ndarray, protocols: np.ndarray) -> np.ndarray:
        """`accepts` over columns of zones and protocols (the store's keys)."""
        import numpy as np  # here: `ovsflow conntrack` imports the filter, not numpy

        accepted = np.ones(len(zones), bool)
        if self.zones:
            accepted &= np.isin(zones, list(self.zones))
        if self.protocols.numbers is not None:
            accepted &= np.isin(protocols, list(self.protocols.numbers))
        return accepted

    def apply(self, connections: list[Connection]) -> list[Connection]:
        """The connections the filter accepts; the others are counted by protocol. One pass
        for both: where the kernel could not filter (older kernels, zone 0) most of a dump
        is rejected, and a second pass to count them cost as much again."""
        zones, numbers = self.zones, self.protocols.numbers
        if not zones and numbers is None:
            return connections
        any_zone, any_protocol = not zones, numbers is None
        kept: list[Connection] = []
        rejected: list[int] = []
        keep, reject = kept.append, rejected.append
        for c in connections:
            if (any_zone or c.zone in zones) and (any_protocol or c.protocol in numbers):
                keep(c)
            else:
                reject(c.protocol)
        if rejected:
            self.rejected.update(rejected)
        return kept

    def apply_polled(self, polled: Polled) -> Polled:
        """`apply` over columns (the kernel source's pieces)."""
        if not self.zones and self.protocols.numbers is None:
            return polled
        accepted = self.accepts_columns(polled.zones, polled.protocols)
        if accepted.all():
            return polled
        import numpy as np

        numbers, counts = np.unique(polled.protocols[~accepted], return_counts=True)
        self.rejected.update(dict(zip(numbers.tolist(), counts.tolist())))
        return polled.select(accepted)
