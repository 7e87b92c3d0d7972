"""The one protocol table, and `ProtocolSet`: what the user's list (protocol_list.py) means.

Both filter layers (the conntrack poller and the deny-table OpenFlow rules) take the
`ProtocolSet` made from the list, so a protocol means the same thing everywhere. The table
is built in (IANA "Assigned Internet Protocol Numbers") rather than read from
/etc/protocols, whose contents differ between distributions and containers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

# IANA keywords, lower-cased. Numbers without a keyword (61, 63, 68, 99, 114) and the
# unassigned 146-252 can still be configured by number.
IANA_PROTOCOLS: dict[int, str] = {
    0: "hopopt", 1: "icmp", 2: "igmp", 3: "ggp", 4: "ipv4", 5: "st", 6: "tcp", 7: "cbt",
    8: "egp", 9: "igp", 10: "bbn-rcc-mon", 11: "nvp-ii", 12: "pup", 13: "argus",
    14: "emcon", 15: "xnet", 16: "chaos", 17: "udp", 18: "mux", 19: "dcn-meas", 20: "hmp",
    21: "prm", 22: "xns-idp", 23: "trunk-1", 24: "trunk-2", 25: "leaf-1", 26: "leaf-2",
    27: "rdp", 28: "irtp", 29: "iso-tp4", 30: "netblt", 31: "mfe-nsp", 32: "merit-inp",
    33: "dccp", 34: "3pc", 35: "idpr", 36: "xtp", 37: "ddp", 38: "idpr-cmtp", 39: "tp++",
    40: "il", 41: "ipv6", 42: "sdrp", 43: "ipv6-route", 44: "ipv6-frag", 45: "idrp",
    46: "rsvp", 47: "gre", 48: "dsr", 49: "bna", 50: "esp", 51: "ah", 52: "i-nlsp",
    53: "swipe", 54: "narp", 55: "min-ipv4", 56: "tlsp", 57: "skip", 58: "ipv6-icmp",
    59: "ipv6-nonxt", 60: "ipv6-opts", 62: "cftp", 64: "sat-expak", 65: "kryptolan",
    66: "rvd", 67: "ippc", 69: "sat-mon", 70: "visa", 71: "ipcv", 72: "cpnx", 73: "cphb",
    74: "wsn", 75: "pvp", 76: "br-sat-mon", 77: "sun-nd", 78: "wb-mon", 79: "wb-expak",
    80: "iso-ip", 81: "vmtp", 82: "secure-vmtp", 83: "vines", 84: "ttp", 85: "nsfnet-igp",
    86: "dgp", 87: "tcf", 88: "eigrp", 89: "ospfigp", 90: "sprite-rpc", 91: "larp",
    92: "mtp", 93: "ax.25", 94: "ipip", 95: "micp", 96: "scc-sp", 97: "etherip",
    98: "encap", 100: "gmtp", 101: "ifmp", 102: "pnni", 103: "pim", 104: "aris",
    105: "scps", 106: "qnx", 107: "a/n", 108: "ipcomp", 109: "snp", 110: "compaq-peer",
    111: "ipx-in-ip", 112: "vrrp", 113: "pgm", 115: "l2tp", 116: "ddx", 117: "iatp",
    118: "stp", 119: "srp", 120: "uti", 121: "smp", 122: "sm", 123: "ptp",
    124: "isis-over-ipv4", 125: "fire", 126: "crtp", 127: "crudp", 128: "sscopmce",
    129: "iplt", 130: "sps", 131: "pipe", 132: "sctp", 133: "fc", 134: "rsvp-e2e-ignore",
    135: "mobility-header", 136: "udplite", 137: "mpls-in-ip", 138: "manet", 139: "hip",
    140: "shim6", 141: "wesp", 142: "rohc", 143: "ethernet", 144: "aggfrag", 145: "nsh",
}

# Other spellings people write: Linux /etc/protocols names and common shorthands.
ALIASES: dict[str, int] = {
    "icmpv6": 58, "icmp6": 58, "ipencap": 4, "iptm": 84, "ospf": 89, "isis": 124,
    "mobility": 135, "udp-lite": 136,
}

PROTOCOL_NUMBERS: dict[str, int] = {name: num for num, name in IANA_PROTOCOLS.items()} | ALIASES

# Protocols whose connections conntrack tracks with ports (and whose packets carry them):
# only these take PROTO/PORT entries. ICMP has a type, code and id instead, GRE a key.
PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})  # tcp, udp, dccp, sctp, udplite
PortRanges = tuple[tuple[int, int], ...]  # (low, high) inclusive, sorted, apart

# Predefined groups: list entries under one name. The service ports are IANA's (Service Name
# and Transport Protocol Port Number Registry), the ones a service is reached on by default.
PROTOCOL_GROUPS: dict[str, tuple[str, ...]] = {
    "transport": ("tcp", "udp", "sctp", "udplite", "dccp"),
    "icmp-all": ("icmp", "icmpv6"),
    "web": ("tcp/80", "tcp/443", "udp/443"),  # http, https, and https over QUIC (HTTP/3)
    "dns": ("udp/53", "tcp/53"),  # domain
    "ssh": ("tcp/22",),
    "ntp": ("udp/123",),
    # smtp, submissions (implicit TLS), submission, pop3, pop3s, imap, imaps
    "mail": ("tcp/25", "tcp/465", "tcp/587", "tcp/110", "tcp/995", "tcp/143", "tcp/993"),
}
# Group names never collide with protocol names: a group is a convenience, and the warnings
# still speak of each member by its own name.
assert not PROTOCOL_GROUPS.keys() & PROTOCOL_NUMBERS.keys()

# Protocols nf_conntrack (and OVS's conntrack) track with a protocol-specific tracker; any
# other protocol is tracked by the generic tracker: no ports, only addresses.
CONNTRACK_TRACKED = frozenset({1, 6, 17, 33, 47, 58, 132, 136})


def protocol_name(number: int) -> str:
    return IANA_PROTOCOLS.get(number, str(number))


def format_ports(ranges: PortRanges) -> str:
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


@dataclass(frozen=True)
class ProtocolSet:
    """The protocols to export; `numbers is None` means every protocol. A protocol in
    `ports` is exported only to those service ports (the original direction's destination
    port); the other protocols of `numbers`, on every port."""

    numbers: frozenset[int] | None = None
    ports: tuple[tuple[int, PortRanges], ...] = ()  # sorted by protocol

    def __contains__(self, protocol: int) -> bool:
        """Whether any of the protocol is exported (on some port at least)."""
        return self.numbers is None or protocol in self.numbers

    def accepts(self, protocol: int, port: int) -> bool:
        """Whether a connection of `protocol` to destination `port` is exported."""
        if self.numbers is not None and protocol not in self.numbers:
            return False
        mask = self.port_masks.get(protocol)
        return mask is None or mask[port] == 1

    @property
    def exports_all(self) -> bool:
        return self.numbers is None

    def port_ranges(self, protocol: int) -> PortRanges | None:
        """The protocol's exported ports; None: every port (or the protocol is not in)."""
        return dict(self.ports).get(protocol)

    @cached_property
    def port_masks(self) -> dict[int, bytes]:
        """Per protocol in `ports`, 65536 bytes, 1 at each exported port: one lookup per
        connection, whatever the number of ports and ranges."""
        masks = {}
        for protocol, ranges in self.ports:
            mask = bytearray(65536)
            for low, high in ranges:
                mask[low:high + 1] = b"\1" * (high - low + 1)
            masks[protocol] = bytes(mask)
        return masks

    def describe(self) -> str:
        if self.numbers is None:
            return "all"
        ports = dict(self.ports)
        return ", ".join(f"{protocol_name(n)} ({n})" + (
            f" ports {format_ports(ports[n])}" if n in ports else "")
            for n in sorted(self.numbers))


ALL_PROTOCOLS = ProtocolSet()
