"""The exporting process over real sockets, against `ovsflow collect` in its own process:
collectors that are late, restart, or never come; TLS; the queue bound; template refresh."""

import asyncio
import json
import logging
import shutil
import socket
import ssl
import struct
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from helpers import Collector, StreamReceiver, free_port
from ovsflow.config import TlsSettings, client_tls_context
from ovsflow.exporter import Exporter, RecordEncoder, encode_records
from ovsflow.exporter.queue import ExportQueue
from ovsflow.ipfix.messages import HEADER, MessageDecoder, MessageEncoder, MessageStream
from ovsflow.ipfix.templates import ALL_TEMPLATES, RECORD_TEMPLATES
from ovsflow.record import BATCH, CONNTRACK, CONNTRACK_UNCOUNTED, DENY, FlowRecord
from ovsflow.transport import StreamTransport, UdpTransport


def records(first: int, count: int) -> list[FlowRecord]:
    return [FlowRecord(CONNTRACK, socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"),
                       17, 1000, 53, flow_id=i, packets=i) for i in range(first, first + count)]


def flow_ids(received) -> list[int]:
    return [r["flowId"] for r in received]


def flow_records_of(decoder: MessageDecoder, message: bytes) -> list[dict]:
    """The message's flow records: its options records (the ledger) left out."""
    decoded = decoder.decode(message)
    return [r for template_id, r in decoded.records if template_id not in decoded.options_sets]


async def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


def test_tcp_collector_down_at_start_then_up_receives_everything():
    port = free_port()

    async def scenario():
        exporter = Exporter(StreamTransport("127.0.0.1", port), 1, max_backoff=0.5)
        exporter.start()
        exporter.submit(records(0, 500))
        await asyncio.sleep(1.0)  # a few failed connection attempts
        assert exporter.stats.records_exported == 0 and exporter.queued == 500
        collector = await asyncio.to_thread(Collector, f"tcp://127.0.0.1:{port}", count=500)
        received = await asyncio.to_thread(collector.records)
        await exporter.close(5)
        return exporter, received

    exporter, received = asyncio.run(scenario())
    assert flow_ids(received) == list(range(500))
    assert exporter.stats.records_dropped == 0 and exporter.stats.connections == 1


def test_collector_restart_is_noticed_and_nothing_is_lost():
    port = free_port()

    async def scenario():
        first = await asyncio.to_thread(Collector, f"tcp://127.0.0.1:{port}", count=100)
        exporter = Exporter(StreamTransport("127.0.0.1", port), 1, max_backoff=0.5)
        exporter.start()
        exporter.submit(records(0, 100))
        before = await asyncio.to_thread(first.records)  # exits after 100: connection closed
        closed_at = time.monotonic()
        await wait_until(lambda: not exporter.transport.connected, timeout=2)
        detection = time.monotonic() - closed_at
        exporter.submit(records(100, 200))  # made while the collector is away
        await asyncio.sleep(0.3)
        second = await asyncio.to_thread(Collector, f"tcp://127.0.0.1:{port}", count=200)
        after = await asyncio.to_thread(second.records)
        await exporter.close(5)
        return exporter, before, after, detection

    exporter, before, after, detection = asyncio.run(scenario())
    assert flow_ids(before) == list(range(100))
    # The second collector knows no template: decoding proves the templates were re-sent.
    assert flow_ids(after) == list(range(100, 300))
    assert after[0]["_templateId"] == 256
    assert detection < 1.0
    assert exporter.stats.connections == 2 and exporter.stats.records_dropped == 0


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("collector.test", "127.0.0.1")
    paths = {"ca": directory / "ca.pem", "cert": directory / "cert.pem",
             "key": directory / "key.pem"}
    client = ca.issue_cert("exporter.test")
    paths["client_cert"], paths["client_key"] = directory / "client.pem", directory / "ck.pem"
    client.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client.private_key_pem.write_to_path(paths["client_key"])
    ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["cert"])
    server.private_key_pem.write_to_path(paths["key"])
    return {name: str(path) for name, path in paths.items()}


