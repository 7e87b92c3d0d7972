"""The one parser of the user's protocol list (BRIEF §2): names, numbers, PROTO/PORT
entries and groups, into a `ProtocolSet` (protocols.py), with every error at once and a
warning that quotes each entry it skips."""

from __future__ import annotations

import re
import reprlib
from dataclasses import dataclass

from .protocols import (
    ALL_PROTOCOLS, CONNTRACK_TRACKED, PORT_PROTOCOLS, PROTOCOL_GROUPS, PROTOCOL_NUMBERS,
    PortRanges, ProtocolSet, protocol_name,
)


class ProtocolListError(ValueError):
    """The list (with its groups) is refused: nothing of it applies. `details` holds one
    line per problem; `message`, when set, sums up (a list without a valid entry)."""

    def __init__(self, message: str, details: tuple[str, ...] = ()):
        super().__init__(message or "\n".join(details))
        self.message, self.details = message, details

    @property
    def problems(self) -> tuple[str, ...]:
        return (*self.details, self.message) if self.message else self.details


@dataclass(frozen=True)
class ParsedProtocols:
    protocols: ProtocolSet
    warnings: tuple[str, ...]
    # the user's groups (protocolGroups), each entry as the parser read it
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()


# protocol -> its port ranges while a list is read, None for every port
_Selection = dict[int, list[tuple[int, int]] | None]


def parse_protocol_list(entries: object, key: str = "protocols", groups: object = None,
                        groups_key: str = "protocolGroups") -> ParsedProtocols:
    """Parse the user's list, and the groups of their own it may name, by the rules of
    BRIEF §2.

    An invalid plain entry of the list is warned about (quoting it) and skipped, as before
    ports and groups existed; a port entry or a group definition that is wrong is an error,
    as is a list in which every entry is invalid: exporting nothing, or other ports than
    written, is never what the user meant. Every error is raised at once."""
    reader = _ListReader(groups, groups_key)
    if entries is not None and not isinstance(entries, list):
        reader.errors.append(f"{key}: expected a list of protocol names or numbers, "
                             f"PROTO/PORT entries or groups, got {quote_value(entries)}")
        entries = []
    selected: _Selection = {}
    plain_at: dict[int, int] = {}  # protocol -> the first entry exporting its every port
    chosen: list[tuple[int, object, _Selection]] = []
    for index, entry in enumerate(entries or []):
        selection = reader.entry(entry, f"{key}[{index}]", strict=False)
        if selection is None:
            continue
        chosen.append((index, entry, selection))
        for protocol, ports in selection.items():
            if ports is None:
                plain_at.setdefault(protocol, index)
            _add(selected, protocol, ports)
    for index, entry, selection in chosen:
        if any(ports is not None for ports in selection.values()) and all(
                plain_at.get(protocol, index) != index for protocol in selection):
            names = ", ".join(protocol_name(n) for n in sorted(selection))
            reader.warnings.append(
                f"{key}[{index}]: {quote_value(entry)} adds nothing: every port of {names} "
                "is exported already (a protocol without a port means every port)")
    reader.warnings.extend(f"{where}: defined but not named in {key}"
                           for name, (where, _) in reader.definitions.items()
                           if name not in reader.used)
    groups = reader.normalized()  # every group read, the unnamed ones too: their errors
    if reader.errors:
        raise ProtocolListError("", tuple(reader.errors))
    if not entries:
        return ParsedProtocols(ALL_PROTOCOLS, tuple(reader.warnings), groups)
    if not selected:
        raise ProtocolListError(
            f"{key}: none of the {len(entries)} entries is a valid protocol, port or group, "
            "so nothing would be exported; fix the entries, or remove the list to export "
            "every protocol", tuple(reader.warnings))
    ports = tuple((protocol, _merged(ranges)) for protocol, ranges in sorted(selected.items())
                  if ranges is not None)
    return ParsedProtocols(ProtocolSet(frozenset(selected), ports), tuple(reader.warnings),
                           groups)


def _add(selected: _Selection, protocol: int, ports: list[tuple[int, int]] | None) -> None:
    """Every port wins over some."""
    if ports is None or selected.get(protocol, []) is None:
        selected[protocol] = None
    else:
        selected.setdefault(protocol, []).extend(ports)


