"""The configuration as the agent uses it: frozen, typed sections, and the effective
configuration (`Config.to_dict`) in the file's own key names."""

from __future__ import annotations

import ipaddress
import os
import socket
import zlib
from dataclasses import dataclass, field
from typing import Any

from ..protocols import ALL_PROTOCOLS, ProtocolSet
from .durations import format_duration


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


def _bind_text(metrics: MetricsConfig) -> str:
    if not metrics.host:
        return ""
    return f"[{metrics.host}]:{metrics.port}" if ":" in metrics.host else \
        f"{metrics.host}:{metrics.port}"