def tls_collector(tls_files, count, timeout=30):
    return Collector("tls://127.0.0.1:0", count=count, timeout=timeout,
                     extra=("--cert", tls_files["cert"], "--key", tls_files["key"]))


def test_tls_export_verifies_the_collector(tls_files):
    collector = tls_collector(tls_files, count=50)
    context = client_tls_context(TlsSettings(ca_file=tls_files["ca"]))

    async def scenario():
        exporter = Exporter(StreamTransport("127.0.0.1", collector.port, context,
                                            "collector.test"), 1)
        exporter.start()
        exporter.submit(records(0, 50))
        received = await asyncio.to_thread(collector.records)
        assert await exporter.close(5)
        return received

    try:
        assert flow_ids(asyncio.run(scenario())) == list(range(50))
    finally:
        collector.stop()


def test_tls_refuses_an_unverified_collector_and_counts_the_loss(tls_files, caplog):
    collector = tls_collector(tls_files, count=1, timeout=10)
    context = client_tls_context(TlsSettings())  # the system CAs do not know our test CA

    async def scenario():
        exporter = Exporter(StreamTransport("127.0.0.1", collector.port, context,
                                            "collector.test"), 1, max_backoff=0.2)
        exporter.start()
        exporter.submit(records(0, 5))
        await asyncio.sleep(1)
        delivered = await exporter.close(0.5)
        return exporter, delivered

    try:
        with caplog.at_level(logging.WARNING):
            exporter, delivered = asyncio.run(scenario())
    finally:
        collector.stop()
    assert not delivered and exporter.stats.records_dropped == 5
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    assert "5 records unsent" in caplog.text


def test_tls_insecure_option_connects(tls_files):
    collector = tls_collector(tls_files, count=3)
    context = client_tls_context(TlsSettings(insecure_skip_verify=True))

    async def scenario():
        exporter = Exporter(StreamTransport("127.0.0.1", collector.port, context), 1)
        exporter.start()
        exporter.submit(records(0, 3))
        received = await asyncio.to_thread(collector.records)
        await exporter.close(5)
        return received

    try:
        assert flow_ids(asyncio.run(scenario())) == [0, 1, 2]
    finally:
        collector.stop()


def test_full_queue_drops_the_oldest_only_while_the_collector_is_away(caplog):
    port = free_port()

    async def scenario():
        exporter = Exporter(StreamTransport("127.0.0.1", port), 1, max_buffered=10,
                            max_backoff=0.2)
        exporter.start()
        exporter.submit(records(0, 15))
        await exporter.wait_for_room()  # the first connection attempt fails: drop to fit
        exporter.submit(records(15, 10))  # still unreachable: dropped at once
        assert exporter.queued == 10
        collector = await asyncio.to_thread(Collector, f"tcp://127.0.0.1:{port}", count=10)
        received = await asyncio.to_thread(collector.records)
        await exporter.close(5)
        return exporter, received

    with caplog.at_level(logging.WARNING):
        exporter, received = asyncio.run(scenario())
    assert flow_ids(received) == list(range(15, 25))
    assert exporter.stats.records_dropped == 15
    assert "dropped the 5 oldest records (5 dropped so far)" in caplog.text
    assert "dropped the 10 oldest records (15 dropped so far)" in caplog.text


def test_a_batch_larger_than_the_bound_loses_nothing_with_a_reachable_collector():
    """A poll whose due records outnumber ipfix.maxBufferedRecords: the agent waits
    (`wait_for_room`) instead of the queue dropping the oldest."""
    collector = Collector("tcp://127.0.0.1:0", count=3000, timeout=60)

    async def scenario():
        exporter = Exporter(StreamTransport("127.0.0.1", collector.port), 1, max_buffered=100)
        exporter.start()
        for first in (0, 1000, 2000):  # three polls of 1000 records each
            exporter.submit(records(first, 1000))
            await exporter.wait_for_room()
            assert exporter.queued <= 100
        received = await asyncio.to_thread(collector.records)
        assert await exporter.close(5)
        return exporter, received

    try:
        exporter, received = asyncio.run(scenario())
    finally:
        collector.stop()
    assert flow_ids(received) == list(range(3000))
    assert exporter.stats.records_dropped == 0


