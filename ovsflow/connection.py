"""A conntrack entry, as both sources report it."""

from __future__ import annotations

import struct
from typing import NamedTuple

ICMP_PROTOCOLS = (1, 58)
# States after which a connection carries no more traffic worth waiting for, as both
# sources name them: TIME_WAIT and CLOSE (kernel TCP), CLOSED (SCTP, OVS userspace TCP).
ENDED_STATES = frozenset({"TIME_WAIT", "CLOSE", "CLOSED"})

# Conntrack labels (128 bits) travel in the kernel's own layout, CTA_LABELS as it comes: two
# u64 words in host byte order, bits 0-63 first. The kernel decoder, the poll's hot path,
# then copies them without work; the OVS source, which reads them as a number from text,
# packs them so.
_LABEL_WORDS = struct.Struct("=QQ")

# Connection.key, the store's identity of a connection: its zone, original tuple and start
# time, packed so (27 bytes for IPv4, 51 for IPv6) by every source, in this order and
# big-endian. The start (ns, 0 where the source keeps none) is what tells a new connection
# on a reused tuple from the old one when the kernel hands the new entry the old one's
# conntrack id (`nf_ct_get_id` hashes the entry's address, which the slab reuses). The
# store reads a record's protocol, ports, ICMP fields and addresses back from the key rather
# than keeping them twice.
IDENTITY_FIELDS = (("protocol", "B"), ("source_port", "H"), ("destination_port", "H"),
                   ("icmp_id", "H"), ("icmp_type", "B"), ("icmp_code", "B"), ("zone", "H"),
                   ("start_ns", "Q"))
_IDENTITY = struct.Struct(">" + "".join(code for _, code in IDENTITY_FIELDS))
IDENTITY_SIZE = _IDENTITY.size  # then the source and destination addresses


def identity(protocol: int, source: bytes, destination: bytes, source_port: int,
             destination_port: int, icmp_id: int, icmp_type: int, icmp_code: int,
             zone: int, start_ns: int = 0) -> bytes:
    return _IDENTITY.pack(protocol, source_port, destination_port, icmp_id, icmp_type,
                          icmp_code, zone, start_ns) + source + destination


def labels_value(labels: bytes) -> int:
    """The 128-bit label as a number (b"": none); what dpctl and `conntrack -L` print."""
    if not labels:
        return 0
    low, high = _LABEL_WORDS.unpack(labels)
    return high << 64 | low


def labels_bytes(value: int) -> bytes:
    return _LABEL_WORDS.pack(value & 0xFFFFFFFFFFFFFFFF, value >> 64) if value else b""


class Connection(NamedTuple):
    """One conntrack entry at the time of a poll. Addresses are packed (4 or 16 bytes).
    For ICMP, ports are 0 and the echo id, type and code are kept instead.

    A named tuple, not a dataclass: the kernel decoder builds 100k of these per poll, and
    `tuple.__new__` over the values in field order costs less than half a dataclass `__init__`
    (see ctnetlink's fast path). Immutable: sources compute every field before building."""

    protocol: int
    source: bytes
    destination: bytes
    source_port: int = 0
    destination_port: int = 0
    reply_source: bytes = b""
    reply_destination: bytes = b""
    reply_source_port: int = 0
    reply_destination_port: int = 0
    icmp_type: int = 0
    icmp_code: int = 0
    icmp_id: int = 0
    zone: int = 0
    mark: int = 0
    labels: bytes = b""  # see labels_value
    status: int = 0
    state: str = ""  # TCP, SCTP or DCCP state name, as conntrack -L prints it
    packets: int = 0
    octets: int = 0
    reply_packets: int = 0
    reply_octets: int = 0
    counted: bool = True  # False: the source keeps no counters (OVS userspace datapath)
    start_ns: int = 0  # wall clock, ns since the Unix epoch; 0 = unknown
    id: int = 0
    timeout: int = 0
    # The source's verdict that the connection carries no more traffic worth waiting for
    # (kernel: IPS_DYING or a closed TCP/SCTP state; OVS: the same read from its text), so
    # the store exports it now and needs no source's constants.
    ended: bool = False
    # The connection's identity for the store (see `identity`). Every source sets it; bytes
    # hash once and compare fast, where a tuple of fields hashes per lookup.
    key: bytes = b""
