"""The configuration file: YAML in, one immutable typed `Config` out.

The `flowExporter` section is Antrea's (antrea-agent.conf), so an operator can paste it.
Every problem names the key and quotes the value; all problems of a file are reported at
once, and unknown keys are errors, because a typo that silently does nothing is the worst
kind of configuration bug.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import zlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from .protocol_list import ParsedProtocols, ProtocolListError, parse_protocol_list, quote_value
from .protocols import ALL_PROTOCOLS, ProtocolSet

# ssl and difflib are imported where a TLS file or a misspelt key needs them: `ovsflow
# conntrack` loads a configuration on every run and pays for each module it imports
# (tests/test_cli_imports.py).
if TYPE_CHECKING:
    import ssl

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TRANSPORTS = ("udp", "tcp", "tls")
CONNTRACK_SOURCES = ("auto", "kernel", "ovs")
DENY_SOURCES = ("table", "antrea")
DEFAULT_IPFIX_PORT = 4739


class ConfigError(Exception):
    """The agent would refuse to start; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class CollectorAddress:
    host: str
    port: int
    transport: str  # udp | tcp | tls

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}:{self.transport}"


@dataclass(frozen=True)
class FlowExporterConfig:
    enable: bool = True
    collector: CollectorAddress = CollectorAddress("127.0.0.1", DEFAULT_IPFIX_PORT, "udp")
    poll_interval: float = 5.0
    active_timeout: float = 5.0
    idle_timeout: float = 15.0
    # a record at least this often for every live connection, even one that did not move;
    # 0: none (a record says something new, or is not sent)
    heartbeat_timeout: float = 0.0
    protocols: ProtocolSet = ALL_PROTOCOLS
    # the user's groups (protocolGroups) as read, for the effective configuration; the
    # protocols above have them resolved
    protocol_groups: tuple[tuple[str, tuple[object, ...]], ...] = ()


@dataclass(frozen=True)
class ConntrackConfig:
    source: str = "auto"
    zones: frozenset[int] = frozenset({65520, 65510})  # Antrea's IPv4, IPv6; empty: every zone
    max_connections: int = 500_000


@dataclass(frozen=True)
class OvsConfig:
    run_dir: str = "/var/run/openvswitch"
    bridge: str = "br-int"  # "": no bridge, no deny path
    deny_table: int = 250
    deny_meter_id: int = 28518  # 0x6f66, as the controller id: beyond Antrea's 1-258
    deny_packet_in_rate: int = 5000  # packets/s, as Antrea's packet-in meters
    max_deny_connections: int = 100_000
    # table: the pipeline resubmits denied packets to deny_table, where ovsflow's flows are;
    # antrea: ovsflow installs nothing and listens to Antrea's own deny packet-ins
    deny_source: str = "table"


# /run is a tmpfs, cleared at boot like the export state's meaning: conntrack's entries do not
# survive a reboot. A DaemonSet mounts it from the host; systemd keeps it across restarts.
DEFAULT_STATE_DIRECTORY = "/var/run/ovsflow"


@dataclass(frozen=True)
class StateConfig:
    directory: str = DEFAULT_STATE_DIRECTORY  # "": no export state kept


@dataclass(frozen=True)
class TlsSettings:
    ca_file: str | None = None  # None: the system's trusted CAs
    cert_file: str | None = None  # client certificate, for collectors that ask for one
    key_file: str | None = None
    server_name: str | None = None  # None: the collector's host
    insecure_skip_verify: bool = False


