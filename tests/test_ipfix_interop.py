"""Our IPFIX against decoders and encoders we did not write: tshark, the PyPI `ipfix` package.

The exporter sends over real loopback sockets; tshark captures and decodes the bytes.
"""

import asyncio
import ipaddress
import socket
import subprocess
from datetime import datetime, timezone

import ipfix.ie
import ipfix.message
import ipfix.template
import pytest

from helpers import (
    OVSFLOW, Collector, free_port, tshark_capture, tshark_fields, use_antrea_information_model,
)
from ovsflow.exporter import Exporter
from ovsflow.ipfix.messages import MessageEncoder
from ovsflow.ipfix.templates import ALL_TEMPLATES, template_for
from ovsflow.record import (
    ACTIVE_TIMEOUT, CONNTRACK, DENY, END_OF_FLOW, RULE_DROP, FlowRecord,
)
from ovsflow.transport import StreamTransport, UdpTransport

V4 = socket.inet_aton
V6 = lambda text: socket.inet_pton(socket.AF_INET6, text)  # noqa: E731

@pytest.fixture(scope="module", autouse=True)
def ipfix_information_model():
    use_antrea_information_model()


def tcp_record(index: int) -> FlowRecord:
    return FlowRecord(
        CONNTRACK, V4(f"10.1.{index // 250}.{index % 250 + 1}"), V4("10.2.0.1"), 6,
        40000 + index, 443, start_ms=1_700_000_000_123 + index, end_ms=1_700_000_005_456,
        start_seconds=1_700_000_000, end_seconds=1_700_000_005, end_reason=ACTIVE_TIMEOUT,
        packets=10 + index, octets=1000 + index, packet_delta=4, octet_delta=400 + index,
        reverse_packets=8, reverse_octets=777, reverse_packet_delta=3,
        reverse_octet_delta=55, flow_id=index, tcp_state="ESTABLISHED")


def deny_record() -> FlowRecord:
    return FlowRecord(DENY, V6("fd00::1"), V6("fd00::2"), 17, 5353, 53,
                      start_ms=1_700_000_001_000, end_ms=1_700_000_002_000,
                      start_seconds=1_700_000_001, end_seconds=1_700_000_002,
                      end_reason=END_OF_FLOW, packets=3, octets=300, packet_delta=3,
                      octet_delta=300, ingress_rule_action=RULE_DROP,
                      ingress_rule_name="r" * 300)


async def export(transport, records, timeout=20.0) -> Exporter:
    exporter = Exporter(transport, 77)
    exporter.start()
    exporter.submit(records)
    assert await exporter.close(timeout)
    return exporter


FIELDS = ["cflow.od_id", "cflow.srcaddr", "cflow.srcaddrv6", "cflow.dstaddr", "cflow.srcport",
          "cflow.dstport", "cflow.protocol", "cflow.permanent_packets", "cflow.permanent_octets",
          "cflow.packets", "cflow.octets", "cflow.flow_end_reason", "cflow.flow_id",
          "cflow.abstimestart", "_ws.malformed", "_ws.expert.severity"]


def _tshark_time(ms: int) -> str:
    """How tshark shows an absolute time: 'Nov 14, 2023 22:13:20.123000000 UTC'."""
    moment = datetime.fromtimestamp(ms / 1000, timezone.utc)
    return moment.strftime("%b %d, %Y %H:%M:%S.") + f"{ms % 1000:03d}000000 UTC"


