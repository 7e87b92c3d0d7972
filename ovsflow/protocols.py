"""The one protocol table and the one parser of the user's protocol list.

Both filter layers (the conntrack poller and the deny-table OpenFlow rules) take the
`ProtocolSet` made here, so a protocol means the same thing everywhere. The table is built in
(IANA "Assigned Internet Protocol Numbers") rather than read from /etc/protocols, whose
contents differ between distributions and containers.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass

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

# Named groups usable in the list. Group names never collide with protocol names: a group is
# a convenience, and the warnings still speak of each member by its own name.
PROTOCOL_GROUPS: dict[str, frozenset[int]] = {
    "transport": frozenset({6, 17, 132, 136, 33}),  # tcp, udp, sctp, udplite, dccp
    "icmp-all": frozenset({1, 58}),  # icmp, icmpv6
}
assert not PROTOCOL_GROUPS.keys() & PROTOCOL_NUMBERS.keys()

# Protocols nf_conntrack (and OVS's conntrack) track with a protocol-specific tracker; any
# other protocol is tracked by the generic tracker: no ports, only addresses.
CONNTRACK_TRACKED = frozenset({1, 6, 17, 33, 47, 58, 132, 136})


def protocol_name(number: int) -> str:
    return IANA_PROTOCOLS.get(number, str(number))


@dataclass(frozen=True)
class ProtocolSet:
    """The protocols to export; `numbers is None` means every protocol."""

    numbers: frozenset[int] | None = None

    def __contains__(self, protocol: int) -> bool:
        return self.numbers is None or protocol in self.numbers

    @property
    def exports_all(self) -> bool:
        return self.numbers is None

    def describe(self) -> str:
        if self.numbers is None:
            return "all"
        return ", ".join(f"{protocol_name(n)} ({n})" for n in sorted(self.numbers))


ALL_PROTOCOLS = ProtocolSet()


class ProtocolListError(ValueError):
    """Every entry of a non-empty protocol list was invalid: nothing would be exported.
    `details` holds one line per rejected entry."""

    def __init__(self, message: str, details: tuple[str, ...] = ()):
        super().__init__(message)
        self.details = details


@dataclass(frozen=True)
class ParsedProtocols:
    protocols: ProtocolSet
    warnings: tuple[str, ...]


def parse_protocol_list(entries: object, key: str = "protocols") -> ParsedProtocols:
    """Parse the user's list by the rules of BRIEF §2.

    Invalid entries are warned about (quoting them) and skipped; only a list in which every
    entry is invalid raises, because exporting nothing is never what the user meant.
    """
    if entries is None:
        return ParsedProtocols(ALL_PROTOCOLS, ())
    if not isinstance(entries, list):
        raise ProtocolListError(
            f"{key}: expected a list of protocol names or numbers, got {quote_value(entries)}"
        )
    if not entries:
        return ParsedProtocols(ALL_PROTOCOLS, ())

    numbers: set[int] = set()
    warnings: list[str] = []
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]"
        group = PROTOCOL_GROUPS.get(entry.strip().lower()) if isinstance(entry, str) else None
        if group is not None:
            numbers |= group
            continue
        number, problem = _parse_entry(entry)
        if problem:
            warnings.append(f"{where}: ignoring {quote_value(entry)}: {problem}")
            continue
        if number not in CONNTRACK_TRACKED and number not in numbers:
            warnings.append(
                f"{where}: {quote_value(entry)} is {protocol_name(number)} ({number}); "
                "conntrack tracks it only generically (addresses, no ports or state)"
            )
        numbers.add(number)
    if not numbers:
        raise ProtocolListError(
            f"{key}: none of the {len(entries)} entries is a valid protocol, so nothing would "
            "be exported; fix the entries, or remove the list to export every protocol",
            tuple(warnings),
        )
    return ParsedProtocols(ProtocolSet(frozenset(numbers)), tuple(warnings))


def _parse_entry(entry: object) -> tuple[int, str | None]:
    """One entry to a protocol number, or the reason it is not one."""
    if isinstance(entry, bool):  # before int: bool is an int subclass
        return -1, "a boolean (YAML reads yes/no/on/off as booleans; quote the name)"
    if isinstance(entry, int):
        if 0 <= entry <= 255:
            return entry, None
        return -1, "protocol numbers are 0-255"
    if isinstance(entry, str):
        text = entry.strip().lower()
        if text.isascii() and text.isdigit():
            digits = text.lstrip("0") or "0"
            if len(digits) > 3 or int(digits) > 255:  # int() refuses more than 4300 digits
                return -1, "protocol numbers are 0-255"
            return int(digits), None
        if text in PROTOCOL_NUMBERS:
            return PROTOCOL_NUMBERS[text], None
        return -1, ("not a known protocol name (names are IANA keywords such as tcp, udp, "
                    "icmp, or a group: " + ", ".join(PROTOCOL_GROUPS) + ")")
    if entry is None:
        return -1, "an empty entry (null)"
    return -1, f"a {_kind(entry)}, not a protocol name or number"


def _kind(value: object) -> str:
    return {float: "number with a fraction", list: "list", dict: "map"}.get(
        type(value), type(value).__name__
    )


class _YamlRepr(reprlib.Repr):
    """repr() in YAML's words (true, false, null), bounded in length and depth: YAML aliases
    can build a value of billions of elements, and repr() refuses integers of more than
    4300 digits, yet a message quoting the value must stay one readable line."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = 100
        self.maxlist = self.maxtuple = self.maxset = self.maxdict = 6
        self.maxlevel = 2

    def repr_bool(self, value: bool, level: int) -> str:
        return "true" if value else "false"

    def repr_NoneType(self, value: None, level: int) -> str:  # noqa: N802 - reprlib's naming
        return "null"

    def repr_int(self, value: int, level: int) -> str:
        if value.bit_length() > 256:
            return f"a {value.bit_length()}-bit number"
        return repr(value)


_YAML_REPR = _YamlRepr()


def quote_value(value: object) -> str:
    """The value as the user wrote it, in YAML terms, so that a message can be matched to the
    line of the file. The configuration's messages use it too."""
    text = _YAML_REPR.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