def default_node_name() -> str:
    """As Antrea: the NODE_NAME environment variable (set from the pod spec), else the host
    name."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


@dataclass(frozen=True)
class CollectorConfig:
    """One collector: every record goes to each, with its own transport, TLS and queue."""

    address: CollectorAddress
    tls: TlsSettings = TlsSettings()
    max_buffered_records: int = 100_000


@dataclass(frozen=True)
class IpfixConfig:
    node_name: str = field(default_factory=default_node_name)
    domain_id: int | None = None  # None: derived from node_name
    template_refresh: float = 600.0
    path_mtu: int = 1500
    max_buffered_records: int = 100_000
    tls: TlsSettings = TlsSettings()
    # Every node's Pod CIDRs: what tells an inter-node peer from an external one (flowType)
    cluster_pod_cidrs: tuple[IPNetwork, ...] = ()
    collectors: tuple[CollectorConfig, ...] = ()  # (): flowExporter.flowCollectorAddr's one

    @property
    def observation_domain_id(self) -> int:
        """Configured, or a hash of the node name: stable across restarts of one node."""
        if self.domain_id is not None:
            return self.domain_id
        return zlib.crc32(self.node_name.encode())


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"  # "" (bindAddress ""): no metrics or health server
    port: int = 9495


@dataclass(frozen=True)
class Config:
    flow_exporter: FlowExporterConfig = FlowExporterConfig()
    conntrack: ConntrackConfig = ConntrackConfig()
    ovs: OvsConfig = OvsConfig()
    ipfix: IpfixConfig = field(default_factory=IpfixConfig)
    metrics: MetricsConfig = MetricsConfig()
    state: StateConfig = StateConfig()
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def collectors(self) -> tuple[CollectorConfig, ...]:
        """Where records go: `ipfix.collectors`, or Antrea's one `flowCollectorAddr`."""
        ipfix = self.ipfix
        return ipfix.collectors or (CollectorConfig(
            self.flow_exporter.collector, ipfix.tls, ipfix.max_buffered_records),)

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration in the file's own key names and formats."""
        fe, ct, ovs, ipfix = self.flow_exporter, self.conntrack, self.ovs, self.ipfix
        protocols = fe.protocols.numbers
        effective = {
            "flowExporter": {
                "enable": fe.enable,
                "flowCollectorAddr": str(fe.collector),
                "flowPollInterval": format_duration(fe.poll_interval),
                "activeFlowExportTimeout": format_duration(fe.active_timeout),
                "idleFlowExportTimeout": format_duration(fe.idle_timeout),
                "heartbeatFlowExportTimeout": format_duration(fe.heartbeat_timeout)
                if fe.heartbeat_timeout else "0s",
                "protocols": "all" if protocols is None else sorted(protocols),
                "protocolGroups": {name: list(members)
                                   for name, members in fe.protocol_groups},
            },
            "conntrack": {"source": ct.source, "zones": sorted(ct.zones),
                          "maxConnections": ct.max_connections},
            "ovs": {"runDir": ovs.run_dir, "bridge": ovs.bridge, "denyTable": ovs.deny_table,
                    "denyMeterId": ovs.deny_meter_id,
                    "denyPacketInRate": ovs.deny_packet_in_rate,
                    "maxDenyConnections": ovs.max_deny_connections,
                    "denySource": ovs.deny_source},
            "ipfix": {
                "nodeName": ipfix.node_name,
                "observationDomainId": ipfix.observation_domain_id,
                "templateRefreshTimeout": format_duration(ipfix.template_refresh),
                "pathMTU": ipfix.path_mtu,
                "maxBufferedRecords": ipfix.max_buffered_records,
                "clusterPodCIDRs": [str(network) for network in ipfix.cluster_pod_cidrs],
                "tls": _tls_dict(ipfix.tls),
            },
            "metrics": {"bindAddress": _bind_text(self.metrics)},
            "state": {"directory": self.state.directory},
        }
        effective["ipfix"]["collectors"] = [
            {"address": str(c.address), "tls": _tls_dict(c.tls),
             "maxBufferedRecords": c.max_buffered_records} for c in ipfix.collectors]
        if ipfix.collectors:  # in place of flowCollectorAddr
            del effective["flowExporter"]["flowCollectorAddr"]
        if fe.protocols.ports:  # check-config's effective list (not a key of the file)
            effective["flowExporter"]["ports"] = {
                str(protocol): [list(pair) for pair in ranges]
                for protocol, ranges in fe.protocols.ports}
        return effective


