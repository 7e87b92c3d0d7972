"""Value parsers: each takes the YAML value and returns the typed value or raises ValueError
with a message about the value (the caller adds the key)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from ..protocol_list import quote_value
from .model import DEFAULT_IPFIX_PORT, TRANSPORTS, CollectorAddress, IPNetwork, MetricsConfig


_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)


def parse_collector_address(value: object) -> CollectorAddress:
    """Antrea's grammar (`ParseFlowCollectorAddr` in its pkg/util/flowexport): `HOST`,
    `HOST:PORT`, `HOST:PORT:PROTO` or `HOST::PROTO`, an IPv6 host in brackets; an omitted
    PORT is 4739 (IANA's IPFIX port), an omitted PROTO tls, as in Antrea."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected 'HOST[:PORT][:PROTO]' (e.g. '127.0.0.1:4739:udp'), got "
                         f"{quote_value(value)}")
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{quote_value(value)}: an IPv6 host needs a closing ']', then "
                             "':PORT' or nothing")
        parts = rest[1:].split(":") if rest else []
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{quote_value(value)}: {quote_value(host)} is not an IPv6 "
                             "address") from None
    else:
        host, *parts = text.split(":")
        if len(parts) > 2:
            raise ValueError(f"{quote_value(value)}: write an IPv6 host in brackets, e.g. "
                             "'[fd00::1]:4739:udp'")
        if not is_host(host):
            raise ValueError(f"{quote_value(value)}: {quote_value(host)} is not an IP address "
                             "or host name")
    if len(parts) > 2:
        raise ValueError(f"{quote_value(value)}: expected HOST[:PORT][:PROTO]")
    port_text = parts[0] if parts and parts[0] else str(DEFAULT_IPFIX_PORT)
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
            and 1 <= int(port_text) <= 65535):
        raise ValueError(f"{quote_value(value)}: port {quote_value(port_text)} is not a number "
                         "from 1 to 65535")
    transport = parts[1].lower() if len(parts) == 2 else "tls"
    if transport not in TRANSPORTS:
        raise ValueError(f"{quote_value(value)}: transport {quote_value(parts[1])} is not one of "
                         f"{', '.join(TRANSPORTS)}")
    return CollectorAddress(host, int(port_text), transport)


def is_host(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        return is_host_name(text) and not text.replace(".", "").isdigit()


def is_host_name(text: str) -> bool:
    """RFC 1123 labels, an optional final dot. One label at a time: a single regex over the
    whole name backtracked exponentially on a long name with a character it cannot match."""
    labels = text.removesuffix(".").split(".")
    return 0 < len(text) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def parse_bind_address(value: object) -> MetricsConfig:
    """`HOST:PORT` (IPv6 host in brackets) for the metrics and health server; "" disables
    it. Loopback by default: nothing else listens."""
    if value == "" or value is None:
        return MetricsConfig("", 0)
    if not isinstance(value, str):
        raise ValueError(f"expected 'HOST:PORT' (e.g. '127.0.0.1:9495') or '', got "
                         f"{quote_value(value)}")
    address = parse_collector_address(value + ":tcp")
    return MetricsConfig(address.host, address.port)


def parse_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {quote_value(value)}")
    return value


def integer_in(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}, got "
                             f"{quote_value(value)}")
        return value
    return parse


def one_of(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {quote_value(value)}")
        return value  # type: ignore[return-value]
    return parse


def non_empty_string(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {quote_value(value)}")
    return value.strip()


def optional_string(value: object) -> str | None:
    if value is None or value == "":
        return None
    return non_empty_string(value)


def parse_cidrs(value: object) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of CIDRs (e.g. [10.10.0.0/16, fd00:10::/48]), got "
                         f"{quote_value(value)}")
    networks = []
    for index, entry in enumerate(value):
        if not isinstance(entry, str):
            raise ValueError(f"entry {index}: expected a CIDR, got {quote_value(entry)}")
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=True))
        except ValueError as err:
            raise ValueError(f"entry {index}: {quote_value(entry)} is not a CIDR ({err})") \
                from None
    return tuple(networks)


def parse_zones(value: object) -> frozenset[int]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of conntrack zones (0-65535), got {quote_value(value)}")
    zone = integer_in(0, 65535)
    zones = set()
    for index, entry in enumerate(value):
        try:
            zones.add(zone(entry))
        except ValueError as err:
            raise ValueError(f"entry {index}: {err}") from None
    return frozenset(zones)
