"""`ovsflow collect` in its own process, stopped as a container runtime stops its PID 1."""

import json
import signal
import socket

import pytest

from helpers import Collector
from ovsflow.ipfix.messages import MessageEncoder
from ovsflow.ipfix.templates import RECORD_TEMPLATES
from ovsflow.record import CONNTRACK, FlowRecord

RECORD = FlowRecord(CONNTRACK, socket.inet_aton("10.1.2.3"), socket.inet_aton("10.4.5.6"), 6,
                    40000, 443, packets=7, octets=900, flow_id=42)


def messages(domain: int = 5) -> list[bytes]:
    """A template message, then a data message holding RECORD."""
    record_template = RECORD_TEMPLATES[CONNTRACK, False]
    encoder = MessageEncoder(domain)
    return (encoder.template_messages([record_template.template], 1000)
            + encoder.data_messages([(record_template.template,
                                      [record_template.encode(RECORD)])], 1000))


def assert_is_record(line: dict) -> None:
    assert (line["sourceIPv4Address"], line["destinationIPv4Address"]) == ("10.1.2.3",
                                                                            "10.4.5.6")
    assert (line["sourceTransportPort"], line["destinationTransportPort"]) == (40000, 443)
    assert (line["protocolIdentifier"], line["packetTotalCount"]) == (6, 7)
    assert line["_observationDomainId"] == 5


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_udp_collector_stops_on_a_signal_with_status_0_after_printing_what_it_received(signum):
    collector = Collector("udp://127.0.0.1:0", timeout=60)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for message in messages():
                sender.sendto(message, ("127.0.0.1", collector.port))
        # At once: the datagrams are in the collector's socket, perhaps not yet read.
        collector.process.send_signal(signum)
        [line] = collector.records(timeout=10)
    finally:
        collector.stop()
    assert collector.process.returncode == 0, collector.errors
    assert_is_record(line)
    assert f"{signum.name}: stopping; 1 records printed" in collector.errors


def test_tcp_collector_stops_on_sigterm_with_status_0_and_a_count_not_reached():
    collector = Collector("tcp://127.0.0.1:0", count=10, timeout=60)
    try:
        with socket.create_connection(("127.0.0.1", collector.port)) as sender:
            sender.sendall(b"".join(messages()))
            printed = collector.process.stdout.readline()  # flushed as soon as decoded
            collector.process.send_signal(signal.SIGTERM)
            rest = collector.records(timeout=10)
    finally:
        collector.stop()
    assert collector.process.returncode == 0, collector.errors
    assert rest == []
    assert_is_record(json.loads(printed))
