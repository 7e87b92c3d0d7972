"""Prometheus metrics and health endpoints, read from the components' own counters.

The components count in plain integers (cheap on the hot path, easy to assert on in tests);
this module only presents them, over a small HTTP server on the agent's event loop:
`/metrics`, `/healthz` (the loop answers and polls are not stuck) and `/readyz` (a poll has
completed and the exporter has reached its collector once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from .exporter import Exporter
from .protocols import protocol_name

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)

POLL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds, cumulative


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


class AgentMetrics(Collector):
    def __init__(self, agent: Agent):
        self.agent = agent

    def collect(self):
        agent = self.agent
        yield from ExporterMetrics(agent.exporter).collect()
        yield CounterMetricFamily("ovsflow_polls", "Conntrack polls completed",
                                  value=agent.polls)
        yield CounterMetricFamily("ovsflow_poll_errors", "Conntrack polls that failed",
                                  value=agent.poll_errors)
        yield GaugeMetricFamily("ovsflow_poll_seconds", "Duration of the last poll cycle "
                                "(dump, decode, filter, store update)",
                                value=agent.last_poll_seconds)
        yield GaugeMetricFamily("ovsflow_connections_tracked", "Connections in the store",
                                value=len(agent.store))
        yield CounterMetricFamily("ovsflow_connections_rejected", "New connections not tracked"
                                  " because the store was full", value=agent.store.rejected)
        filtered = CounterMetricFamily("ovsflow_conntrack_filtered_out", "Connections the "
                                       "kernel handed over that the userspace filter dropped "
                                       "(zone or protocol), by protocol", labels=["protocol"])
        for protocol, count in sorted(agent.filter.rejected.items()):
            filtered.add_metric([protocol_name(protocol)], count)
        yield filtered
        histogram = HistogramMetricFamily("ovsflow_poll_duration_seconds", "Poll cycles (dump, "
                                          "decode, filter, store update)")
        buckets = [(str(bound), count) for bound, count in zip(POLL_BUCKETS,
                                                                agent.poll_buckets)]
        histogram.add_metric([], buckets + [("+Inf", agent.polls)],
                             sum_value=agent.poll_seconds_sum)
        yield histogram
        yield CounterMetricFamily("ovsflow_reloads", "Configurations reloaded (SIGHUP)",
                                  value=agent.reloads)
        by_protocol = CounterMetricFamily("ovsflow_records_by_protocol", "Flow records made, "
                                          "by layer and protocol", labels=["layer", "protocol"])
        for (layer, protocol), count in sorted(agent.records_by_protocol.items()):
            by_protocol.add_metric([layer, protocol_name(protocol)], count)
        yield by_protocol
        source = agent.source
        if source is not None:
            yield CounterMetricFamily("ovsflow_dump_retries", "Conntrack dumps restarted after "
                                      "ENOBUFS", value=getattr(source, "dump_retries", 0))
            yield CounterMetricFamily("ovsflow_dpctl_lines_rejected", "dpctl/dump-conntrack "
                                      "lines not understood",
                                      value=getattr(source, "parse_errors", 0))
        yield GaugeMetricFamily("ovsflow_deny_connections_tracked",
                                "Denied connections in the deny store",
                                value=len(agent.deny_store))
        deny = agent.deny
        if deny is not None:
            packet_ins = CounterMetricFamily("ovsflow_packet_ins", "Packet-ins received on "
                                             "the deny path", labels=["outcome"])
            packet_ins.add_metric(["taken"], deny.packet_ins)
            packet_ins.add_metric(["not_ours"], deny.ignored)
            packet_ins.add_metric(["unwanted_protocol"], deny.unwanted)
            packet_ins.add_metric(["malformed"], deny.malformed)
            yield packet_ins
            yield CounterMetricFamily("ovsflow_packet_ins_dropped_by_meter", "Packet-ins the "
                                      "switch's meter dropped (its band statistics)",
                                      value=deny.meter_drops)
            yield CounterMetricFamily("ovsflow_openflow_connections",
                                      "OpenFlow sessions opened with the bridge",
                                      value=deny.connections)


def health(agent: Agent) -> tuple[int, str]:
    interval = agent.config.flow_exporter.poll_interval
    stuck = agent.last_poll_at and time.monotonic() - agent.last_poll_at > max(60, 5 * interval)
    return (503, "polls are stuck\n") if stuck else (200, "ok\n")


def readiness(agent: Agent) -> tuple[int, str]:
    if not agent.polls:
        return 503, "no conntrack poll has completed yet\n"
    if not agent.exporter.stats.connections:
        return 503, "the collector has not been reached yet\n"
    return 200, "ready\n"


async def serve(agent: Agent, host: str, port: int) -> asyncio.Server:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(AgentMetrics(agent))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, body, kind = 200, generate_latest(registry), "text/plain; version=0.0.4"
            elif path in ("/healthz", "/readyz"):
                status, text = (health if path == "/healthz" else readiness)(agent)
                body, kind = text.encode(), "text/plain"
            else:
                status, body, kind = 404, b"not found\n", "text/plain"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except (OSError, TimeoutError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("metrics and health on http://%s:%d/metrics, /healthz, /readyz", host, port)
    return server
