"""A loaded YAML document to a `Config`: each section read key by key, every problem of the
file collected (naming the key and quoting the value), unknown keys refused."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..protocol_list import ParsedProtocols, ProtocolListError, parse_protocol_list, quote_value
from ..protocols import ALL_PROTOCOLS
from .durations import duration_or_zero, format_duration, parse_duration
from .model import (
    CONNTRACK_SOURCES, DEFAULT_STATE_DIRECTORY, DENY_SOURCES, CollectorAddress,
    CollectorConfig, Config, ConfigError, ConntrackConfig, FlowExporterConfig, IpfixConfig,
    MetricsConfig, OvsConfig, StateConfig, TlsSettings, default_node_name,
)
from .tls import is_ip_or_host, client_tls_context
from .values import (
    integer_in, non_empty_string, one_of, optional_string, parse_bind_address, parse_bool,
    parse_cidrs, parse_collector_address, parse_zones,
)


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
            import difflib  # only for a misspelt key: `ovsflow conntrack` pays per import

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
        heartbeat_timeout=fe.take("heartbeatFlowExportTimeout", duration_or_zero,
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
    if tls.server_name and not is_ip_or_host(tls.server_name):
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
