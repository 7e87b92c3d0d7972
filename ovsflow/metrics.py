"""Prometheus metrics and the probes' HTTP endpoints, read from the components' own counters.

The components count in plain integers (cheap on the hot path, easy to assert on in tests);
this module only presents them, over a small HTTP server on the agent's event loop:
`/metrics`, and the probes `health.py` answers: `/livez`, `/readyz`, `/healthz`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from prometheus_client import (
    CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from .exporter import Exporter
from .health import POLL_BUCKETS, PROBES, Health
from .host import boot_time
from .ipfix import codec
from .protocols import protocol_name
from .state_file import ExportState

log = logging.getLogger(__name__)


class ExporterMetrics(Collector):
    """Each collector's exporter, labelled `collector` (HOST:PORT:PROTO)."""

    def __init__(self, exporters: Mapping[str, Exporter]):
        self.exporters = exporters

    def collect(self):
        exporters = list(self.exporters.items())
        counters = [
            ("ovsflow_records_submitted", "Flow records handed to the exporter",
             "records_submitted"),
            ("ovsflow_records_exported", "Flow records handed whole to the kernel for the "
             "collector (TCP/TLS), or sent (UDP)", "records_exported"),
            ("ovsflow_records_dropped", "Flow records dropped: records of ended "
             "connections over the queue's bound (maxBufferedRecords) while the collector "
             "was unreachable, or unsent at shutdown without an export state",
             "records_dropped"),
            ("ovsflow_ipfix_messages_sent", "IPFIX messages sent", "messages_sent"),
            ("ovsflow_collector_connections", "Connections (UDP: sockets) made to the "
             "collector", "connections"),
        ]
        for name, help_text, stat in counters:
            family = CounterMetricFamily(name, help_text, labels=["collector"])
            for collector, exporter in exporters:
                family.add_metric([collector], getattr(exporter.stats, stat))
            yield family
        rejected = CounterMetricFamily("ovsflow_records_rejected", "Flow records not exported "
                                       "because a value did not fit its IPFIX field, by field",
                                       labels=["collector", "field"])
        for collector, exporter in exporters:
            for field, count in sorted(exporter.rejected.items()):
                rejected.add_metric([collector, field], count)
        yield rejected
        for name, help_text, value in [
                ("ovsflow_collector_reachable", "1 while the collector takes records (or has "
                 "not failed yet), 0 while it is unreachable", lambda e: int(e.reachable)),
                ("ovsflow_export_queue_records", "Flow records waiting to be exported",
                 lambda e: e.queued),
                ("ovsflow_export_queue_limit_records", "The export queue's bound "
                 "(ipfix.maxBufferedRecords): past it, while the collector is unreachable, "
                 "the oldest records are dropped", lambda e: e.max_buffered)]:
            gauge = GaugeMetricFamily(name, help_text, labels=["collector"])
            for collector, exporter in exporters:
                gauge.add_metric([collector], value(exporter))
            yield gauge
        yield from ledger_metrics(exporters)


def ledger_metrics(exporters):
    """What each collector's ledger says and Prometheus had no name for yet (issue 28: the
    ledger and UDP refusals; one block, kept apart)."""
    octets = CounterMetricFamily("ovsflow_ipfix_octets_sent", "Octets of the IPFIX messages "
                                 "sent (in the kernel whole; UDP: not refused), the ledger's "
                                 "exportedOctetTotalCount", labels=["collector"])
    refusals = CounterMetricFamily("ovsflow_collector_refusals", "UDP datagrams the kernel "
                                   "refused (ICMP port or host unreachable: the collector "
                                   "is not there), and refusals it reported while idle",
                                   labels=["collector"])
    for collector, exporter in exporters:
        octets.add_metric([collector], exporter.stats.octets_sent)
        if not exporter.transport.reliable:
            refusals.add_metric([collector], exporter.transport.send_errors)
    yield octets
    yield refusals


