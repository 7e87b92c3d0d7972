"""The flows ovsflow owns in the deny table: the datapath half of the protocol filter.

For each configured protocol, one IPv4 and one IPv6 flow `ip_proto=P -> meter, controller`
(one per family without ip_proto when every protocol is exported; no meter where the switch
refuses one), and a lowest-priority drop: packets of other protocols die in the datapath and
never cost a packet-in. A TCP, UDP or SCTP protocol exported on some ports only gets a flow
per port instead, matching the destination port too (a range as a few masked matches), so
packets to other ports die in the datapath as well.
"""

from __future__ import annotations

from dataclasses import dataclass

from openflow import messages as m
from openflow.oxm import Field, field

from ..protocols import ProtocolSet
from .totals import TotalsKey

COOKIE = 0x6F7673666C6F7700  # "ovsflow\0": every flow ovsflow installs, and nothing else
ALL_COOKIE_BITS = (1 << 64) - 1
CONTROLLER_ID = 0x6F66  # packet-ins of our controller() actions come to us alone
PACKET_IN_BYTES = 128  # enough for Ethernet, IP (with options) and the L4 ports
EXPORT_PRIORITY, DROP_PRIORITY = 200, 0
ICMP_ONLY = {1: 0x0800, 58: 0x86DD}  # a family-specific protocol: one flow, not two
# The destination port fields OpenFlow has; it has none for DCCP and UDP-Lite, whose flows
# match every port (the userspace filter checks their packets' ports).
PORT_FIELDS = {6: "tcp_dst", 17: "udp_dst", 132: "sctp_dst"}


@dataclass(frozen=True)
class DenyFlow:
    priority: int
    match: tuple[Field, ...]
    export: bool  # to the controller (through the meter), or drop

    def instructions(self, meter_id: int | None) -> m.Instructions:
        """What the flow does: the meter (None: the switch refused ours, packet-ins not
        rate-limited) then our controller, or nothing (drop). `openflow` encodes it for
        the session's version (the meter is an instruction in 1.3, an action in 1.5)."""
        if not self.export:
            return m.Instructions()
        return m.Instructions(meter_id, (m.ControllerAction(CONTROLLER_ID, PACKET_IN_BYTES,
                                                            m.OFPR_ACTION),))

    def add(self, xid: int, table: int, meter_id: int | None, *, version: int) -> bytes:
        return m.flow_mod(xid, version=version, command=m.OFPFC_ADD, table_id=table,
                          priority=self.priority, cookie=COOKIE, match=list(self.match),
                          instructions=self.instructions(meter_id))

    def totals_key(self) -> TotalsKey | None:
        """What the flow counts, for the deny totals (template 270): its IP version,
        protocol and block of destination ports; None for the drop flow (packets of
        protocols not exported are not exported, counted or not)."""
        if not self.export:
            return None
        fields = {f.name: f for f in self.match}
        version = {0x0800: 4, 0x86DD: 6}[fields["eth_type"].int()]
        protocol = fields["ip_proto"].int() if "ip_proto" in fields else 0
        port = next((f for f in self.match if f.name in PORT_FIELDS.values()), None)
        ports = (0, 0xFFFF)
        if port is not None:
            low = port.int()
            mask = int.from_bytes(port.mask, "big") if port.mask else 0xFFFF
            ports = (low, low | (~mask & 0xFFFF))
        return TotalsKey(version, protocol, ports)

    def delete(self, xid: int, table: int, *, version: int) -> bytes:
        return m.flow_mod(xid, version=version, command=m.OFPFC_DELETE_STRICT, table_id=table,
                          priority=self.priority, cookie=COOKIE, cookie_mask=ALL_COOKIE_BITS,
                          match=list(self.match))


def deny_flows(protocols: ProtocolSet) -> frozenset[DenyFlow]:
    flows = {DenyFlow(DROP_PRIORITY, (), export=False)}
    for ethertype in (0x0800, 0x86DD):
        if protocols.numbers is None:
            flows.add(DenyFlow(EXPORT_PRIORITY, (field("eth_type", ethertype),), export=True))
            continue
        for protocol in protocols.numbers:
            if ICMP_ONLY.get(protocol, ethertype) != ethertype:
                continue
            match = (field("eth_type", ethertype), field("ip_proto", protocol))
            ranges = protocols.port_ranges(protocol)
            if ranges is None or protocol not in PORT_FIELDS:
                flows.add(DenyFlow(EXPORT_PRIORITY, match, export=True))
                continue
            for low, high in ranges:
                flows.update(DenyFlow(EXPORT_PRIORITY, match + (
                    field(PORT_FIELDS[protocol], port, None if mask == 0xFFFF else mask,
                          width=2),), export=True) for port, mask in port_prefixes(low, high))
    return frozenset(flows)


def port_prefixes(low: int, high: int) -> list[tuple[int, int]]:
    """The range low-high as (port, mask) pairs that match it together, each a block of
    ports aligned on its size: 30000-32767 is 5 of them, any range at most 30."""
    prefixes = []
    while low <= high:
        size = low & -low or 0x10000  # the largest block that starts at `low`...
        while size > high - low + 1:  # ...and ends within the range
            size //= 2
        prefixes.append((low, 0xFFFF & ~(size - 1)))
        low += size
    return prefixes


def delete_all(xid: int, table: int, *, version: int) -> bytes:
    """Every flow with our cookie in our table; flows of others are untouched."""
    return m.flow_mod(xid, version=version, command=m.OFPFC_DELETE, table_id=table,
                      cookie=COOKIE, cookie_mask=ALL_COOKIE_BITS)


def installed_flow(entry: m.FlowEntry, meter_id: int | None) -> DenyFlow | None:
    """The deny flow `entry` (read back from the switch by our cookie) is, exactly as
    `DenyFlow.add` wrote it; None when it is anything else: changed by someone, or added
    under our cookie by someone."""
    match = tuple(sorted(entry.match, key=lambda f: (f.oxm_class, f.field)))
    for export in (False, True):
        flow = DenyFlow(entry.priority, match, export)
        if entry.instructions == flow.instructions(meter_id):
            return flow
    return None


METER_FLAGS = m.OFPMF_PKTPS | m.OFPMF_BURST | m.OFPMF_STATS


def meter_bands(rate: int) -> tuple[tuple[int, int, int], ...]:
    """One drop band at `rate` packets/s, burst a tenth of a second's worth."""
    return ((m.OFPMBT_DROP, rate, max(rate // 10, 1)),)


def meter_mod(xid: int, command: int, meter_id: int, rate: int, *, version: int) -> bytes:
    return m.meter_mod(xid, version=version, command=command, meter_id=meter_id,
                       flags=METER_FLAGS, bands=list(meter_bands(rate)))