def test_a_collector_that_stops_reading_counts_as_unreachable():
    """Connected, but it takes nothing (its receive window is full): after stall_timeout
    the agent is no longer held back and the excess is dropped, counted."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    async def scenario():
        exporter = Exporter(StreamTransport("127.0.0.1", server.getsockname()[1]), 1,
                            max_buffered=1000, stall_timeout=0.5)
        exporter.start()
        started = time.monotonic()
        exporter.submit(records(0, 200_000))
        await exporter.wait_for_room()
        waited = time.monotonic() - started
        queued, reachable = exporter.queued, exporter.reachable
        closing = time.monotonic()
        delivered = await exporter.close(0.2)  # nor does a peer that reads nothing hold it
        return exporter, waited, queued, reachable, delivered, time.monotonic() - closing

    try:
        exporter, waited, queued, reachable, delivered, closing = asyncio.run(scenario())
    finally:
        server.close()
    assert 0.5 <= waited < 10
    # the bound, and what is left of the batch the stalled session was sending: half sent,
    # it cannot be dropped from the front without sending a record twice or losing its place
    assert not reachable and 1000 <= queued < 1000 + BATCH
    stats = exporter.stats
    assert stats.records_dropped >= 100_000
    assert stats.records_exported + stats.records_dropped == stats.records_submitted
    assert not delivered and closing < 6


def test_udp_records_the_kernel_refuses_stay_queued_and_are_never_counted_as_exported():
    """No collector on the port: the kernel refuses every datagram (ICMP port unreachable).
    Nothing counts as exported, the records wait, the collector shows as unreachable, and
    a close that cannot deliver them counts them as dropped, within its timeout."""
    port = free_port(socket.SOCK_DGRAM)

    async def scenario():
        exporter = Exporter(UdpTransport("127.0.0.1", port), 1)
        exporter.start()
        for batch in range(5):
            exporter.submit(records(batch * 10, 10))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        seen = (exporter.reachable, exporter.queued, exporter.stats.records_exported,
                exporter.problem(0.2))
        started = time.monotonic()
        closed = await exporter.close(1)
        return exporter, seen, closed, time.monotonic() - started

    exporter, (reachable, queued, exported, problem), closed, closing = asyncio.run(scenario())
    assert (reachable, queued, exported) == (False, 50, 0)
    assert "Connection refused" in problem
    assert not closed and closing < 4
    assert exporter.stats.records_exported == 0 and exporter.stats.records_dropped == 50
    assert exporter.stats.messages_sent == 0  # not even the templates went out


def test_udp_templates_are_sent_first_and_refreshed():
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(0.5)

    async def scenario():
        exporter = Exporter(UdpTransport("127.0.0.1", sink.getsockname()[1]), 1,
                            template_refresh=0.3)
        exporter.start()
        exporter.submit(records(0, 1))
        await asyncio.sleep(1.1)  # idle: only the refresh timer sends
        await exporter.close(2)

    asyncio.run(scenario())
    set_ids = []
    try:
        while True:
            message = sink.recv(65535)
            set_ids.append(struct.unpack_from("!H", message, HEADER.size)[0])
    except TimeoutError:
        pass
    finally:
        sink.close()
    assert set_ids[:3] == [2, 280, 256]  # templates, the ledger, then the data
    assert set_ids.count(2) >= 4  # at start, then about every 0.3 s


def test_shutdown_with_the_collector_away_counts_what_is_left(caplog):
    async def scenario():
        exporter = Exporter(StreamTransport("127.0.0.1", free_port()), 1, max_backoff=0.1)
        exporter.start()
        exporter.submit(records(0, 7))
        return exporter, await exporter.close(0.3)

    with caplog.at_level(logging.ERROR):
        exporter, delivered = asyncio.run(scenario())
    assert not delivered and exporter.stats.records_dropped == 7 and exporter.queued == 0
    assert "7 records unsent" in caplog.text


def test_drops_are_visible_as_a_prometheus_metric():
    from prometheus_client import CollectorRegistry, generate_latest

    from ovsflow.metrics import ExporterMetrics

    async def scenario():
        # never started: nothing takes the records, so the wait ends in drops
        exporter = Exporter(StreamTransport("127.0.0.1", free_port()), 1, max_buffered=3,
                            stall_timeout=0.2)
        exporter.submit(records(0, 8))
        await exporter.wait_for_room()
        return exporter

    exporter = asyncio.run(scenario())
    registry = CollectorRegistry()
    registry.register(ExporterMetrics({"127.0.0.1:4739:tcp": exporter}))
    text = generate_latest(registry).decode()
    label = '{collector="127.0.0.1:4739:tcp"}'
    assert f"ovsflow_records_dropped_total{label} 5.0" in text
    assert f"ovsflow_records_submitted_total{label} 8.0" in text
    assert f"ovsflow_export_queue_records{label} 3.0" in text
    assert f"ovsflow_collector_reachable{label} 0.0" in text


@pytest.mark.parametrize("with_client_cert", [True, False])
def test_mutual_tls_client_certificates(tls_files, with_client_cert):
    collector = Collector("tls://127.0.0.1:0", count=4, timeout=10,
                          extra=("--cert", tls_files["cert"], "--key", tls_files["key"],
                                 "--client-ca", tls_files["ca"]))
    settings = TlsSettings(ca_file=tls_files["ca"])
    if with_client_cert:
        settings = TlsSettings(ca_file=tls_files["ca"], cert_file=tls_files["client_cert"],
                               key_file=tls_files["client_key"])

    async def scenario():
        exporter = Exporter(StreamTransport("127.0.0.1", collector.port,
                                            client_tls_context(settings), "collector.test"),
                            1, max_backoff=0.2)
        exporter.start()
        exporter.submit(records(0, 4))
        received = await asyncio.to_thread(collector.records)
        delivered = await exporter.close(1)
        return received, delivered, exporter

    try:
        received, delivered, exporter = asyncio.run(scenario())
    finally:
        collector.stop()
    if with_client_cert:
        assert flow_ids(received) == [0, 1, 2, 3] and delivered
    else:
        # refused: nothing reached the collector, nothing was counted as exported, and the
        # four records are counted as dropped when the exporter gave up at close
        assert received == [] and not delivered
        assert (exporter.stats.records_exported, exporter.stats.records_dropped) == (0, 4)


def read_stream_messages(data: bytes) -> list[list[tuple[int, bytes]]]:
    """The sets (set id, body) of each IPFIX message in a TCP byte stream."""
    messages = []
    for message in MessageStream().feed(data):
        sets, pos = [], HEADER.size
        while pos < len(message):
            set_id, length = struct.unpack_from("!HH", message, pos)
            sets.append((set_id, message[pos + 4:pos + length]))
            pos += length
        messages.append(sets)
    return messages


def test_tcp_sends_templates_once_and_withdraws_them_before_closing():
    """Over TCP the templates live as long as the session: no refresh (that is for UDP),
    and a clean close withdraws them all (RFC 7011 §8.1: template id 2, field count 0)."""
    receiver = StreamReceiver()

    async def scenario():
        exporter = Exporter(StreamTransport("127.0.0.1", receiver.port), 1,
                            template_refresh=0.2)
        exporter.start()
        for batch in range(5):  # over a second: five refresh periods
            exporter.submit(records(batch * 10, 10))
            await asyncio.sleep(0.25)
        assert await exporter.close(5)

    asyncio.run(scenario())
    received = receiver.stream()
    messages = read_stream_messages(bytes(received))
    template_sets = [body for sets in messages for set_id, body in sets if set_id == 2]
    assert len(template_sets) == 2  # the templates once, then the withdrawal
    assert messages[0][0][0] == 2  # templates first
    assert messages[-1] == [(2, struct.pack("!HH", 2, 0))]  # the withdrawal comes last
    decoder = MessageDecoder()
    data = [r for m in MessageStream().feed(bytes(received)) for r in flow_records_of(decoder, m)]
    assert [r["flowId"] for r in data] == list(range(50))


def test_a_record_that_does_not_fit_is_rejected_and_the_rest_go_through(caplog):
    collector = Collector("tcp://127.0.0.1:0", count=4, timeout=30)
    bad_port, bad_counter = records(100, 2)
    bad_port.source_port = 70000  # a mangled dpctl line
    bad_counter.octet_delta = -5  # counters that went backwards

    async def scenario():
        exporter = Exporter(StreamTransport("127.0.0.1", collector.port), 1)
        exporter.start()
        exporter.submit(records(0, 2) + [bad_port, bad_counter])
        await asyncio.sleep(0.5)
        exporter.submit(records(2, 2) + [bad_port])  # the task still runs
        received = await asyncio.to_thread(collector.records)
        assert await exporter.close(5)
        return exporter, received

    try:
        with caplog.at_level(logging.ERROR):
            exporter, received = asyncio.run(scenario())
    finally:
        collector.stop()
    assert flow_ids(received) == [0, 1, 2, 3]
    assert exporter.stats.records_rejected == 3 and exporter.stats.records_exported == 4
    assert exporter.rejected == {"sourceTransportPort": 2, "octetDeltaCount": 1}
    assert caplog.text.count("sourceTransportPort=70000 does not fit") == 1  # once per kind


# What the sources can put in a record, and values no field can hold: each integer field
# gets its valid range plus values beyond it on both sides.
FIELD_BITS = {"source_port": 16, "destination_port": 16, "protocol": 8, "icmp_type": 8,
              "icmp_code": 8, "end_reason": 8, "start_ms": 64, "end_ms": 64,
              "start_seconds": 32, "end_seconds": 32, "packets": 64, "octets": 64,
              "packet_delta": 64, "octet_delta": 64, "reverse_packets": 64,
              "reverse_octets": 64, "reverse_packet_delta": 64, "reverse_octet_delta": 64,
              "flow_id": 64}


@st.composite
def flow_records(draw):
    kind = draw(st.sampled_from([CONNTRACK, CONNTRACK_UNCOUNTED, DENY]))
    size = draw(st.sampled_from([4, 16]))
    record = FlowRecord(kind, draw(st.binary(min_size=size, max_size=size)),
                        draw(st.binary(min_size=size, max_size=size)), 0,
                        tcp_state=draw(st.sampled_from(["", "ESTABLISHED", "TIME_WAIT"])))
    bad = None
    if draw(st.integers(0, 3)) == 0:  # one field in four records out of range
        bad = draw(st.sampled_from(sorted(FIELD_BITS)))
    for name, bits in FIELD_BITS.items():
        if name == bad:
            value = draw(st.one_of(st.integers(max_value=-1),
                                   st.integers(min_value=1 << bits, max_value=1 << 70)))
        else:
            value = draw(st.integers(0, (1 << bits) - 1))
        setattr(record, name, value)
    return record, bad


@given(st.lists(flow_records(), max_size=40))
def test_encode_takes_any_record_and_counts_what_does_not_fit(drawn):
    encoded = encode_records([record for record, _ in drawn])
    messages = MessageEncoder(7).data_messages(encoded.data_records(), 0)
    decoder = MessageDecoder()
    for message in MessageEncoder(7).template_messages(ALL_TEMPLATES, 0):
        decoder.decode(message)
    decoded = [r for m in messages for _, r in decoder.decode(m).records]
    # an attribute the record's template does not carry cannot make it fail
    carried = {(kind, ipv6): {attribute for attribute in FIELD_BITS
                              if attribute in template_attributes(t)}
               for (kind, ipv6), t in RECORD_TEMPLATES.items()}
    good = [r for r, bad in drawn if bad not in carried[r.kind, r.ipv6]]
    assert len(decoded) == len(good)
    assert len(encoded.rejected) == len(drawn) - len(good)
    assert len(encoded) == len(good)
    # records come out grouped by template: compare as sorted lists
    assert sorted((f["protocolIdentifier"], f["sourceTransportPort"], f["flowEndMilliseconds"],
                   f.get("flowId", -1), f.get("octetDeltaCount", -1)) for f in decoded) == sorted(
        (r.protocol, r.source_port, r.end_ms,
         r.flow_id if "flow_id" in carried[r.kind, r.ipv6] else -1,
         r.octet_delta if "octet_delta" in carried[r.kind, r.ipv6] else -1) for r in good)


def template_attributes(record_template) -> set[str]:
    """The FlowRecord attributes a template's values come from."""
    probe = FlowRecord(CONNTRACK, b"\0" * 4, b"\0" * 4, 0)
    marked = set()
    for attribute in FIELD_BITS:
        original = getattr(probe, attribute)
        setattr(probe, attribute, 12345)
        if 12345 in record_template.values(probe):
            marked.add(attribute)
        setattr(probe, attribute, original)
    return marked