def export_state_metrics(state: ExportState):
    restores = CounterMetricFamily("ovsflow_export_state_restores", "Export state read at "
                                   "start, by outcome: restored (per store section), none (no "
                                   "file), discarded (by reason: corrupt, version, unreadable, "
                                   "boot, netns, node, domain, source)",
                                   labels=["outcome", "reason"])
    for (outcome, reason), count in sorted(state.restores.items()):
        restores.add_metric([outcome, reason], count)
    yield restores
    yield CounterMetricFamily("ovsflow_export_state_saves", "Export state files written",
                              value=state.saves)
    yield CounterMetricFamily("ovsflow_export_state_save_errors", "Export state files that "
                              "could not be written", value=state.save_errors)
    yield GaugeMetricFamily("ovsflow_export_state_save_seconds", "Duration of the last "
                            "export state write", value=state.last_save_seconds)
    yield GaugeMetricFamily("ovsflow_export_state_last_save_timestamp_seconds", "When the "
                            "export state was last written (Unix time; 0: not yet by this "
                            "agent)", value=state.last_saved_at)
    yield CounterMetricFamily("ovsflow_export_state_stale_restores", "Export state continued "
                              "from a periodic save, not one written at shutdown (the agent "
                              "before was killed, or could not write at its end): what it "
                              "delivered after that save is counted again",
                              value=state.stale_restores)
    if state.restored_age is not None:
        yield GaugeMetricFamily("ovsflow_export_state_restored_age_seconds", "Age of the "
                                "export state file this agent continued from, when it read "
                                "it", value=state.restored_age)


def delivery_metrics(exporters: Mapping[str, Exporter], discarded: Mapping[str, int]):
    """Per collector, what happened to records on their way besides export and drop
    (issue 29): folded into a newer record of their connection while waiting; the previous
    agent's, carried over in the export state and queued again; those of a collector no
    longer configured, left out."""
    folded = CounterMetricFamily("ovsflow_records_folded", "Waiting flow records taken into "
                                 "a newer record of the same connection (its deltas carry "
                                 "theirs)", labels=["collector"])
    carried = CounterMetricFamily("ovsflow_records_carried_over", "Flow records the previous "
                                  "agent could not deliver, queued again from the export "
                                  "state", labels=["collector"])
    for collector, exporter in exporters.items():
        folded.add_metric([collector], exporter.stats.records_folded)
        carried.add_metric([collector], exporter.stats.records_restored)
    yield folded
    yield carried
    lost = CounterMetricFamily("ovsflow_records_carried_over_discarded", "Flow records the "
                               "previous agent could not deliver to a collector no longer "
                               "configured (none took its place): lost",
                               labels=["collector"])
    for collector, count in sorted(discarded.items()):
        lost.add_metric([collector], count)
    yield lost


# What a start without the export state of an earlier run means depends on that run: none on
# a node's first start, nothing to continue after a reboot or an ovs-vswitchd restart (the
# file says so: another boot, source...), records counted again after a restart in the same
# boot. The agent says what it found; the alert tells the runs apart with the process start
# time and the boot time (OvsflowExportStateNotRestored).
MISSING = {("none", ""), ("discarded", "corrupt"), ("discarded", "version"),
           ("discarded", "unreadable")}


def export_state_start_metrics(state: ExportState, booted: float):
    restored = any(outcome == "restored" for outcome, _ in state.restores)
    yield GaugeMetricFamily("ovsflow_export_state_missing", "1 when this process started "
                            "without a usable export state of an earlier run: no file, or "
                            "one corrupt, unreadable or of another version; 0 when it "
                            "continued one, or the file found was of another boot, network "
                            "namespace, node, observation domain or conntrack source",
                            value=int(not restored and bool(MISSING & set(state.restores))))
    yield GaugeMetricFamily("ovsflow_boot_time_seconds", "When the host booted (Unix time): "
                            "tells a reboot from a restart of the agent", value=booted)