def _merged(ranges: list[tuple[int, int]]) -> PortRanges:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
        else:
            merged.append((low, high))
    return tuple(merged)


_GROUP_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*", re.ASCII)


class _ListReader:
    """Reads entries (the list's and the groups') into selections, collecting errors and
    warnings. Groups are read once each, when first named; a group met again while it is
    being read is a cycle."""

    def __init__(self, groups: object, groups_key: str):
        self.groups_key = groups_key
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.generic_warned: set[int] = set()
        self.definitions: dict[str, tuple[str, list]] = {}  # name -> (where, members)
        self.read: dict[str, _Selection] = {}
        self.reading: list[str] = []  # the user groups being read, outermost first
        self.used: set[str] = set()
        self.members: dict[str, list[str]] = {}  # user group -> members, normalized
        if groups is None:
            return
        if not isinstance(groups, dict):
            self.errors.append(f"{groups_key}: expected a mapping of group names to lists of "
                               "entries (e.g. {db: [tcp/5432, tcp/3306]}), got "
                               f"{quote_value(groups)}")
            return
        for name, members in groups.items():
            self._define(name, members)

    def _define(self, name: object, members: object) -> None:
        where = f"{self.groups_key}.{name}" if isinstance(name, str) else \
            f"{self.groups_key}: {quote_value(name)}"
        text = name.strip().lower() if isinstance(name, str) else ""
        problem = None
        if not _GROUP_NAME.fullmatch(text) or text.isdigit():
            problem = ("a group name is a word of letters, digits and - _ . (not a number), "
                       f"got {quote_value(name)}")
            text = ""  # not a name to know it by
        elif text in PROTOCOL_NUMBERS:
            number = PROTOCOL_NUMBERS[text]
            problem = f"{quote_value(name)} is the protocol {protocol_name(number)} ({number})"
        elif text in PROTOCOL_GROUPS:
            problem = (f"{quote_value(name)} is a predefined group ("
                       f"{', '.join(PROTOCOL_GROUPS[text])}); give yours another name")
        elif text in self.definitions:
            problem = f"{quote_value(name)} is defined twice (names ignore case and spaces)"
        elif not isinstance(members, list):
            problem = f"expected a list of entries, got {quote_value(members)}"
        if problem:
            self.errors.append(f"{where}: {problem}")
            if text and text not in self.definitions and text not in PROTOCOL_NUMBERS \
                    and text not in PROTOCOL_GROUPS:
                self.definitions[text] = (where, [])  # known: naming it is no second error
            return
        if not members:
            self.warnings.append(f"{where}: an empty group adds nothing where it is named")
        self.definitions[text] = (where, members)

    def entry(self, value: object, where: str, strict: bool) -> _Selection | None:
        """One entry as a selection; None (a problem recorded) if it selects nothing.
        `strict`: an invalid plain entry is an error (in a group), not a warning."""
        if isinstance(value, str):
            text = value.strip().lower()
            if text in PROTOCOL_GROUPS or text in self.definitions:
                return self.group(text, where)
            if "/" in text and text not in PROTOCOL_NUMBERS:  # "a/n" is a protocol's name
                return self._port_entry(value, text, where)
        number, problem = _parse_entry(value)
        if problem:
            if problem == _UNKNOWN_NAME:
                problem = ("not a known protocol name (names are IANA keywords such as tcp, "
                           "udp, icmp), PROTO/PORT entry (tcp/443) or group ("
                           f"{', '.join([*PROTOCOL_GROUPS, *self.definitions])})")
            if strict:
                self.errors.append(f"{where}: {quote_value(value)}: {problem}")
            else:
                self.warnings.append(f"{where}: ignoring {quote_value(value)}: {problem}")
            return None
        if number not in CONNTRACK_TRACKED and number not in self.generic_warned:
            self.generic_warned.add(number)
            self.warnings.append(
                f"{where}: {quote_value(value)} is {protocol_name(number)} ({number}); "
                "conntrack tracks it only generically (addresses, no ports or state)")
        return {number: None}

    def group(self, name: str, where: str) -> _Selection | None:
        self.used.add(name)
        if name in self.read:
            return self.read[name]
        if name in self.reading:
            cycle = " -> ".join(self.reading[self.reading.index(name):] + [name])
            self.errors.append(f"{where}: {quote_value(name)} names its own group" if
                               self.reading[-1] == name else
                               f"{where}: {quote_value(name)} makes a cycle of groups "
                               f"({cycle})")
            return None
        selected: _Selection = {}
        if name in PROTOCOL_GROUPS:
            for entry in PROTOCOL_GROUPS[name]:
                for protocol, ports in self.entry(entry, where, strict=True).items():
                    _add(selected, protocol, ports)
        else:
            group_where, members = self.definitions[name]
            self.reading.append(name)
            normalized = []
            for index, member in enumerate(members):
                selection = self.entry(member, f"{group_where}[{index}]", strict=True)
                for protocol, ports in (selection or {}).items():
                    _add(selected, protocol, ports)
                normalized.append(member.strip().lower() if isinstance(member, str)
                                  else member)
            self.reading.pop()
            self.members[name] = normalized
        self.read[name] = selected
        return selected

    def _port_entry(self, value: str, text: str, where: str) -> _Selection | None:
        """`PROTO/PORT` or `PROTO/LOW-HIGH`."""
        protocol_text, _, ports_text = (part.strip() for part in text.partition("/"))
        number, problem = _parse_entry(protocol_text)
        low_text, dash, high_text = (part.strip() for part in ports_text.partition("-"))
        low, high = _port(low_text), _port(high_text) if dash else _port(low_text)
        if problem:
            problem = f"{quote_value(protocol_text)} is not a protocol name or number"
        elif number not in PORT_PROTOCOLS:
            problem = (f"{protocol_name(number)} has no ports (a port needs tcp, udp, sctp, "
                       f"dccp or udplite); write {protocol_name(number)} for all of it")
        elif isinstance(low, str) or isinstance(high, str):
            problem = low if isinstance(low, str) else high
        elif low > high:
            problem = (f"the range is the wrong way round; write "
                       f"{protocol_name(number)}/{high}-{low}")
        if problem:
            self.errors.append(f"{where}: {quote_value(value)}: {problem}")
            return None
        return {number: [(low, high)]}

    def normalized(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The user's groups as read (names and string entries lower-cased, stripped)."""
        for name in self.definitions:
            if name not in self.read:  # unused: read for its errors and its normal form
                self.group(name, self.definitions[name][0])
        return tuple((name, tuple(self.members.get(name, ()))) for name in self.definitions)


def _port(text: str) -> int | str:
    """A service port, or the reason it is not one."""
    if not (text.isascii() and text.isdigit()):
        return (f"{quote_value(text)} is not a port: write PROTO/PORT or PROTO/LOW-HIGH "
                "with ports 1-65535 (a protocol alone means every port)")
    if len(text) > 5 or not 1 <= int(text) <= 65535:
        return f"port {text[:12]} is out of range: ports are 1-65535"
    return int(text)


_UNKNOWN_NAME = "not a known protocol name"


def _parse_entry(entry: object) -> tuple[int, str | None]:
    """One entry to a protocol number, or the reason it is not one."""
    if isinstance(entry, bool):  # before int: bool is an int subclass
        return -1, "a boolean (YAML reads yes/no/on/off as booleans; quote the name)"
    if isinstance(entry, int):
        if 0 <= entry <= 255:
            return entry, None
        hint = f" (a port? write tcp/{entry} or udp/{entry})" if 0 < entry <= 65535 else ""
        return -1, "protocol numbers are 0-255" + hint
    if isinstance(entry, str):
        text = entry.strip().lower()
        if text.isascii() and text.isdigit():
            digits = text.lstrip("0") or "0"
            if len(digits) > 3 or int(digits) > 255:  # int() refuses more than 4300 digits
                return -1, "protocol numbers are 0-255"
            return int(digits), None
        if text in PROTOCOL_NUMBERS:
            return PROTOCOL_NUMBERS[text], None
        return -1, _UNKNOWN_NAME
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