def test_udp_to_a_host_name_is_sized_by_the_family_it_resolves_to(tmp_path):
    """A name that resolves to IPv6 only: datagrams must fit path MTU - 40 - 8 bytes. The
    name comes from a namespace's own /etc/hosts (`ip netns exec` mounts /etc/netns/NS)."""
    from lab.netns import PYTHON, Netns

    ns = Netns("udp6name")
    hosts_dir = Path("/etc/netns") / ns.name
    try:
        hosts_dir.mkdir(parents=True)
        (hosts_dir / "hosts").write_text("::1 collector6.test\n")
        code = f"""
import asyncio, json, socket, sys
sys.path[:0] = {sys.path!r}
from test_exporter import records
from ovsflow.exporter import Exporter, RecordEncoder, encode_records
from ovsflow.exporter.queue import ExportQueue
from ovsflow.transport import UdpTransport
sink = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sink.bind(("::1", 0))
sink.settimeout(1)
async def main():
    exporter = Exporter(UdpTransport("collector6.test", sink.getsockname()[1], 1500), 1)
    exporter.start()
    exporter.submit(records(0, 300))
    await asyncio.sleep(0.5)
    await exporter.close(2)
    return exporter.transport.max_message_size
size = asyncio.run(main())
sizes = []
try:
    while True:
        sizes.append(len(sink.recv(65535)))
except TimeoutError:
    pass
print(json.dumps({{"limit": size, "sizes": sizes}}))
"""
        report = json.loads(ns.run(PYTHON, "-c", code).stdout)
    finally:
        ns.delete()
        shutil.rmtree(hosts_dir, ignore_errors=True)
    assert report["limit"] == 1500 - 40 - 8
    assert len(report["sizes"]) > 10 and max(report["sizes"]) <= 1452
    assert max(report["sizes"]) > 1452 - 200  # packed up to the limit, not far below


