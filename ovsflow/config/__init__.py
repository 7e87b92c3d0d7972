"""The configuration file: YAML in, one immutable typed `Config` out.

The `flowExporter` section is Antrea's (antrea-agent.conf), so an operator can paste it.
Every problem names the key and quotes the value; all problems of a file are reported at
once, and unknown keys are errors, because a typo that silently does nothing is the worst
kind of configuration bug.

The rooms: `model` (the typed sections), `durations` and `values` (one YAML value each),
`tls` (the collector's TLS context), `parse` (a document's sections), `load` (the file).
"""

from .durations import MAX_DURATION, format_duration, parse_duration
from .load import load_config
from .model import (
    CONNTRACK_SOURCES, DEFAULT_IPFIX_PORT, DEFAULT_STATE_DIRECTORY, DENY_SOURCES, TRANSPORTS,
    CollectorAddress, CollectorConfig, Config, ConfigError, ConntrackConfig,
    FlowExporterConfig, IpfixConfig, MetricsConfig, OvsConfig, StateConfig, TlsSettings,
    default_node_name,
)
from .parse import parse_config
from .tls import client_tls_context
from .values import parse_collector_address

__all__ = [
    "CONNTRACK_SOURCES", "DEFAULT_IPFIX_PORT", "DEFAULT_STATE_DIRECTORY", "DENY_SOURCES",
    "MAX_DURATION", "TRANSPORTS", "CollectorAddress", "CollectorConfig", "Config",
    "ConfigError", "ConntrackConfig", "FlowExporterConfig", "IpfixConfig", "MetricsConfig",
    "OvsConfig", "StateConfig", "TlsSettings", "client_tls_context", "default_node_name",
    "format_duration", "load_config", "parse_collector_address", "parse_config",
    "parse_duration",
]
