"""The text of ovs-vswitchd's `dpctl/dump-conntrack -m -s`, parsed without I/O.

One entry per line, as lib/ct-dpif.c formats it:

    tcp,orig=(src=10.0.0.1,dst=10.0.0.2,sport=35460,dport=8080),reply=(src=...),id=0,
    zone=65520,status=SEEN_REPLY|CONFIRMED,timeout=29,mark=42,labels=0xabcd,
    protoinfo=(state_orig=ESTABLISHED,state_reply=ESTABLISHED,...)

The userspace datapath keeps no packet or byte counters and no start time; when a kernel
datapath adds `packets=`/`bytes=`/`start=`, they are read.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime

from ..protocols import PROTOCOL_NUMBERS
from ..connection import ENDED_STATES, Connection, identity, labels_bytes

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


def parse_entry(line: str) -> Connection:
    protocol_text, sep, rest = line.strip().partition(",")
    if not sep:
        raise DpctlParseError(f"not a conntrack entry: {line!r}")
    protocol = _PROTOCOLS.get(protocol_text)
    if protocol is None:
        numeric = protocol_text.isascii() and protocol_text.isdigit()
        if not numeric or int(protocol_text) > 255:
            raise DpctlParseError(f"unknown protocol {protocol_text!r} in {line!r}")
        protocol = int(protocol_text)
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
    return Connection(
        protocol, source, destination, sport, dport, _address(reply["src"], line),
        _address(reply["dst"], line), _int(reply, "sport", line, 16),
        _int(reply, "dport", line, 16), icmp_type, icmp_code, icmp_id, zone,
        _int(fields, "mark", line),
        labels_bytes(labels),
        status, state, packets, octets, reply_packets, reply_octets,
        "packets" in orig or "bytes" in orig,
        _start_ns(fields["start"], line) if "start" in fields else 0,
        _int(fields, "id", line), _int(fields, "timeout", line),
        bool(status & _STATUS_BITS["DYING"]) or state in ENDED_STATES,
        identity(protocol, source, destination, sport, dport, icmp_id, icmp_type, icmp_code,
                 zone))


def parse_dump(text: str) -> tuple[list[Connection], list[DpctlParseError]]:
    """Every entry that parses, and the errors of those that do not: one odd line must not
    cost the rest of the table."""
    connections, errors = [], []
    for line in text.splitlines():
        if line.strip():
            try:
                connections.append(parse_entry(line))
            except DpctlParseError as err:
                errors.append(err)
    return connections, errors