def test_queued_records_dropped_oldest_first_across_templates():
    """The queue holds encoded batches: dropping the oldest N cuts whole template groups,
    then the front of the next, and keeps the rest byte for byte."""
    v4 = records(0, 5)
    uncounted = [FlowRecord(CONNTRACK_UNCOUNTED, r.source_address, r.destination_address, 17,
                            flow_id=i) for i, r in enumerate(records(5, 4), start=5)]
    batch = encode_records(v4 + uncounted)
    assert len(batch) == 9 and batch.protocols == {17: 9}
    batch.drop_oldest(6)  # the 5 conntrack records and the first uncounted one
    [(template, data)] = batch.data_records()
    assert template.template_id == RECORD_TEMPLATES[CONNTRACK_UNCOUNTED, False].template.template_id
    assert data == [RECORD_TEMPLATES[CONNTRACK_UNCOUNTED, False].encode(r) for r in uncounted[1:]]


def test_record_encoder_encodes_batch_by_batch_and_counts_protocols():
    """What the store fills during a poll: never more than one batch of FlowRecords
    pending, every record encoded once, rejections kept for the exporter to count."""
    encoder = RecordEncoder()
    made = records(0, 2 * BATCH + 3)
    made[1].source_port = 70000  # does not fit
    made[BATCH + 1].protocol = 6
    for record in made:
        encoder.append(record)
        assert len(encoder._pending) < BATCH
    batches = encoder.finish()
    assert [len(b) for b in batches] == [BATCH - 1, BATCH, 3]
    assert batches[0].rejected == [("sourceTransportPort", 70000)]
    assert sum((b.protocols for b in batches), start=Counter()) == {17: 2 * BATCH + 2, 6: 1}
    decoder = MessageDecoder()
    for message in MessageEncoder(1).template_messages(ALL_TEMPLATES, 0):
        decoder.decode(message)
    sent = [r["flowId"] for b in batches
            for m in MessageEncoder(1).data_messages(b.data_records(), 0)
            for _, r in decoder.decode(m).records]
    assert sent == [i for i in range(2 * BATCH + 3) if i != 1]