def check_tshark_view(packets, records, kind="udp"):
    tcp = [r for r in records if r.kind == CONNTRACK]
    seen = {f: [v for p in packets for v in p[f]] for f in FIELDS}
    assert seen["_ws.malformed"] == []
    assert set(seen["cflow.od_id"]) == {"77"}
    assert seen["cflow.srcaddr"] == [socket.inet_ntoa(r.source_address) for r in tcp]
    assert seen["cflow.srcport"] == [str(r.source_port) for r in tcp] + ["5353"]
    assert seen["cflow.protocol"] == ["6"] * len(tcp) + ["17"]
    assert seen["cflow.srcaddrv6"] == ["fd00::1"]
    # forward then reverse (RFC 5103) counters, as tshark lists them per record
    expected_octets = [v for r in tcp for v in (str(r.octet_delta), "55")] + ["300"]
    assert seen["cflow.octets"] == expected_octets
    expected_totals = [v for r in tcp for v in (str(r.octets), "777")] + ["300"]
    assert seen["cflow.permanent_octets"] == expected_totals
    assert seen["cflow.flow_end_reason"] == ["2"] * len(tcp) + ["3"]
    assert seen["cflow.flow_id"] == [str(r.flow_id) for r in tcp]
    assert seen["cflow.dstaddr"] == [socket.inet_ntoa(r.destination_address) for r in tcp]
    assert seen["cflow.dstport"] == [str(r.destination_port) for r in tcp] + ["53"]
    assert seen["cflow.packets"] == [v for r in tcp for v in (
        str(r.packet_delta), str(r.reverse_packet_delta))] + ["3"]
    assert seen["cflow.permanent_packets"] == [v for r in tcp for v in (
        str(r.packets), str(r.reverse_packets))] + ["3"]
    # flowStartSeconds, then flowStartMilliseconds, of each record
    assert seen["cflow.abstimestart"] == [v for r in records for v in (
        _tshark_time(r.start_seconds * 1000), _tshark_time(r.start_ms))]
    if kind == "udp":  # over TCP, tshark's TCP analysis warns of full receive windows
        # no expert warning or error (PI_WARN 0x600000, PI_ERROR 0x800000) about any packet
        assert [int(v) for v in seen["_ws.expert.severity"] if int(v) >= 0x600000] == []


def export_under_tshark(kind: str, records, tmp_path):
    """Export `records` over `kind` (udp, tcp) to `ovsflow collect` while tshark captures:
    (what tshark decoded, per packet; what the collector printed)."""
    collector = Collector(f"{kind}://127.0.0.1:0", count=len(records))
    transport = (UdpTransport if kind == "udp" else StreamTransport)("127.0.0.1", collector.port)
    try:
        with tshark_capture(f"{kind} port {collector.port}", tmp_path) as pcap:
            asyncio.run(export(transport, records))
            received = collector.records()
    finally:
        collector.stop()
    return tshark_fields(pcap, f"{kind}.port=={collector.port},cflow", FIELDS), received


def test_tshark_decodes_udp_export(tmp_path):
    records = [tcp_record(i) for i in range(3)] + [deny_record()]
    packets, received = export_under_tshark("udp", records, tmp_path)
    check_tshark_view(packets, records)
    assert [r["sourceTransportPort"] for r in received] == [40000, 40001, 40002, 5353]


def test_tshark_decodes_tcp_export_over_many_segments(tmp_path):
    records = [tcp_record(i) for i in range(3000)] + [deny_record()]
    packets, received = export_under_tshark("tcp", records, tmp_path)
    check_tshark_view(packets, records, "tcp")
    assert len(received) == len(records)