def _tls_dict(tls: TlsSettings) -> dict[str, Any]:
    return {"caFile": tls.ca_file, "certFile": tls.cert_file, "keyFile": tls.key_file,
            "serverName": tls.server_name, "insecureSkipVerify": tls.insecure_skip_verify}


# --- value parsers: each takes the YAML value and returns the typed value or raises
# ValueError with a message about the value (the caller adds the key).

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                   "m": 60.0, "h": 3600.0}
# One way to match each part, so that a failing match costs time linear in its length.
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", re.ASCII)
MAX_DURATION = (2**63 - 1) / 1e9  # seconds: Go's longest time.Duration, about 292 years


def parse_duration(value: object) -> float:
    """A Go duration string (`500ms`, `5s`, `1m30s`) in seconds; must be positive."""
    if isinstance(value, bool) or not isinstance(value, str):
        hint = " (add a unit, e.g. '5s')" if isinstance(value, (int, float)) else ""
        raise ValueError(f"expected a duration such as '500ms', '5s' or '1m30s', got "
                         f"{quote_value(value)}{hint}")
    text = value.strip()
    pos, total = 0, 0.0
    while pos < len(text) and (match := _DURATION_PART.match(text, pos)):
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(f"invalid duration {quote_value(value)}: use Go-style durations such as "
                         "'500ms', '5s' or '1m30s'")
    if total <= 0:
        raise ValueError(f"duration {quote_value(value)} must be greater than zero")
    if not total <= MAX_DURATION:  # also inf, from a few hundred digits
        raise ValueError(f"duration {quote_value(value)} is longer than Go's longest, "
                         f"{format_duration(MAX_DURATION)}")
    return total


def _duration_or_zero(value: object) -> float:
    """A duration, or zero (`"0s"`, `"0"`: none)."""
    if isinstance(value, str) and _ZERO_DURATION.fullmatch(value.strip()):
        return 0.0
    return parse_duration(value)


_ZERO_DURATION = re.compile(r"0+(\.0*)?(ns|us|µs|μs|ms|s|m|h)?", re.ASCII)


def format_duration(seconds: float) -> str:
    """The Go-style spelling of a duration, as Go's time.Duration.String() would print it
    for the values people configure."""
    if seconds < 1:
        return f"{round(seconds * 1000, 6):g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{int(hours)}h" if hours else ""
    if hours or minutes:
        text += f"{int(minutes)}m"
    return text + f"{round(secs, 6):g}s"


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
        if not _is_host(host):
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