def test_batches_of_a_poll_are_dropped_once_for_the_whole_poll(caplog):
    """During an outage a poll's batches are queued as they are encoded; the excess is
    dropped (and logged) once when the poll hands over its last ones, not per batch.
    (Records without identity: they fold into nothing, as ended connections' records.)"""
    async def scenario():
        # never started: nothing takes the records, so the wait ends with the collector away
        exporter = Exporter(StreamTransport("127.0.0.1", free_port()), 1, max_buffered=3,
                            stall_timeout=0.2)
        exporter.submit(records(0, 8))
        await exporter.wait_for_room()
        caplog.clear()
        for first in (100, 110, 120):
            exporter.enqueue(encode_records(records(first, 10)))
        queued_before = exporter.queued
        exporter.submit_encoded([encode_records(records(130, 2))])
        return exporter, queued_before

    with caplog.at_level(logging.WARNING):
        exporter, queued_before = asyncio.run(scenario())
    assert queued_before == 33 and exporter.queued == 3
    assert exporter.stats.records_dropped == 5 + 32
    assert caplog.text.count("oldest records") == 1
    assert "dropped the 32 oldest records (37 dropped so far)" in caplog.text


def test_every_drop_of_an_outage_is_a_line_with_its_running_total(caplog):
    """The queue says each poll's drop, with the total so far; the log's RepeatFilter shows
    one such line a minute (tests/test_logs.py)."""
    queue = ExportQueue(max_buffered=2, stall_timeout=1.0)
    queue.collector = "collector.test:4739"
    queue.reachable = False
    with caplog.at_level(logging.WARNING):
        for first in range(0, 50, 5):  # a poll's records, ten polls
            queue.submit([encode_records(records(first, 5))])
    lines = [line for line in caplog.messages if "oldest records" in line]
    assert queue.stats.records_dropped == 48
    assert len(lines) == 10
    assert lines[0].endswith("dropped the 3 oldest records (3 dropped so far)")
    assert lines[-1].endswith("dropped the 5 oldest records (48 dropped so far)")


