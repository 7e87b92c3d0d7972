"""The deny path: packets the policy pipeline denied, received as packet-ins, decoded without
I/O (`packet`) and aggregated per connection and rule (`store`). Two sources:
`ovs.denySource: table` — ovsflow's own flows in its deny table, matching only the
configured protocols (`rules`, `source`); `antrea` — Antrea's own NetworkPolicy packet-ins,
with nothing installed (`antrea`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .antrea import AntreaDenySource
from .source import DenySource

if TYPE_CHECKING:
    from ..config import OvsConfig
    from ..filter import ConnectionFilter
    from .store import DenyStore


def open_deny_source(ovs: OvsConfig, connection_filter: ConnectionFilter,
                     store: DenyStore) -> DenySource | AntreaDenySource | None:
    """The deny source `ovs.denySource` names; None without a bridge."""
    if not ovs.bridge:
        return None
    if ovs.deny_source == "antrea":
        return AntreaDenySource(ovs.run_dir, ovs.bridge, connection_filter, store)
    return DenySource(ovs.run_dir, ovs.bridge, ovs.deny_table, ovs.deny_meter_id,
                      ovs.deny_packet_in_rate, connection_filter, store)