class AgentMetrics(Collector):
    """The running agent's parts (its store, filter, exporters, deny path...) and its
    `Health`, read at each scrape. The agent hands itself over: this module does not import
    it."""

    def __init__(self, agent):
        self.agent = agent
        self.booted = boot_time()  # one value per process: the kernel's can move by 1 s

    def collect(self):
        agent = self.agent
        health = agent.health
        yield from ExporterMetrics(agent.exporters.by_collector).collect()
        yield CounterMetricFamily("ovsflow_polls", "Conntrack polls completed",
                                  value=health.polls)
        yield CounterMetricFamily("ovsflow_poll_errors", "Conntrack polls that failed",
                                  value=health.poll_errors)
        yield GaugeMetricFamily("ovsflow_poll_seconds", "Duration of the last poll cycle "
                                "(dump, decode, filter, store update)",
                                value=health.last_poll_seconds)
        yield GaugeMetricFamily("ovsflow_poll_interval_seconds", "The configured poll "
                                "interval (flowExporter.flowPollInterval), for comparing "
                                "poll durations with it", value=health.poll_interval)
        yield GaugeMetricFamily("ovsflow_connections_tracked", "Connections in the store",
                                value=len(agent.store))
        yield GaugeMetricFamily("ovsflow_connections_limit", "Connections the store tracks at "
                                "most (conntrack.maxConnections)",
                                value=agent.store.table.capacity)
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
        buckets = [(str(bound), count)
                   for bound, count in zip(POLL_BUCKETS, health.poll_buckets)]
        histogram.add_metric([], buckets + [("+Inf", health.polls)],
                             sum_value=health.poll_seconds_sum)
        yield histogram
        yield CounterMetricFamily("ovsflow_reloads", "Configurations reloaded (SIGHUP or a "
                                  "changed file)", value=agent.reloads)
        if agent.state_keeper is not None:
            yield from export_state_metrics(agent.state_keeper.export_state)
            yield from export_state_start_metrics(agent.state_keeper.export_state,
                                                  self.booted)
        yield from delivery_metrics(agent.exporters.by_collector, agent.state_keeper.discarded
                                    if agent.state_keeper is not None else {})
        if agent.pods is not None:
            yield CounterMetricFamily("ovsflow_ovsdb_values_cut", "OVSDB Port external_ids "
                                      "values left out for being over their bound (pod-name "
                                      "253, pod-namespace 63, ip-address 255 bytes), once per "
                                      "Port and key", value=agent.pods.values_cut)
        yield CounterMetricFamily("ovsflow_ipfix_strings_cut", "Strings cut to their IPFIX "
                                  "field's 65535 bytes, each distinct string once",
                                  value=codec.strings_cut)
        restarts = CounterMetricFamily("ovsflow_task_restarts", "Restarts of a long-lived "
                                       "task after an unexpected exception", labels=["task"])
        for task, count in sorted(agent.supervisor.restarts.items()):
            restarts.add_metric([task], count)
        yield restarts
        problems = health.problems()
        healthy = GaugeMetricFamily("ovsflow_healthy", "1 when the layer does its job, 0 when "
                                    "it has been unable to for a few poll intervals (/healthz "
                                    "says why)", labels=["layer"])
        layers = ["poll", "exporter"] + (["deny"] if agent.deny is not None else []) + (
            ["state"] if agent.state_keeper is not None else [])
        unhealthy = {problem.split(" ", 1)[0] for problem in problems}
        for layer in layers:
            healthy.add_metric([layer], int(layer not in unhealthy))
        yield healthy
        by_protocol = CounterMetricFamily("ovsflow_records_by_protocol", "Flow records made, "
                                          "by layer and protocol", labels=["layer", "protocol"])
        for (layer, protocol), count in sorted(health.records_by_protocol.items()):
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
        yield GaugeMetricFamily("ovsflow_deny_connections_limit", "Denied connections the "
                                "deny store aggregates at most (ovs.maxDenyConnections)",
                                value=agent.deny_store.max_entries)
        yield CounterMetricFamily("ovsflow_deny_connections_rejected", "Denied packets of new "
                                  "connections not aggregated because the deny store was "
                                  "full", value=agent.deny_store.rejected)
        deny = agent.deny
        if deny is not None:
            packet_ins = CounterMetricFamily("ovsflow_packet_ins", "Packet-ins received on "
                                             "the deny path", labels=["outcome"])
            packet_ins.add_metric(["taken"], deny.packet_ins)
            packet_ins.add_metric(["not_ours"], deny.ignored)
            packet_ins.add_metric(["unwanted_protocol"], deny.unwanted)
            packet_ins.add_metric(["malformed"], deny.malformed)
            packet_ins.add_metric(["allowed"], deny.allowed)
            yield packet_ins
            filtered = CounterMetricFamily("ovsflow_deny_filtered_out", "Denied packets of "
                                           "protocols not exported, dropped by the userspace "
                                           "filter after their packet-in, by protocol",
                                           labels=["protocol"])
            for protocol, count in sorted(deny.unwanted_by_protocol.items()):
                filtered.add_metric([protocol_name(protocol)], count)
            yield filtered
            # denySource table: flows and meter put back; antrea: the id ovsflow shares
            restorations = getattr(deny, "restorations", None)
            if restorations is not None:
                yield CounterMetricFamily("ovsflow_deny_flows_restored", "Times the deny "
                                          "flows or meter, deleted or changed by someone "
                                          "else, were put back", value=restorations)
            directionless = getattr(deny, "directionless", None)
            if directionless is not None:
                yield CounterMetricFamily("ovsflow_deny_direction_unknown", "Denied packets "
                                          "whose table tells no direction: their records "
                                          "name the rule in neither element",
                                          value=directionless)
            controller_id = getattr(deny, "controller_id", None)
            if controller_id is not None:
                yield GaugeMetricFamily("ovsflow_antrea_controller_id", "Antrea's controller "
                                        "id, learned from its flows and shared by ovsflow's "
                                        "connection", value=controller_id)
            yield CounterMetricFamily("ovsflow_packet_ins_dropped_by_meter", "Packet-ins the "
                                      "switch's meter dropped (its band statistics)",
                                      value=deny.meter_drops)
            yield CounterMetricFamily("ovsflow_denied_packets", "Packets the datapath "
                                      "denied, as the denying flows counted them (the deny "
                                      "totals, template 270)", value=deny.totals.packets)
            yield CounterMetricFamily("ovsflow_denied_bytes", "Bytes (whole frames) the "
                                      "datapath denied, as the denying flows counted them",
                                      value=deny.totals.octets)
            yield GaugeMetricFamily("ovsflow_deny_totals_counted", "Deny rules, default "
                                    "drops or protocol flows whose denials are counted (one "
                                    "deny totals record each)", value=len(deny.totals))
            yield CounterMetricFamily("ovsflow_openflow_connections",
                                      "OpenFlow sessions opened with the bridge",
                                      value=deny.connections)
            if deny.meter_supported is not None:  # known once a switch answered
                yield GaugeMetricFamily("ovsflow_deny_meter_supported", "1 when the switch "
                                        "took the packet-in meter, 0 when the deny flows go "
                                        "without it (packet-ins not rate-limited)",
                                        value=int(deny.meter_supported))


async def serve(metrics: Collector, health: Health, host: str, port: int) -> asyncio.Server:
    """`/metrics` from `metrics`, the probes from `health`."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(metrics)
    ProcessCollector(registry=registry)  # process_*: memory, CPU, start time, descriptors
    PlatformCollector(registry=registry)  # python_info

    def _answer(path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            return 200, generate_latest(registry), "text/plain; version=0.0.4"
        probe = PROBES.get(path)
        if probe is not None:
            status, text = probe(health)
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
    log.info("metrics and probes on http://%s:%d/metrics, /livez, /readyz, /healthz", host,
             port)
    return server