class SlowCollector:
    """A TCP or TLS collector (its own socket, in a thread) that reads slowly, and reads
    nothing while `paused` is set: the exporter's sends block on it mid-batch. `flow_ids()`
    decodes what it received, once the exporter has closed the session."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        self.port = self.server.getsockname()[1]
        self.tls = tls
        self.paused = threading.Event()
        self.received = bytearray()
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.server.accept()
        self.connections += 1
        if self.tls is not None:
            connection = self.tls.wrap_socket(connection, server_side=True)
        with connection:
            while True:
                while self.paused.is_set():
                    time.sleep(0.01)
                try:
                    chunk = connection.recv(16384)
                except OSError:  # TLS: a record cut short by an abort, then the end
                    break
                if not chunk:
                    break
                self.received += chunk
                time.sleep(0.002)

    def flow_ids(self) -> Counter:
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the session was not closed"
        self.server.close()
        decoder = MessageDecoder()
        # a message cut short by an abort is left out: the stream cuts only whole ones
        return Counter(record["flowId"] for message in MessageStream().feed(bytes(self.received))
                       for record in flow_records_of(decoder, message))


def server_tls_context(tls_files) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files["cert"], tls_files["key"])
    return context


def slow_collector_transport(request, tls_files):
    """A SlowCollector and a transport to it: TCP, or TLS verified with the test CA."""
    if request.param == "tcp":
        collector = SlowCollector()
        return collector, StreamTransport("127.0.0.1", collector.port)
    collector = SlowCollector(server_tls_context(tls_files))
    context = client_tls_context(TlsSettings(ca_file=tls_files["ca"]))
    return collector, StreamTransport("127.0.0.1", collector.port, context, "collector.test")


@pytest.fixture(params=["tcp", "tls"])
def slow_collector(request, tls_files):
    collector, transport = slow_collector_transport(request, tls_files)
    yield collector, transport
    collector.paused.clear()
    collector.server.close()


IN_FLIGHT_RECORDS = 200_000


def test_close_mid_batch_sends_no_record_twice_and_counts_what_arrived(slow_collector):
    """Issue 18: close() cancelled a batch mid-send and sent it again, whole, on the same
    session (4,620 of 200,000 records twice, records_exported 200,000). The collector
    keeps reading, slowly: every record arrives exactly once."""
    collector, transport = slow_collector

    async def scenario():
        exporter = Exporter(transport, 1)
        exporter.start()
        exporter.submit(records(0, IN_FLIGHT_RECORDS))
        # the sends block on the reader: close() comes while a batch is half sent
        await wait_until(lambda: exporter.stats.records_exported >= 20_000, timeout=30)
        delivered = await exporter.close(5)
        return exporter.stats, delivered

    stats, delivered = asyncio.run(scenario())
    received = collector.flow_ids()
    assert delivered
    assert max(received.values()) == 1
    assert sorted(received) == list(range(IN_FLIGHT_RECORDS))
    assert stats.records_exported == IN_FLIGHT_RECORDS and stats.records_dropped == 0
    assert collector.connections == 1


def test_close_that_gives_up_counts_the_unsent_as_dropped_never_as_exported(slow_collector):
    """The collector stops reading while a batch is half sent and close() gives up on it;
    it reads again afterwards and gets what the kernel held. What it decoded is exactly
    records_exported, each record at most once; the rest is counted as dropped."""
    collector, transport = slow_collector

    async def scenario():
        exporter = Exporter(transport, 1)
        exporter.start()
        exporter.submit(records(0, IN_FLIGHT_RECORDS))
        await wait_until(lambda: exporter.stats.records_exported >= 20_000, timeout=30)
        collector.paused.set()
        delivered = await exporter.close(0.5)
        collector.paused.clear()
        return exporter.stats, delivered

    stats, delivered = asyncio.run(scenario())
    received = collector.flow_ids()
    assert not delivered and stats.records_dropped > 0
    assert max(received.values()) == 1
    assert sum(received.values()) == stats.records_exported
    assert sorted(received) == list(range(stats.records_exported))  # in order, no gap
    assert stats.records_exported + stats.records_dropped == stats.records_submitted
