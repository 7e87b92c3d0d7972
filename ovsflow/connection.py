"""A conntrack entry, as both sources report it."""

from __future__ import annotations

from dataclasses import dataclass

ICMP_PROTOCOLS = (1, 58)


@dataclass(slots=True)
class Connection:
    """One conntrack entry at the time of a poll. Addresses are packed (4 or 16 bytes).
    For ICMP, ports are 0 and the echo id, type and code are kept instead."""

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
    labels: bytes = b""
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
