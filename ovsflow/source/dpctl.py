"""The text of ovs-vswitchd's `dpctl/dump-conntrack -m -s`, parsed without I/O.

One entry per line, as lib/ct-dpif.c formats it:

    tcp,orig=(src=10.0.0.1,dst=10.0.0.2,sport=35460,dport=8080),reply=(src=...),id=0,
    zone=65520,status=SEEN_REPLY|CONFIRMED,timeout=29,mark=42,labels=0xabcd,
    protoinfo=(state_orig=ESTABLISHED,state_reply=ESTABLISHED,...)

The userspace datapath keeps no packet or byte counters and no start time; when a kernel
datapath adds `packets=`/`bytes=`/`start=`, they are read.

Two paths: `parse_dump` reads lines in the layout ovs-vswitchd prints (the fields above, in
that order, numbers in decimal) from one regular expression's matches over many lines at
once, and hands anything else to `parse_entry`, the general parser, which reads any order,
counters and start times, and names what is wrong. Both give the same `Connection` for the
same line (tests/test_dpctl_fast.py holds the first to the second on real dumps and fuzzed
lines); the first takes a tenth of the second's time (docs/performance.md).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime

from ..protocols import PROTOCOL_NUMBERS
from ..connection import ENDED_STATES, IDENTITY_FIELDS, Connection, identity, labels_bytes

# ct_dpif_format_ipproto's names ("icmpv6" and the rest are in the IANA table too)
_PROTOCOLS = PROTOCOL_NUMBERS

# CT_DPIF status flag bits, as ct_dpif_status_flags names them
_STATUS_BITS = {name: 1 << bit for bit, name in enumerate((
    "EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED", "SRC_NAT", "DST_NAT", "SEQ_ADJUST",
    "SRC_NAT_DONE", "DST_NAT_DONE", "DYING", "FIXED_TIMEOUT", "TEMPLATE", "UNTRACKED"))}


class DpctlParseError(ValueError):
    """A line that is not a conntrack entry; the text quotes it."""


def _fields(text: str, line: str) -> dict[str, str]:
    """`a=1,b=(c=2,d=3),e=4` to {'a': '1', 'b': 'c=2,d=3', 'e': '4'} (one level of parens,
    all the format has)."""
    fields: dict[str, str] = {}
    pos, end = 0, len(text)
    while pos < end:
        equals = text.find("=", pos)
        if equals < 0:
            raise DpctlParseError(f"expected key=value at {text[pos:pos + 30]!r} in {line!r}")
        key = text[pos:equals]
        if equals + 1 < end and text[equals + 1] == "(":
            close = text.find(")", equals + 2)
            if close < 0:
                raise DpctlParseError(f"unclosed '(' after {key}= in {line!r}")
            fields[key] = text[equals + 2:close]
            pos = close + 1
            if pos < end and text[pos] != ",":
                raise DpctlParseError(f"expected ',' after {key}=(...) in {line!r}")
            pos += 1
        else:
            comma = text.find(",", equals + 1)
            comma = end if comma < 0 else comma
            fields[key] = text[equals + 1:comma]
            pos = comma + 1
    return fields


def _address(text: str, line: str) -> bytes:
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        raise DpctlParseError(f"bad address {text!r} in {line!r}") from None


def _int(fields: dict[str, str], key: str, line: str, bits: int = 32) -> int:
    """fields[key] (0 when absent) as an unsigned number of `bits` bits: a value that does
    not fit its field is an error here, not an exception in the encoder."""
    text = fields.get(key)
    if text is None:
        return 0
    try:
        value = int(text, 0)
    except ValueError:
        raise DpctlParseError(f"bad number {key}={text!r} in {line!r}") from None
    if not 0 <= value < 1 << bits:
        raise DpctlParseError(f"{key}={text} out of range ({bits} bits) in {line!r}")
    return value


def _status(text: str, line: str) -> int:
    if text.isascii() and text.isdigit():
        return int(text)
    bits = 0
    for name in text.split("|"):
        if name not in _STATUS_BITS:
            raise DpctlParseError(f"unknown status flag {name!r} in {line!r}")
        bits |= _STATUS_BITS[name]
    return bits


def _start_ns(text: str, line: str) -> int:
    """`start=2026-11-25T22:17:12.345` to ns since the epoch. ct-dpif.c prints it with
    `ds_put_strftime_msec(..., utc=false)`: ovs-vswitchd's local time, with no zone in the
    text. The agent runs on the same node, so it reads it in its own local time zone."""
    try:
        moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f")  # naive: local time
        start_ns = round(moment.timestamp() * 1000) * 1_000_000
    except (ValueError, OverflowError, OSError):
        raise DpctlParseError(f"bad start time {text!r} in {line!r}") from None
    if start_ns <= 0:
        raise DpctlParseError(f"start time {text!r} before 1970 in {line!r}")
    return start_ns


def _protocol(text: str, line: str) -> int:
    """A name ct_dpif_format_ipproto prints, or the number it prints for the others."""
    protocol = _PROTOCOLS.get(text)
    if protocol is None:
        if not (text.isascii() and text.isdigit()) or int(text) > 255:
            raise DpctlParseError(f"unknown protocol {text!r} in {line!r}")
        protocol = int(text)
    return protocol


def parse_entry(line: str) -> Connection:
    """One line in any layout ct-dpif.c can print (the general parser)."""
    protocol_text, sep, rest = line.strip().partition(",")
    if not sep:
        raise DpctlParseError(f"not a conntrack entry: {line!r}")
    protocol = _protocol(protocol_text, line)
    fields = _fields(rest, line)
    if "orig" not in fields or "reply" not in fields:
        raise DpctlParseError(f"missing orig=(...) or reply=(...) in {line!r}")
    orig, reply = _fields(fields["orig"], line), _fields(fields["reply"], line)
    for tuple_fields in (orig, reply):
        if "src" not in tuple_fields or "dst" not in tuple_fields:
            raise DpctlParseError(f"a tuple without src= or dst= in {line!r}")
    source, destination = _address(orig["src"], line), _address(orig["dst"], line)
    if len(source) != len(destination):
        raise DpctlParseError(f"mixed IPv4 and IPv6 in {line!r}")
    protoinfo = _fields(fields["protoinfo"], line) if "protoinfo" in fields else {}
    packets, octets = _int(orig, "packets", line, 64), _int(orig, "bytes", line, 64)
    reply_packets = _int(reply, "packets", line, 64)
    reply_octets = _int(reply, "bytes", line, 64)
    labels = _int(fields, "labels", line, 128)
    status = _status(fields.get("status", "0"), line)
    state = protoinfo.get("state_orig", protoinfo.get("state", ""))
    sport, dport = _int(orig, "sport", line, 16), _int(orig, "dport", line, 16)
    icmp_type, icmp_code = _int(orig, "type", line, 8), _int(orig, "code", line, 8)
    icmp_id, zone = _int(orig, "id", line, 16), _int(fields, "zone", line, 16)
    start_ns = _start_ns(fields["start"], line) if "start" in fields else 0
    return Connection(
        protocol, source, destination, sport, dport, _address(reply["src"], line),
        _address(reply["dst"], line), _int(reply, "sport", line, 16),
        _int(reply, "dport", line, 16), icmp_type, icmp_code, icmp_id, zone,
        _int(fields, "mark", line),
        labels_bytes(labels),
        status, state, packets, octets, reply_packets, reply_octets,
        "packets" in orig or "bytes" in orig, start_ns,
        _int(fields, "id", line), _int(fields, "timeout", line),
        bool(status & _STATUS_BITS["DYING"]) or state in ENDED_STATES,
        identity(protocol, source, destination, sport, dport, icmp_id, icmp_type, icmp_code,
                 zone, start_ns))


PIECE = 1 << 18  # characters of a text parsed at a time (~1,500 lines)


def _uncaptured(pattern: str) -> str:
    """The pattern with its groups made non-capturing."""
    return re.sub(r"(?<!\\)\((?!\?)", "(?:", pattern)


# The layout ovs-vswitchd prints, field by field (ct_dpif_format_entry with -m -s). Numbers
# as it prints them (decimal, no leading zeros, at most 10 digits: a longer one goes to the
# general parser, which names it); the range of each is checked after the match.
_NUMBER = r"(0|[1-9][0-9]{0,9})"
_ADDRESS = r"([0-9a-fA-F.:]{2,45})"
_PORTS = rf"src={_ADDRESS},dst={_ADDRESS},sport={_NUMBER},dport={_NUMBER}"
_ICMP = rf"src={_ADDRESS},dst={_ADDRESS},id={_NUMBER},type={_NUMBER},code={_NUMBER}"
# the reply's id, type and code are not read, by the general parser either: any digits
_ICMP_REPLY = (rf"src={_ADDRESS},dst={_ADDRESS},"
               r"id=[0-9]{1,20},type=[0-9]{1,20},code=[0-9]{1,20}")
# The fields around timeout=, in two spans read whole: the first (id, zone, status) and the
# last (mark, labels, protoinfo) are the same text for most of a table, converted once each.
_HEAD = rf"id={_NUMBER}(?:,zone={_NUMBER})?,status=([0-9A-Z_|]{{1,200}})"
_TAIL = (rf"(?:,mark={_NUMBER})?(?:,labels=0x([0-9a-f]{{1,32}}))?"
         # protoinfo: its state first (the one field read), then any key=value but a second
         # state_orig (the general parser would take the last)
         r"(?:,protoinfo=\(state_orig=([0-9A-Z_]{1,40})"
         r"(?:,(?!state_orig=)[a-z_]{1,40}=[0-9A-Za-z_|]{0,200})*\))?")
_REST = rf",({_uncaptured(_HEAD)}),timeout={_NUMBER}({_uncaptured(_TAIL)})"
_HEAD_FIELDS = re.compile(_HEAD, re.ASCII).fullmatch
_TAIL_FIELDS = re.compile(_TAIL, re.ASCII).fullmatch
# Every line of a text: an entry with ports in that layout (the line, then its fields), or
# any other line, whole, in the last group ('' for a group that is absent). One search over
# many lines costs two thirds of a match per line, and a reply tuple that mirrors the
# original is matched, not captured.
_LINES = re.compile(
    rf"^(?:(([0-9a-z-]{{1,20}}),orig=\({_PORTS}\),reply=\("
    # the reply tuple: the original's mirror (no NAT: nothing captured, all groups ''), or not
    rf"(?:src=\4,dst=\3,sport=\6,dport=\5|{_PORTS})\){_REST})|(.*))$",
    re.ASCII | re.MULTILINE).findall
_ICMP_LINE = re.compile(rf"([0-9a-z-]{{1,20}}),orig=\({_ICMP}\),reply=\({_ICMP_REPLY}\){_REST}",
                        re.ASCII).fullmatch
_DYING = _STATUS_BITS["DYING"]
# Connection.key as `identity` packs it (IDENTITY_FIELDS, then the addresses), with no call
# per entry; the start time, which this layout has not, is 0
_KEY_HEAD = struct.Struct(">" + "".join(code for _, code in IDENTITY_FIELDS)).pack


class _Unusual(Exception):
    """A line the common layout parser leaves to the general one."""


def common_layout_parser(general: Callable[[str], Connection] = parse_entry
                         ) -> Callable[[str], tuple[list[Connection], list[DpctlParseError]]]:
    """A parser for the texts of one dump, each of whole lines: the connections and the
    errors of each text. A line in ovs-vswitchd's own layout is read from a regular
    expression's match, its fields converted through caches kept for the rest of the dump
    (a node's table repeats its addresses, zones, timeouts, statuses); the reply tuple takes
    the original's values where it mirrors it (no NAT). Any other line (another
    layout, something wrong in it) goes to `general`."""
    addresses: dict[str, bytes] = {}
    timeouts: dict[str, int] = {}
    protocols: dict[str, int] = {}
    heads: dict[str, tuple[int, int, int, bool]] = {}  # id, zone, status, dying
    tails: dict[str, tuple[int, bytes, str, bool]] = {}  # mark, labels, state, ended
    get_address, get_timeout = addresses.get, timeouts.get
    get_protocol, get_head, get_tail = protocols.get, heads.get, tails.get
    key_head = _KEY_HEAD
    new = tuple.__new__
    pton, ipv4, ipv6 = socket.inet_pton, socket.AF_INET, socket.AF_INET6

    def address(text: str) -> bytes:
        try:
            packed = addresses[text] = pton(ipv6 if ":" in text else ipv4, text)
        except OSError:
            raise _Unusual from None
        return packed

    def number(text: str, limit: int = 0xFFFFFFFF) -> int:
        value = int(text or 0)  # '': an optional field that is absent, as parse_entry reads it
        if value > limit:
            raise _Unusual
        return value

    def timeout(text: str) -> int:
        value = timeouts[text] = number(text)
        return value

    def protocol(text: str) -> int:
        try:
            value = protocols[text] = _protocol(text, "")
        except DpctlParseError:
            raise _Unusual from None
        return value

    def head(text: str) -> tuple[int, int, int, bool]:
        id_text, zone_text, status_text = _HEAD_FIELDS(text).groups("")
        try:
            status = _status(status_text, "")
        except DpctlParseError:
            raise _Unusual from None
        value = heads[text] = (number(id_text), number(zone_text, 0xFFFF), status,
                               bool(status & _DYING))
        return value

    def tail(text: str) -> tuple[int, bytes, str, bool]:
        mark_text, labels_text, state = _TAIL_FIELDS(text).groups("")
        value = tails[text] = (number(mark_text),
                               labels_bytes(int(labels_text, 16)) if labels_text else b"",
                               state, state in ENDED_STATES)
        return value

    def parse(text: str) -> tuple[list[Connection], list[DpctlParseError]]:
        connections: list[Connection] = []
        errors: list[DpctlParseError] = []
        append = connections.append

        def leftover(lines: str) -> None:
            for line in lines.splitlines():
                if line.strip():
                    try:
                        append(general(line))
                    except DpctlParseError as err:
                        errors.append(err)

        for (line, protocol_text, source_text, destination_text, sport_text, dport_text,
             reply_source_text, reply_destination_text, reply_sport_text, reply_dport_text,
             head_text, timeout_text, tail_text, other) in _LINES(text):
            try:
                if line:
                    # ports not cached: a node's client ports are as many as its entries
                    sport, dport = int(sport_text), int(dport_text)
                    if reply_source_text:  # NAT
                        reply_sport, reply_dport = int(reply_sport_text), int(reply_dport_text)
                    else:
                        reply_sport, reply_dport = dport, sport
                    if (sport | dport | reply_sport | reply_dport) > 0xFFFF:
                        raise _Unusual
                    icmp_id = icmp_type = icmp_code = 0
                elif (match := _ICMP_LINE(other)) is not None:
                    line = other
                    (protocol_text, source_text, destination_text, icmp_id, icmp_type,
                     icmp_code, reply_source_text, reply_destination_text, head_text,
                     timeout_text, tail_text) = match.groups()
                    icmp_id, icmp_type = int(icmp_id), int(icmp_type)
                    icmp_code = int(icmp_code)
                    if icmp_id > 0xFFFF or (icmp_type | icmp_code) > 0xFF:
                        raise _Unusual
                    sport = dport = reply_sport = reply_dport = 0
                else:
                    if other:
                        leftover(other)
                    continue
                source = get_address(source_text) or address(source_text)
                destination = get_address(destination_text) or address(destination_text)
                if len(source) != len(destination):
                    raise _Unusual
                if reply_source_text:  # NAT, or ICMP
                    reply_source = get_address(reply_source_text) or address(reply_source_text)
                    reply_destination = (get_address(reply_destination_text)
                                         or address(reply_destination_text))
                else:
                    reply_source, reply_destination = destination, source
                number_, zone, status, dying = get_head(head_text) or head(head_text)
                mark, labels, state, closed = get_tail(tail_text) or tail(tail_text)
                if (seconds := get_timeout(timeout_text)) is None:
                    seconds = timeout(timeout_text)
                if (protocol_number := get_protocol(protocol_text)) is None:
                    protocol_number = protocol(protocol_text)
            except _Unusual:
                leftover(line)
                continue
            append(new(Connection, (
                protocol_number, source, destination, sport, dport, reply_source,
                reply_destination, reply_sport, reply_dport, icmp_type, icmp_code, icmp_id,
                zone, mark, labels, status, state, 0, 0, 0, 0, False, 0, number_, seconds,
                dying or closed,
                key_head(protocol_number, sport, dport, icmp_id, icmp_type, icmp_code, zone,
                         0) + source + destination)))
        return connections, errors

    return parse


def parse_dump(text: str) -> tuple[list[Connection], list[DpctlParseError]]:
    """Every entry that parses, and the errors of those that do not: one odd line must not
    cost the rest of the table."""
    connections: list[Connection] = []
    errors: list[DpctlParseError] = []
    for piece_connections, piece_errors in parse_pieces(pieces(text)):
        connections += piece_connections
        errors += piece_errors
    return connections, errors


def pieces(text: str, size: int = PIECE) -> Iterator[str]:
    """`text` in pieces of about `size` characters, cut after a newline."""
    start, end = 0, len(text)
    while start < end:
        cut = text.find("\n", start + size)
        cut = end if cut < 0 else cut + 1
        yield text[start:cut]
        start = cut


def parse_pieces(texts: Iterable[str]
                 ) -> Iterator[tuple[list[Connection], list[DpctlParseError]]]:
    """`parse_dump` of a dump that comes in pieces of whole lines (as ovs-vswitchd's reply
    is decoded), a piece at a time: a 100k dump's lines never exist all at once as strings
    (~20 MB). One parser for all the pieces: what it has converted serves the rest."""
    return map(common_layout_parser(), texts)


_FIRST_ENTRY = re.compile(r"([0-9a-z-]{1,20}),orig=\(").match
_NEXT_ENTRIES = re.compile(r"\n([0-9a-z-]{1,20}),orig=\(").findall


def count_entries(text: str) -> Counter[int]:
    """The dump's entries by protocol number, without parsing them (`ovsflow conntrack
    --count`): a line counts if it starts with a protocol and `,orig=(`. Found by one
    search over the whole text, not line by line (half the time)."""
    first = _FIRST_ENTRY(text)
    prefixes = Counter(_NEXT_ENTRIES(text))
    if first:
        prefixes[first[1]] += 1
    counts: Counter[int] = Counter()
    for prefix, lines in prefixes.items():
        try:
            counts[_protocol(prefix, prefix)] += lines
        except DpctlParseError:
            pass  # a protocol parse_dump rejects too
    return counts
