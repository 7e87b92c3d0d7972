"""Prometheus metrics and health endpoints, read from the components' own counters.

The components count in plain integers (cheap on the hot path, easy to assert on in tests);
this module only presents them, over a small HTTP server on the agent's event loop:
`/metrics`, `/healthz` (503 while a layer — poll, exporter, deny path, a supervised task —
has been unable to do its job for a few poll intervals; the body says which and why) and
`/readyz` (a poll has completed and something reached the collector: over UDP, a datagram
went out).
"""

from __future__ import annotations

import asyncio
import logging
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
            ("ovsflow_records_dropped", "Flow records dropped: export queue over "
             "ipfix.maxBufferedRecords while the collector was unreachable, or unsent at "
             "shutdown", stats.records_dropped),
            ("ovsflow_ipfix_messages_sent", "IPFIX messages sent", stats.messages_sent),
            ("ovsflow_collector_connections", "Connections (UDP: sockets) made to the "
             "collector", stats.connections),
        ]
        for name, help_text, value in counters:
            yield CounterMetricFamily(name, help_text, value=value)
        rejected = CounterMetricFamily("ovsflow_records_rejected", "Flow records not exported "
                                       "because a value did not fit its IPFIX field, by field",
                                       labels=["field"])
        for field, count in sorted(self.exporter.rejected.items()):
            rejected.add_metric([field], count)
        yield rejected
        yield GaugeMetricFamily("ovsflow_collector_reachable", "1 while the collector takes "
                                "records (or has not failed yet), 0 while it is unreachable",
                                value=int(self.exporter.reachable))
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
        yield CounterMetricFamily("ovsflow_connections_malformed", "Connections not tracked "
                                  "because a value was out of its range (a source gone wrong)",
                                  value=agent.store.malformed)
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
        yield CounterMetricFamily("ovsflow_reloads", "Configurations reloaded (SIGHUP or a "
                                  "changed file)", value=agent.reloads)
        restarts = CounterMetricFamily("ovsflow_task_restarts", "Restarts of a long-lived "
                                       "task after an unexpected exception", labels=["task"])
        for task, count in sorted(agent.supervisor.restarts.items()):
            restarts.add_metric([task], count)
        yield restarts
        problems = agent.problems()
        healthy = GaugeMetricFamily("ovsflow_healthy", "1 when the layer does its job, 0 when "
                                    "it has been unable to for a few poll intervals (/healthz "
                                    "says why)", labels=["layer"])
        layers = ["poll", "exporter"] + (["deny"] if agent.deny is not None else [])
        for layer in layers:
            healthy.add_metric([layer], int(layer not in problems))
        yield healthy
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
            if deny.meter_supported is not None:  # known once a switch answered
                yield GaugeMetricFamily("ovsflow_deny_meter_supported", "1 when the switch "
                                        "took the packet-in meter, 0 when the deny flows go "
                                        "without it (packet-ins not rate-limited)",
                                        value=int(deny.meter_supported))


def health(agent: Agent) -> tuple[int, str]:
    problems = agent.problems()
    if problems:
        return 503, "".join(f"{layer}: {why}\n" for layer, why in sorted(problems.items()))
    return 200, "ok\n"


def readiness(agent: Agent) -> tuple[int, str]:
    if not agent.polls:
        return 503, "no conntrack poll has completed yet\n"
    if not agent.exporter.delivered:
        return 503, "nothing has reached the collector yet\n"
    return 200, "ready\n"


async def serve(agent: Agent, host: str, port: int) -> asyncio.Server:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(AgentMetrics(agent))

    def _answer(path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            return 200, generate_latest(registry), "text/plain; version=0.0.4"
        if path in ("/healthz", "/readyz"):
            status, text = (health if path == "/healthz" else readiness)(agent)
            return status, text.encode(), "text/plain"
        return 404, b"not found\n", "text/plain"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            try:
                status, body, kind = _answer(path)
            except Exception as err:  # noqa: BLE001 - a bug in one answer; the server stays
                log.exception("metrics server: answering %s failed", path)
                status, body, kind = 500, f"{type(err).__name__}: {err}\n".encode(), "text/plain"
            reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error",
                      503: "Service Unavailable"}[status]
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
