"""The exporting process over real sockets, against `ovsflow collect` in its own process:
collectors that are late, restart, or never come; TLS; the queue bound; template refresh."""

import asyncio
import logging
import socket
import struct
import time

import pytest
import trustme

from helpers import Collector, free_port
from ovsflow.config import TlsSettings
from ovsflow.exporter import Exporter
from ovsflow.ipfix.codec import HEADER
from ovsflow.record import CONNTRACK, FlowRecord
from ovsflow.transport import StreamTransport, UdpTransport, client_tls_context


def records(first: int, count: int) -> list[FlowRecord]:
    return [FlowRecord(CONNTRACK, socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"),
                       17, 1000, 53, flow_id=i, packets=i) for i in range(first, first + count)]


def flow_ids(received) -> list[int]:
    return [r["flowId"] for r in received]


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


def test_tls_insecure_option_connects_and_warns(tls_files, caplog):
    collector = tls_collector(tls_files, count=3)
    with caplog.at_level(logging.WARNING):
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
    assert "NOT verified" in caplog.text


def test_full_queue_drops_the_oldest_counts_and_logs(caplog):
    port = free_port()

    async def scenario():
        exporter = Exporter(StreamTransport("127.0.0.1", port), 1, max_buffered=10,
                            max_backoff=0.2)
        exporter.start()
        exporter.submit(records(0, 15))
        exporter.submit(records(15, 10))
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


def test_udp_without_a_collector_neither_fails_nor_blocks():
    port = free_port(socket.SOCK_DGRAM)

    async def scenario():
        exporter = Exporter(UdpTransport("127.0.0.1", port), 1)
        exporter.start()
        for batch in range(5):
            exporter.submit(records(batch * 10, 10))
            await asyncio.sleep(0.05)
        assert await exporter.close(2)
        return exporter

    exporter = asyncio.run(scenario())
    assert exporter.stats.records_exported == 50 and exporter.stats.records_dropped == 0


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
    assert set_ids[:2] == [2, 256]  # templates, then the data
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
        exporter = Exporter(StreamTransport("127.0.0.1", free_port()), 1, max_buffered=3)
        exporter.submit(records(0, 8))
        return exporter

    exporter = asyncio.run(scenario())
    registry = CollectorRegistry()
    registry.register(ExporterMetrics(exporter))
    text = generate_latest(registry).decode()
    assert "ovsflow_records_dropped_total 5.0" in text
    assert "ovsflow_records_submitted_total 8.0" in text
    assert "ovsflow_export_queue_records 3.0" in text


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
