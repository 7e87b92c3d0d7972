"""Ethernet frames of denied packets to what a flow record needs; no I/O."""

from __future__ import annotations

import struct
from dataclasses import dataclass

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
IPV6_EXTENSIONS = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
IPV6_FRAGMENT = 44
PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})  # TCP, UDP, DCCP, SCTP, UDP-Lite
ICMP_PROTOCOLS = frozenset({1, 58})


class PacketError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class DeniedPacket:
    source: bytes
    destination: bytes
    protocol: int
    source_port: int
    destination_port: int
    icmp_type: int
    icmp_code: int
    ip_length: int  # the IP packet's own length (header included), not the captured part


def parse_packet(frame: bytes) -> DeniedPacket:
    """Parse as far as the L4 ports; the frame may be cut short by the packet-in's max_len,
    so lengths come from the IP headers, not from the frame."""
    if len(frame) < 14:
        raise PacketError(f"frame of {len(frame)} bytes is too short for Ethernet")
    ethertype, pos = struct.unpack_from("!H", frame, 12)[0], 14
    while ethertype in (ETH_P_8021Q, ETH_P_8021AD):
        if len(frame) < pos + 4:
            raise PacketError("truncated VLAN tag")
        ethertype, pos = struct.unpack_from("!H", frame, pos + 2)[0], pos + 4
    if ethertype == ETH_P_IP:
        if len(frame) < pos + 20:
            raise PacketError("truncated IPv4 header")
        header_length = (frame[pos] & 0x0F) * 4
        total_length = struct.unpack_from("!H", frame, pos + 2)[0]
        fragment = struct.unpack_from("!H", frame, pos + 6)[0] & 0x1FFF
        protocol = frame[pos + 9]
        source, destination = frame[pos + 12:pos + 16], frame[pos + 16:pos + 20]
        l4 = pos + header_length if fragment == 0 else None
    elif ethertype == ETH_P_IPV6:
        if len(frame) < pos + 40:
            raise PacketError("truncated IPv6 header")
        total_length = struct.unpack_from("!H", frame, pos + 4)[0] + 40
        protocol = frame[pos + 6]
        source, destination = frame[pos + 8:pos + 24], frame[pos + 24:pos + 40]
        l4: int | None = pos + 40
        while protocol in IPV6_EXTENSIONS or protocol == IPV6_FRAGMENT:
            if len(frame) < l4 + 8:
                l4 = None
                break
            if protocol == IPV6_FRAGMENT:
                later_fragment = struct.unpack_from("!H", frame, l4 + 2)[0] & 0xFFF8
                protocol, l4 = frame[l4], (None if later_fragment else l4 + 8)
                if l4 is None:
                    break
            else:
                protocol, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
    else:
        raise PacketError(f"ethertype {ethertype:#06x} is not IP")
    sport = dport = icmp_type = icmp_code = 0
    if l4 is not None:
        if protocol in PORT_PROTOCOLS and len(frame) >= l4 + 4:
            sport, dport = struct.unpack_from("!HH", frame, l4)
        elif protocol in ICMP_PROTOCOLS and len(frame) >= l4 + 2:
            icmp_type, icmp_code = frame[l4], frame[l4 + 1]
    return DeniedPacket(bytes(source), bytes(destination), protocol, sport, dport, icmp_type,
                        icmp_code, total_length)
