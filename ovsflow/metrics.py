"""Prometheus metrics, read from the components' own counters at scrape time.

The components count in plain integers (cheap on the hot path, easy to assert on in tests);
this module only presents them.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .exporter import Exporter


class ExporterMetrics(Collector):
    def __init__(self, exporter: Exporter):
        self.exporter = exporter

    def collect(self):
        stats = self.exporter.stats
        counters = [
            ("ovsflow_records_submitted", "Flow records handed to the exporter",
             stats.records_submitted),
            ("ovsflow_records_exported", "Flow records written to the collector's socket",
             stats.records_exported),
            ("ovsflow_records_dropped", "Flow records dropped: export queue full, or unsent "
             "at shutdown", stats.records_dropped),
            ("ovsflow_ipfix_messages_sent", "IPFIX messages sent", stats.messages_sent),
            ("ovsflow_collector_connections", "Connections (UDP: sockets) made to the "
             "collector", stats.connections),
        ]
        for name, help_text, value in counters:
            yield CounterMetricFamily(name, help_text, value=value)
        yield GaugeMetricFamily("ovsflow_export_queue_records",
                                "Flow records waiting to be exported", value=self.exporter.queued)