def test_nfdump_style_millisecond_times_and_udp_mtu(tmp_path):
    """Datagrams never exceed the path MTU, and each carries as many records as fit."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(5)
    records = [tcp_record(i) for i in range(200)]
    try:
        asyncio.run(export(UdpTransport("127.0.0.1", sink.getsockname()[1], path_mtu=576),
                           records))
        sizes = []
        while True:
            try:
                sizes.append(len(sink.recv(65535)))
            except TimeoutError:
                break
    finally:
        sink.close()
    assert max(sizes) <= 576 - 28
    record_size = len(template_for(records[0]).encode(records[0]))
    assert max(sizes) > 576 - 28 - record_size - 8  # full datagrams, not one record each


def test_ipfix_package_decodes_our_messages():
    records = [tcp_record(0), deny_record()]
    encoder = MessageEncoder(77)
    messages = encoder.template_messages(ALL_TEMPLATES, 1_700_000_010)
    messages += encoder.data_messages(
        [(template_for(r).template, [template_for(r).encode(r)]) for r in records],
        1_700_000_010)
    buffer = ipfix.message.MessageBuffer()
    decoded = []
    for message in messages:
        buffer.from_bytes(message)
        decoded += list(buffer.namedict_iterator())
    tcp, deny = decoded
    assert tcp["sourceIPv4Address"] == ipaddress.ip_address("10.1.0.1")
    assert tcp["destinationTransportPort"] == 443
    assert (tcp["octetTotalCount"], tcp["octetDeltaCount"]) == (1000, 400)
    assert (tcp["reverseOctetTotalCount"], tcp["reverseOctetDeltaCount"]) == (777, 55)
    assert tcp["flowStartMilliseconds"] == datetime(2023, 11, 14, 22, 13, 20, 123000)
    assert tcp["flowEndSeconds"] == datetime(2023, 11, 14, 22, 13, 25)
    assert tcp["tcpState"] == "ESTABLISHED"
    assert deny["sourceIPv6Address"] == ipaddress.ip_address("fd00::1")
    assert deny["ingressNetworkPolicyRuleAction"] == RULE_DROP
    assert deny["ingressNetworkPolicyRuleName"] == "r" * 300


def ipfix_package_messages() -> list[bytes]:
    """Templates and data in separate messages, as the `ipfix` package writes them: IPv6,
    reverse and enterprise elements, a string over 255 bytes."""
    template = ipfix.template.from_ielist(300, ipfix.ie.spec_list([
        "flowStartMilliseconds", "sourceIPv6Address", "destinationIPv6Address",
        "sourceTransportPort", "protocolIdentifier", "octetDeltaCount",
        "reverseOctetDeltaCount", "sourcePodName", "tcpState"]))
    buffer = ipfix.message.MessageBuffer()
    buffer.begin_export(4242)
    buffer.add_template(template)
    messages = [buffer.to_bytes()]
    for index in range(3):
        buffer.begin_export(4242)
        buffer.add_template(template, export=False)
        buffer.export_ensure_set(300)
        buffer.export_namedict({
            "flowStartMilliseconds": datetime(2024, 1, 2, 3, 4, 5, 678000),
            "sourceIPv6Address": ipaddress.ip_address(f"2001:db8::{index + 1}"),
            "destinationIPv6Address": ipaddress.ip_address("2001:db8::ff"),
            "sourceTransportPort": 1000 + index, "protocolIdentifier": 132,
            "octetDeltaCount": 123456789012 + index, "reverseOctetDeltaCount": 42,
            "sourcePodName": "pod-" + "p" * 296, "tcpState": ""})
        messages.append(buffer.to_bytes())
    return messages


def check_foreign_records(received):
    assert [r["sourceIPv6Address"] for r in received] == [
        "2001:db8::1", "2001:db8::2", "2001:db8::3"]
    first = received[0]
    assert first["_observationDomainId"] == 4242 and first["_templateId"] == 300
    assert first["flowStartMilliseconds"] == 1704164645678  # 2024-01-02T03:04:05.678Z
    assert first["protocolIdentifier"] == 132
    assert first["octetDeltaCount"] == 123456789012
    assert first["reverseOctetDeltaCount"] == 42
    assert first["sourcePodName"] == "pod-" + "p" * 296
    assert first["tcpState"] == ""


def test_collect_decodes_the_ipfix_package_over_udp():
    collector = Collector("udp://127.0.0.1:0", count=3)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for message in ipfix_package_messages():
                sender.sendto(message, ("127.0.0.1", collector.port))
        received = collector.records()
    finally:
        collector.stop()
    check_foreign_records(received)


def test_collect_decodes_the_ipfix_package_over_tcp_in_odd_chunks():
    collector = Collector("tcp://127.0.0.1:0", count=3)
    try:
        stream = b"".join(ipfix_package_messages())
        with socket.create_connection(("127.0.0.1", collector.port)) as sender:
            sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for start in range(0, len(stream), 7):
                sender.sendall(stream[start:start + 7])
            received = collector.records()
    finally:
        collector.stop()
    check_foreign_records(received)


def test_collect_rejects_a_bad_listen_url():
    result = subprocess.run([OVSFLOW, "collect", "--listen", "http://127.0.0.1:1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "udp://, tcp:// or tls://" in result.stderr


def test_collect_times_out_with_status_1_when_the_count_is_not_reached():
    collector = Collector(f"udp://127.0.0.1:{free_port(socket.SOCK_DGRAM)}", count=1,
                          timeout=0.5)
    assert collector.records() == []
    assert collector.process.returncode == 1