def _is_host(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        return _is_host_name(text) and not text.replace(".", "").isdigit()


def _is_host_name(text: str) -> bool:
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


def _bind_text(metrics: MetricsConfig) -> str:
    if not metrics.host:
        return ""
    return f"[{metrics.host}]:{metrics.port}" if ":" in metrics.host else \
        f"{metrics.host}:{metrics.port}"


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


# --- sections


class _Section:
    """Reads one mapping of the file, collecting problems instead of stopping at the first,
    and knows which keys it was asked for so the rest can be reported as unknown."""

    def __init__(self, data: object, path: str, problems: list[str]):
        self.path, self.problems = path, problems
        self.known: list[str] = []
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.append(f"{path}: expected a mapping of keys, got {quote_value(data)}")
            data = {}
        self.data: dict = data

    def take(self, key: str, parse: Callable[[object], Any], default: Any) -> Any:
        self.known.append(key)
        if key not in self.data:
            return default
        try:
            return parse(self.data[key])
        except ValueError as err:
            self.problems.append(f"{self.path}.{key}: {err}")
            return default

    def reject_unknown(self) -> None:
        for key in self.data:
            if key in self.known:
                continue
            plain = isinstance(key, str) and key.isprintable() and len(key) <= 100
            name = key if plain else quote_value(key)
            import difflib

            close = difflib.get_close_matches(name, self.known, n=1) if plain else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"{self.path}.{name}" if self.path else name
            self.problems.append(f"{where}: unknown key{hint}; known keys: "
                                 f"{', '.join(self.known)}")


def parse_config(data: object) -> Config:
    """Validate a loaded YAML document; raises ConfigError listing every problem."""
    problems: list[str] = []
    warnings: list[str] = []
    top = _Section(data, "", problems)
    top.known = ["flowExporter", "conntrack", "ovs", "ipfix", "metrics", "state"]

    fe = _Section(top.data.get("flowExporter"), "flowExporter", problems)
    d = FlowExporterConfig()
    protocols = _parse_protocols(fe, problems, warnings)
    flow_exporter = FlowExporterConfig(
        enable=fe.take("enable", parse_bool, d.enable),
        collector=fe.take("flowCollectorAddr", parse_collector_address, d.collector),
        poll_interval=fe.take("flowPollInterval", parse_duration, d.poll_interval),
        active_timeout=fe.take("activeFlowExportTimeout", parse_duration, d.active_timeout),
        idle_timeout=fe.take("idleFlowExportTimeout", parse_duration, d.idle_timeout),
        heartbeat_timeout=fe.take("heartbeatFlowExportTimeout", _duration_or_zero,
                                  d.heartbeat_timeout),
        protocols=protocols.protocols,
        protocol_groups=protocols.groups,
    )
    if 0 < flow_exporter.heartbeat_timeout < flow_exporter.active_timeout:
        problems.append(
            f"flowExporter.heartbeatFlowExportTimeout: "
            f"{quote_value(fe.data['heartbeatFlowExportTimeout'])} is shorter than "
            f"activeFlowExportTimeout ({format_duration(flow_exporter.active_timeout)}): a "
            "connection that did not move would get records more often than one that did; "
            "make it at least as long, or \"0s\" for none")

    ct = _Section(top.data.get("conntrack"), "conntrack", problems)
    d_ct = ConntrackConfig()
    conntrack = ConntrackConfig(
        source=ct.take("source", one_of(*CONNTRACK_SOURCES), d_ct.source),
        zones=ct.take("zones", parse_zones, d_ct.zones),
        max_connections=ct.take("maxConnections", integer_in(1, 100_000_000),
                                d_ct.max_connections),
    )

    warnings.extend(_never_matching_ports(flow_exporter, conntrack, fe))

    ov = _Section(top.data.get("ovs"), "ovs", problems)
    d_ovs = OvsConfig()
    ovs = OvsConfig(
        run_dir=ov.take("runDir", non_empty_string, d_ovs.run_dir),
        bridge=ov.take("bridge", lambda v: optional_string(v) or "", d_ovs.bridge),
        deny_table=ov.take("denyTable", integer_in(1, 254), d_ovs.deny_table),
        deny_meter_id=ov.take("denyMeterId", integer_in(1, 0xFFFF0000), d_ovs.deny_meter_id),
        deny_packet_in_rate=ov.take("denyPacketInRate", integer_in(1, 10_000_000),
                                    d_ovs.deny_packet_in_rate),
        max_deny_connections=ov.take("maxDenyConnections", integer_in(1, 100_000_000),
                                     d_ovs.max_deny_connections),
        deny_source=ov.take("denySource", one_of(*DENY_SOURCES), d_ovs.deny_source),
    )

    ix = _Section(top.data.get("ipfix"), "ipfix", problems)
    tl = _Section(ix.data.get("tls"), "ipfix.tls", problems)
    ix.known.append("tls")
    ix.known.append("collectors")
    sections = [top, fe, ct, ov, ix, tl]
    max_buffered = ix.take("maxBufferedRecords", integer_in(1, 100_000_000), 100_000)
    collectors: tuple[CollectorConfig, ...] = ()
    if ix.data.get("collectors") not in (None, []):  # []: flowCollectorAddr's one
        if "flowCollectorAddr" in fe.data:
            problems.append("ipfix.collectors: set, and so is flowExporter.flowCollectorAddr: "
                            "list every collector in one of them")
        tls = TlsSettings()
        collectors = _parse_collectors(ix.data["collectors"], tl, max_buffered, problems,
                                       warnings, sections)
    else:
        tls = _parse_tls(tl, flow_exporter.collector, "flowExporter.flowCollectorAddr",
                         warnings)
    ipfix = IpfixConfig(
        node_name=ix.take("nodeName", _node_name, default_node_name()),
        domain_id=ix.take("observationDomainId", integer_in(0, 0xFFFFFFFF), None),
        template_refresh=ix.take("templateRefreshTimeout", parse_duration, 600.0),
        path_mtu=ix.take("pathMTU", integer_in(576, 65535), 1500),
        max_buffered_records=max_buffered,
        tls=tls,
        cluster_pod_cidrs=ix.take("clusterPodCIDRs", parse_cidrs, ()),
        collectors=collectors,
    )

    mx = _Section(top.data.get("metrics"), "metrics", problems)
    metrics = mx.take("bindAddress", parse_bind_address, MetricsConfig())

    st = _Section(top.data.get("state"), "state", problems)
    state = StateConfig(st.take("directory", _state_directory, DEFAULT_STATE_DIRECTORY))

    for section in (*sections, mx, st):
        section.reject_unknown()
    if problems:
        raise ConfigError(problems)
    return Config(flow_exporter, conntrack, ovs, ipfix, metrics, state, tuple(warnings))


def _node_name(value: object) -> str:
    """A Kubernetes node name is at most 253 bytes; the records' size is planned so."""
    name = non_empty_string(value)
    if len(name.encode()) > 253:
        raise ValueError(f"{quote_value(name[:40])}... is {len(name.encode())} bytes; a node "
                         "name has at most 253")
    return name


def _state_directory(value: object) -> str:
    """An absolute path, or "" (or null) for no export state."""
    path = optional_string(value) or ""
    if path and not os.path.isabs(path):
        raise ValueError(f"expected an absolute directory path or \"\" (no export state), "
                         f"got {quote_value(value)}")
    return path


def _parse_collectors(value: object, default_tls: _Section, default_bound: int,
                      problems: list[str], warnings: list[str],
                      sections: list[_Section]) -> tuple[CollectorConfig, ...]:
    """`ipfix.collectors`: each entry "HOST:PORT:PROTO", or a mapping with `address`, and
    optionally `tls` (else `ipfix.tls`) and `maxBufferedRecords` (else `ipfix`'s)."""
    if not isinstance(value, list):
        problems.append(f"ipfix.collectors: expected a list of collectors "
                        f"(\"HOST:PORT:PROTO\" or {{address: ..., tls: ...}}), got "
                        f"{quote_value(value)}")
        value = []
    entries = []  # (where, address, bound, its own tls section or None)
    seen = set()
    for index, entry in enumerate(value):
        where = f"ipfix.collectors[{index}]"
        own_tls = None
        if isinstance(entry, dict):
            section = _Section(entry, where, problems)
            sections.append(section)
            address = section.take("address", parse_collector_address, None)
            bound = section.take("maxBufferedRecords", integer_in(1, 100_000_000),
                                 default_bound)
            section.known.append("tls")
            if entry.get("tls") is not None:
                own_tls = _Section(entry["tls"], f"{where}.tls", problems)
                sections.append(own_tls)
            if address is None and "address" not in entry:
                problems.append(f"{where}.address: missing (HOST:PORT:PROTO)")
        else:
            bound = default_bound
            try:
                address = parse_collector_address(entry)
            except ValueError as err:
                problems.append(f"{where}: {err}")
                address = None
        if address is None:
            continue
        if str(address) in seen:
            problems.append(f"{where}: {address} is listed twice")
            continue
        seen.add(str(address))
        entries.append((where, address, bound, own_tls))
    # ipfix.tls, read once, checked for the first collector that uses it (a tls one, if any)
    users = sorted(((where, address) for where, address, _, own in entries if own is None),
                   key=lambda user: user[1].transport != "tls")
    if users:
        shared = _parse_tls(default_tls, users[0][1], users[0][0], warnings)
    else:
        shared = _parse_tls(default_tls, CollectorAddress("", 0, "tls"), "", [])
        if any(default_tls.data.get(key) not in (None, "", False) for key in default_tls.known):
            warnings.append("ipfix.tls: ignored: every collector of ipfix.collectors has a tls "
                            "section of its own")
    return tuple(CollectorConfig(address, shared if own is None else
                                 _parse_tls(own, address, where, warnings), bound)
                 for where, address, bound, own in entries)


def _parse_tls(tl: _Section, collector: CollectorAddress, where: str,
               warnings: list[str]) -> TlsSettings:
    """A `tls` section for the collector at `where`. With a tls collector the files are
    opened and a TLS context is built, so that a file which loads is one the agent can
    connect with; with udp or tcp the section is ignored, with a warning when it sets
    something."""
    d = TlsSettings()
    problems_before = len(tl.problems)
    tls = TlsSettings(
        ca_file=tl.take("caFile", optional_string, d.ca_file),
        cert_file=tl.take("certFile", optional_string, d.cert_file),
        key_file=tl.take("keyFile", optional_string, d.key_file),
        server_name=tl.take("serverName", optional_string, d.server_name),
        insecure_skip_verify=tl.take("insecureSkipVerify", parse_bool, d.insecure_skip_verify),
    )
    if collector.transport != "tls":
        ignored = [key for key in tl.known if tl.data.get(key) not in (None, "", False)]
        if ignored:
            warnings.append(f"{tl.path}: {', '.join(ignored)} ignored: {where} {collector} is "
                            f"{collector.transport}, not tls")
        return tls
    if tls.key_file and not tls.cert_file:
        tl.problems.append(f"{tl.path}.keyFile: set, but certFile is not: a client key "
                           "needs its certificate")
    if tls.server_name and not _is_ip_or_host(tls.server_name):
        tl.problems.append(f"{tl.path}.serverName: {quote_value(tls.server_name)} is not a "
                           "host name or IP address")
    if tls.insecure_skip_verify:
        warnings.append(f"{tl.path}.insecureSkipVerify: true: the collector's certificate "
                        "is NOT verified")
    if len(tl.problems) == problems_before:
        try:
            client_tls_context(tls)
        except ConfigError as err:
            tl.problems.extend(problem.replace("ipfix.tls.", f"{tl.path}.", 1)
                               for problem in err.problems)
    return tls


def _is_ip_or_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return _is_host(text)


def client_tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """The client side of the TLS session with the collector. Validation builds one and
    throws it away, the agent builds the one it connects with: both by this function, so
    that a configuration that loads is one the agent can use. Raises ConfigError naming
    the key and the file."""
    files = [("caFile", tls.ca_file), ("certFile", tls.cert_file), ("keyFile", tls.key_file)]
    unreadable = []
    for key, path in files:
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            unreadable.append(f"ipfix.tls.{key}: cannot read {quote_value(path)}: "
                              f"{err.strerror}")
    if unreadable:
        raise ConfigError(unreadable)
    import ssl

    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
    except ssl.SSLError as err:
        raise ConfigError([f"ipfix.tls.caFile: {quote_value(tls.ca_file)} holds no PEM CA "
                           f"certificate ({err.reason or err})"]) from None
    if tls.cert_file:
        key_key = "keyFile" if tls.key_file else "certFile"

        def refuse_password() -> bytes:
            # Without a callback OpenSSL would prompt on the terminal: a hang, in a pod.
            raise ConfigError([f"ipfix.tls.{key_key}: the private key is encrypted; "
                               "ovsflow reads only unencrypted keys"])

        try:
            context.load_cert_chain(tls.cert_file, tls.key_file, password=refuse_password)
        except ssl.SSLError as err:
            why = ("the key does not belong to the certificate"
                   if err.reason == "KEY_VALUES_MISMATCH" else
                   "expected a PEM certificate and an unencrypted PEM private key")
            keys = "certFile, keyFile" if tls.key_file else "certFile"
            raise ConfigError([f"ipfix.tls.{keys}: cannot load "
                               f"{quote_value(tls.cert_file)} with "
                               f"{quote_value(tls.key_file or tls.cert_file)}: {why} "
                               f"({err.reason or err})"]) from None
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _parse_protocols(fe: _Section, problems: list[str], warnings: list[str]
                     ) -> ParsedProtocols:
    """`protocols`, or Antrea's name for it, `protocolFilter` (never both), with the groups
    of `protocolGroups` it may name."""
    fe.known += ["protocols", "protocolFilter", "protocolGroups"]
    present = [key for key in ("protocols", "protocolFilter") if key in fe.data]
    if len(present) == 2:
        problems.append("flowExporter: both 'protocols' and 'protocolFilter' are set; "
                        "'protocolFilter' is Antrea's name for 'protocols': keep one")
        return ParsedProtocols(ALL_PROTOCOLS, ())
    key = f"flowExporter.{present[0] if present else 'protocols'}"
    try:
        parsed = parse_protocol_list(fe.data.get(key.split(".")[1]), key,
                                     fe.data.get("protocolGroups"),
                                     "flowExporter.protocolGroups")
    except ProtocolListError as err:
        problems.extend(err.problems)
        return ParsedProtocols(ALL_PROTOCOLS, ())
    warnings.extend(parsed.warnings)
    return parsed


def _never_matching_ports(flow_exporter: FlowExporterConfig, conntrack: ConntrackConfig,
                          fe: _Section) -> list[str]:
    """Port entries the configured conntrack source can never match."""
    if conntrack.source != "ovs" or flow_exporter.protocols.port_ranges(132) is None:
        return []
    key = "protocolFilter" if "protocolFilter" in fe.data else "protocols"
    return [f"flowExporter.{key}: sctp ports match denied packets only: the OVS userspace "
            "datapath's conntrack (conntrack.source: ovs) tracks SCTP without ports"]


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when present
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last), a
    key that is a list or a map (`? [a, b]`), and a scalar that PyYAML's constructors cannot
    turn into a value (an integer of more than 4300 digits, a 13th month), each as a YAML
    error with its line."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, which may override
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a {type(key).__name__} as a key; keys are names",
                    key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {quote_value(key)} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_object(self, node, deep=False):  # type: ignore[override]
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as err:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {quote_value(node.value)}: {err}",
                node.start_mark) from None


def load_config(path: str) -> Config:
    """Read and validate the file. Whatever is in it, the only exception is ConfigError, with
    one line per problem: a reload relies on that to keep the running configuration."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except OSError as err:
        raise ConfigError([f"{path}: cannot read the configuration: {err.strerror}"]) from None
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: not UTF-8 text: {err.reason}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {_one_line(err)}"]) from None
    except RecursionError:  # the pure-Python parser, without libyaml's depth limit
        raise ConfigError([f"{path}: not valid YAML: nested too deeply"]) from None
    return parse_config(data)


def _one_line(err: yaml.YAMLError) -> str:
    """PyYAML's message spread over one line, each mark as `line L, column C`."""
    return " ".join(str(err).split())
