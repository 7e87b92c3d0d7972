"""The completeness ledger and UDP refusals, through the real exporter and real sockets: a
UDP collector that starts late gets the templates within seconds of starting, the records
that waited for it, and options records (RFC 7011 §4) saying exactly what it was sent and
what it was not — read by two decoders we did not write, tshark and the PyPI `ipfix`
package, from the bytes the collector received (tests/ipfix_sink.py keeps every datagram)."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import zlib
from datetime import datetime
from pathlib import Path

import ipfix.message
import pytest

from helpers import (
    StreamReceiver, free_port, tshark_capture, tshark_fields, use_antrea_information_model,
)
from ipfix_sink import DatagramSink
from ovsflow.exporter import Exporter
from ovsflow.exporter.link import PROBE_ANSWER, PROBE_INTERVAL
from ovsflow.ipfix.messages import HEADER, SET_HEADER, MessageDecoder, MessageStream
from ovsflow.ipfix.templates import (
    CONNTRACK_LEDGER_ID, DENY_LEDGER_ID, EXPORTING_LEDGER_ID, OPTIONS_TEMPLATES,
)
from ovsflow.record import CONNTRACK, FlowRecord
from ovsflow.transport import StreamTransport, UdpTransport

DOMAIN = 42


class CountingStore:
    """Stand-ins for the agent's store and deny path, of which the ledger reads only these
    counters (the agent's own are checked against its metrics in
    tests/test_udp_collector_restart.py)."""
    rejected, malformed = 5, 2


class CountingDenyPath:
    meter_drops = 77


def records(first: int, count: int) -> list[FlowRecord]:
    return [FlowRecord(CONNTRACK, socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"),
                       6, 1000 + i, 80, flow_id=i, packets=i) for i in range(first,
                                                                             first + count)]


def exporting(transport, first: list[FlowRecord]) -> Exporter:
    """An exporter started on `transport`, with `first` submitted (on a running loop)."""
    exporter = Exporter(transport, DOMAIN)
    exporter.start()
    exporter.submit(first)
    return exporter


def set_ids(datagram: bytes) -> list[int]:
    ids, pos = [], HEADER.size
    while pos < len(datagram):
        set_id, length = SET_HEADER.unpack_from(datagram, pos)
        ids.append(set_id)
        pos += length
    return ids


def decoded_by_ipfix_package(datagrams: list[bytes]) -> list[tuple[int, dict]]:
    """(index of the datagram, record) for every data record, options records included."""
    buffer, found = ipfix.message.MessageBuffer(), []
    for index, datagram in enumerate(datagrams):
        buffer.from_bytes(datagram)
        found += [(index, dict(record)) for record in buffer.namedict_iterator()]
    return found


@pytest.fixture(scope="module", autouse=True)
def ipfix_information_model():
    use_antrea_information_model()


def test_a_late_udp_collector_decodes_at_once_and_reads_what_it_missed_in_the_ledger(tmp_path):
    port = free_port(socket.SOCK_DGRAM)
    bad = records(100, 1)[0]
    bad.source_port = 70000  # does not fit its field: rejected

    async def scenario():
        exporter = Exporter(UdpTransport("127.0.0.1", port), DOMAIN, max_buffered=5)
        exporter.ledger.metering.watch(CountingStore(), CountingDenyPath())
        exporter.start()
        exporter.submit(records(0, 8) + [bad])
        await asyncio.sleep(1.0)  # refused: probes every PROBE_INTERVAL, nothing exported
        away = (exporter.reachable, exporter.queued, exporter.stats.records_exported,
                exporter.stats.messages_sent, exporter.stats.records_dropped)
        sink = await asyncio.to_thread(DatagramSink, tmp_path / "datagrams", port=port)
        started = time.time()
        deadline = time.monotonic() + 10
        while exporter.stats.records_exported < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        back = exporter.reachable
        await asyncio.sleep(0.2)
        assert await exporter.close(5)
        return exporter, sink, away, started, back

    with tshark_capture(f"udp port {port}", tmp_path) as pcap:
        exporter, sink, away, started, back = asyncio.run(scenario())
        time.sleep(0.3)
    sink.stop()
    assert away == (False, 5, 0, 0, 3)  # 8 taken, the bound (5) kept; 1 rejected
    assert back
    stats = exporter.stats
    assert (stats.records_exported, stats.records_dropped, stats.records_rejected) == (5, 3, 1)

    # What the collector received, in order: the templates (the probe), the ledger, the five
    # newest records, the last ledger (close).
    datagrams = sink.datagrams()
    assert [set_ids(d)[0] for d in datagrams] == [2, EXPORTING_LEDGER_ID, 256,
                                                  EXPORTING_LEDGER_ID]
    assert set_ids(datagrams[0]) == [2] + [3] * len(OPTIONS_TEMPLATES)  # a set each (pmacct)
    assert set_ids(datagrams[1]) == [EXPORTING_LEDGER_ID, CONNTRACK_LEDGER_ID, DENY_LEDGER_ID]

    # The PyPI ipfix package: flow records and options records
    decoded = decoded_by_ipfix_package(datagrams)
    flows = [r for _, r in decoded if "flowId" in r]
    assert [r["flowId"] for r in flows] == [3, 4, 5, 6, 7]  # the oldest were dropped
    exporting = [(index, r) for index, r in decoded if "exportingProcessId" in r]
    assert len(exporting) == 2
    for index, record in exporting:  # each counts exactly what went before it
        assert record["observationDomainId"] == DOMAIN
        assert record["exportingProcessId"] == zlib.crc32(f"127.0.0.1:{port}:udp".encode())
        assert record["exportedMessageTotalCount"] == index
        assert record["exportedOctetTotalCount"] == sum(map(len, datagrams[:index]))
        assert record["exportedFlowRecordTotalCount"] == 5 * (index > 2)
        assert record["notSentFlowTotalCount"] == 3 + 1  # dropped, rejected
        assert record["systemInitTimeMilliseconds"] <= record["observationTimeMilliseconds"]
    assert exporting[1][1]["exportedMessageTotalCount"] == stats.messages_sent - 1
    assert exporting[1][1]["exportedOctetTotalCount"] == stats.octets_sent - len(datagrams[3])
    metering = {r["meteringProcessId"]: r for _, r in decoded if "meteringProcessId" in r}
    assert metering[1]["ignoredDataRecordTotalCount"] == 5 + 2
    assert metering[2]["ignoredPacketTotalCount"] == 77
    assert isinstance(metering[2]["observationTimeMilliseconds"], datetime)

    # tshark: the same values from the captured bytes, each field by its own name
    fields = ["frame.time_epoch", "cflow.od_id", "cflow.flow_exporter", "cflow.packetsexp",
              "cflow.octetsexp", "cflow.flowsexp", "cflow.notsent_flows", "cflow.mp_id",
              "cflow.ignored_data_record_total_count", "cflow.ignore_packets",
              "cflow.srcport", "_ws.malformed"]
    shown = [p for p in tshark_fields(pcap, f"udp.port=={port},cflow", fields)
             if float(p["frame.time_epoch"][0]) >= started]  # what the collector received
    assert [p["_ws.malformed"] for p in shown] == [[]] * 4
    ledgers = [p for p in shown if p["cflow.flow_exporter"]]
    assert [(p["cflow.packetsexp"], p["cflow.octetsexp"], p["cflow.flowsexp"],
             p["cflow.notsent_flows"]) for p in ledgers] == [
        ([str(r["exportedMessageTotalCount"])], [str(r["exportedOctetTotalCount"])],
         [str(r["exportedFlowRecordTotalCount"])], [str(r["notSentFlowTotalCount"])])
        for _, r in exporting]
    assert ledgers[0]["cflow.flow_exporter"] == [str(exporting[0][1]["exportingProcessId"])]
    assert ledgers[0]["cflow.mp_id"] == ["1", "2"]
    assert ledgers[0]["cflow.ignored_data_record_total_count"] == ["7"]
    assert ledgers[0]["cflow.ignore_packets"] == ["77"]
    assert shown[2]["cflow.srcport"] == ["1003", "1004", "1005", "1006", "1007"]
    # decoded within a probe interval (and its answer) of the collector's start
    first_records = float(shown[2]["frame.time_epoch"][0]) - started
    assert first_records < PROBE_INTERVAL + PROBE_ANSWER + 1.0, first_records


async def sent_to_a_new_collector(exporter: Exporter, tmp_path, port: int) -> DatagramSink:
    """A collector starts on `port`; once the exporter has sent it everything, it closes."""
    sink = await asyncio.to_thread(DatagramSink, tmp_path / "second", port=port)
    deadline = time.monotonic() + 10
    while exporter.queued and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await exporter.close(5)
    sink.stop()
    return sink


def test_a_refusal_reported_while_idle_stops_the_data_until_the_templates_get_through(tmp_path):
    """From a remote collector the refusal comes a round trip after the send, when the
    exporter is idle: the socket's reader sees it, the collector counts as unreachable at
    once, and once it is back the templates go before any record."""
    sink = DatagramSink(tmp_path / "first")
    port = sink.port

    async def scenario():
        exporter = exporting(UdpTransport("127.0.0.1", port), records(0, 3))
        await asyncio.sleep(0.3)
        sink.stop()
        # a datagram whose refusal the exporter does not wait for (as from afar)
        exporter.transport._sock.send(b"not ipfix")
        await asyncio.sleep(0.1)
        noticed = (exporter.reachable, exporter.transport.send_errors)
        exporter.submit(records(3, 3))
        await asyncio.sleep(0.3)
        waiting = exporter.queued
        return noticed, waiting, await sent_to_a_new_collector(exporter, tmp_path, port)

    noticed, waiting, second = asyncio.run(scenario())
    assert noticed == (False, 1)
    assert waiting == 3
    datagrams = second.datagrams()
    assert set_ids(datagrams[0])[0] == 2  # the templates first, then the ledger, the records
    assert [r["flowId"] for r in second.records()] == [3, 4, 5]


def test_refused_records_go_again_numbered_on_without_a_gap(tmp_path):
    """The collector's port closes between two batches: the next batch's first message is
    refused, and the whole batch waits. The collector that comes back gets it once, and the
    sequence numbers run on without a gap across both collectors (RFC 7011 §3.1: they count
    the data records sent; refused messages' numbers are given back)."""
    first = DatagramSink(tmp_path / "first")
    port = first.port

    async def scenario():
        exporter = exporting(UdpTransport("127.0.0.1", port, path_mtu=576), records(0, 5))
        while exporter.stats.records_exported < 5:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(first.stop)
        exporter.submit(records(5, 20))  # several messages at this MTU
        while exporter.reachable:
            await asyncio.sleep(0.05)
        refused = (exporter.queued, exporter.stats.records_exported)
        return exporter, refused, await sent_to_a_new_collector(exporter, tmp_path, port)

    exporter, refused, second = asyncio.run(scenario())
    assert refused == (20, 5)
    assert [r["flowId"] for r in first.records()] == list(range(5))
    assert [r["flowId"] for r in second.records()] == list(range(5, 25))
    assert exporter.stats.records_exported == 25
    decoder = MessageDecoder()
    numbered = [(HEADER.unpack_from(d)[3], len(decoder.decode(d, "first").records))
                for d in first.datagrams()]
    decoder = MessageDecoder()
    numbered += [(HEADER.unpack_from(d)[3], len(decoder.decode(d, "second").records))
                 for d in second.datagrams()]
    for (sequence, count), (following, _) in zip(numbered, numbered[1:]):
        assert following == sequence + count, numbered


def test_ipfix_doc_lists_every_options_template_field_and_its_scope():
    text = (Path(__file__).resolve().parent.parent / "docs" / "ipfix.md").read_text()
    documented = {}
    for section in re.split(r"^### Options template ", text, flags=re.M)[1:]:
        template_id = int(section.split(":", 1)[0])
        rows = re.findall(r"^\| (\w+) \| (\d+) \| (\w+) \| (\d+) \| (.*) \|$", section, re.M)
        documented[template_id] = [(name, int(i), data_type, int(length),
                                    role.startswith("scope")) for name, i, data_type, length,
                                   role in rows]
    assert documented == {
        t.template_id: [(f.element.name, f.element.element_id, f.element.data_type, f.length,
                         index < t.scope_count) for index, f in enumerate(t.fields)]
        for t in OPTIONS_TEMPLATES}


def test_a_tcp_collector_gets_the_ledger_after_the_templates_and_last_before_the_withdrawal():
    receiver = StreamReceiver()
    port = receiver.port

    async def scenario():
        exporter = exporting(StreamTransport("127.0.0.1", port), records(0, 50))
        await asyncio.sleep(0.3)
        assert await exporter.close(5)
        return exporter

    exporter = asyncio.run(scenario())
    messages = MessageStream().feed(receiver.stream())
    assert [set_ids(m)[0] for m in messages] == [2, EXPORTING_LEDGER_ID, 256,
                                                 EXPORTING_LEDGER_ID, 2]  # 2: withdrawal
    decoded = decoded_by_ipfix_package(messages[:-1])  # (it cannot read a withdrawal)
    ledgers = [(index, r) for index, r in decoded if "exportingProcessId" in r]
    assert [(index, r["exportedMessageTotalCount"], r["exportedFlowRecordTotalCount"])
            for index, r in ledgers] == [(1, 1, 0), (3, 3, 50)]
    assert ledgers[1][1]["exportedOctetTotalCount"] == sum(map(len, messages[:3]))
    assert ledgers[1][1]["exportingProcessId"] == zlib.crc32(f"127.0.0.1:{port}:tcp".encode())
    assert exporter.stats.messages_sent == len(messages)
