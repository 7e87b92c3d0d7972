"""Conntrack sources: the kernel's nf_conntrack (netlink) and the OVS userspace datapath's
(ovs-vswitchd's dpctl/dump-conntrack). Each module pairs a sans-IO codec (`ctnetlink`,
`dpctl`) with a thin I/O adapter (`kernel`, `ovs`); both adapters have `async poll()`
returning the filtered `Connection`s."""

from __future__ import annotations

import logging

from ..config import Config
from ..filter import ConnectionFilter

log = logging.getLogger(__name__)


def open_source(config: Config, connection_filter: ConnectionFilter, *,
                accounting: bool = True):
    """The configured source; `auto` asks OVSDB whether the bridge's datapath is netdev.
    With `accounting`, the kernel's counters and timestamps are switched on (sysctls): the
    agent wants them, a diagnostic (`ovsflow conntrack`) must change nothing in the kernel.
    The kernel's dump filters are probed once per boot, kernel and network namespace, the
    answer kept in the state directory (`kernel.kept_filters`; the diagnostic keeps and
    uses it too).
    Beside Antrea (`ovs.denySource: antrea`) the filter also leaves out, at both sources,
    the entries Antrea committed before its policy stages denied them (filter.py).
    Blocking (OVSDB, sysctls, a netlink probe): the agent calls it in a worker thread."""
    connection_filter.antrea_allowed_only = config.ovs.deny_source == "antrea"
    kind = config.conntrack.source
    if kind == "auto" and not config.ovs.bridge:
        kind = "kernel"
    if kind == "auto":
        from .ovs import UnixctlError, bridge_datapath_type  # OVSDB's client: imported only here

        try:
            datapath = bridge_datapath_type(config.ovs.run_dir, config.ovs.bridge)
        except UnixctlError as err:
            log.warning("conntrack.source auto: %s; using the kernel's conntrack", err)
            datapath = "system"
        kind = "ovs" if datapath == "netdev" else "kernel"
        log.info("conntrack.source auto: bridge %s has datapath_type %r: using %s conntrack",
                 config.ovs.bridge, datapath or "system", kind)
    if kind == "ovs":
        from .ovs import OvsSource

        return OvsSource(connection_filter, config.ovs.run_dir)
    from .kernel import KernelSource, enable_accounting, kept_filters

    if accounting:
        enable_accounting()
    return KernelSource(connection_filter, kept_filters(config.state.directory))
