"""Our records as collectors we did not write read them: nfcapd/nfdump, pmacct's nfacctd
(both UDP only) and libfixbuf's ipfixDump (IPFIX files), each compared field by field with
the records that were sent, ICMP type and code included.

The records go out through the real exporter and a real UDP socket (nfcapd, nfacctd); for
ipfixDump the same encoder writes an IPFIX file (RFC 5655: messages back to back).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
from datetime import datetime, timezone
from ipaddress import ip_address
from pathlib import Path

import pytest

from helpers import free_port
from ovsflow.exporter import Exporter
from ovsflow.ipfix.messages import MessageEncoder
from ovsflow.ipfix.templates import ALL_TEMPLATES, template_for
from ovsflow.record import (
    ACTIVE_TIMEOUT, CONNTRACK, DENY, END_OF_FLOW, IDLE_TIMEOUT, RULE_DROP, FlowRecord,
)
from ovsflow.transport import UdpTransport

V4 = socket.inet_aton
V6 = lambda text: socket.inet_pton(socket.AF_INET6, text)  # noqa: E731
UTC = {**os.environ, "TZ": "UTC"}
START_MS, END_MS = 1_700_000_000_123, 1_700_000_005_456


def _record(kind, source, destination, protocol, sport=0, dport=0, **values) -> FlowRecord:
    return FlowRecord(kind, source, destination, protocol, sport, dport, start_ms=START_MS,
                      end_ms=END_MS, start_seconds=START_MS // 1000,
                      end_seconds=END_MS // 1000, **values)


RECORDS = [
    _record(CONNTRACK, V4("10.10.0.1"), V4("10.20.0.1"), 6, 40001, 443,
            end_reason=ACTIVE_TIMEOUT, packets=10, octets=1000, packet_delta=4,
            octet_delta=400, reverse_packets=8, reverse_octets=777, reverse_packet_delta=3,
            reverse_octet_delta=55, flow_id=11, tcp_state="ESTABLISHED", flow_type=1),
    _record(CONNTRACK, V6("fd00::10"), V6("fd00::20"), 17, 5353, 53, end_reason=END_OF_FLOW,
            packets=3, octets=300, packet_delta=3, octet_delta=300, reverse_packets=1,
            reverse_octets=90, reverse_packet_delta=1, reverse_octet_delta=90, flow_id=12),
    _record(CONNTRACK, V4("10.10.0.2"), V4("10.20.0.2"), 1, icmp_type=8, icmp_code=0,
            end_reason=IDLE_TIMEOUT, packets=2, octets=168, packet_delta=2, octet_delta=168,
            reverse_packets=2, reverse_octets=168, reverse_packet_delta=2,
            reverse_octet_delta=168, flow_id=13),
    _record(CONNTRACK, V6("fd00::11"), V6("fd00::21"), 58, icmp_type=128, icmp_code=0,
            end_reason=IDLE_TIMEOUT, packets=5, octets=520, packet_delta=5, octet_delta=520,
            flow_id=14),
    _record(CONNTRACK, V4("10.10.0.3"), V4("10.20.0.3"), 1, icmp_type=3, icmp_code=13,
            end_reason=END_OF_FLOW, packets=1, octets=56, packet_delta=1, octet_delta=56,
            flow_id=15),
    _record(DENY, V4("10.10.0.4"), V4("10.20.0.4"), 17, 7000, 9, end_reason=END_OF_FLOW,
            packets=6, octets=600, packet_delta=6, octet_delta=600,
            ingress_rule_action=RULE_DROP, egress_rule_action=RULE_DROP,
            ingress_rule_name="rule-7"),
]


def address(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(packed) == 16 else socket.AF_INET, packed)


def key(record: FlowRecord) -> tuple:
    return address(record.source_address), address(record.destination_address)


def utc_text(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


async def _export_udp(port: int) -> None:
    exporter = Exporter(UdpTransport("127.0.0.1", port), 77)
    exporter.start()
    exporter.submit(RECORDS)
    assert await exporter.close(10)


def _stop(process: subprocess.Popen, signum: int = signal.SIGTERM) -> None:
    """By its PID; nfacctd ignores SIGTERM and stops on SIGINT."""
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_udp_listener(port: int, process: subprocess.Popen, timeout: float = 10) -> None:
    """The collector has bound its port: binding it ourselves fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the collector exited at start"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on UDP port {port}")


def test_nfdump_reads_every_field(tmp_path):
    port = free_port(socket.SOCK_DGRAM)
    nfcapd = subprocess.Popen(["nfcapd", "-w", str(tmp_path), "-b", "127.0.0.1", "-p",
                               str(port), "-t", "3600"], env=UTC, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_for_udp_listener(port, nfcapd)
        asyncio.run(_export_udp(port))
        time.sleep(0.5)  # nfcapd reads the datagrams; SIGTERM then writes the file
    finally:
        _stop(nfcapd)
    [capture] = [p for p in tmp_path.iterdir() if re.fullmatch(r"nfcapd\.\d{12}", p.name)]
    out = subprocess.run(["nfdump", "-r", str(capture), "-o", "json"], env=UTC,
                         capture_output=True, text=True, check=True).stdout
    flows = {(f.get("src4_addr") or f["src6_addr"], f.get("dst4_addr") or f["dst6_addr"]): f
             for f in json.loads(out)}
    assert len(flows) == len(RECORDS)
    for record in RECORDS:
        flow = flows[key(record)]
        assert flow["proto"] == record.protocol
        assert (flow["in_packets"], flow["in_bytes"]) == (record.packet_delta,
                                                          record.octet_delta)
        # nfdump leaves out reverse counters that are 0
        assert (flow.get("out_packets", 0), flow.get("out_bytes", 0)) == (
            record.reverse_packet_delta, record.reverse_octet_delta)
        # nfdump reads the millisecond times (it ignores the seconds forms)
        assert flow["first"] == utc_text(record.start_ms).replace(" ", "T")
        assert flow["last"] == utc_text(record.end_ms).replace(" ", "T")
        if record.protocol in (1, 58):
            assert (flow["icmp_type"], flow["icmp_code"]) == (record.icmp_type,
                                                              record.icmp_code)
        else:
            assert (flow["src_port"], flow["dst_port"]) == (record.source_port,
                                                            record.destination_port)


NFACCTD_CONFIG = """\
daemonize: false
nfacctd_ip: 127.0.0.1
nfacctd_port: {port}
plugins: print
print_output: json
print_output_file: {out}
print_refresh_time: 1
aggregate: src_host, dst_host, src_port, dst_port, proto, timestamp_start, timestamp_end
"""


def test_nfacctd_reads_every_field(tmp_path):
    port, out = free_port(socket.SOCK_DGRAM), tmp_path / "flows.json"
    config = tmp_path / "nfacctd.conf"
    config.write_text(NFACCTD_CONFIG.format(port=port, out=out))
    nfacctd = subprocess.Popen(["nfacctd", "-f", str(config)], env=UTC,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_udp_listener(port, nfacctd)
        asyncio.run(_export_udp(port))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(_lines(out)) < len(RECORDS):
            time.sleep(0.2)
    finally:
        _stop(nfacctd, signal.SIGINT)
    flows = {(f["ip_src"], f["ip_dst"]): f for f in map(json.loads, _lines(out))}
    assert len(flows) == len(RECORDS)
    for record in RECORDS:
        flow = flows[key(record)]
        assert (flow["packets"], flow["bytes"]) == (record.packet_delta, record.octet_delta)
        assert flow["timestamp_start"] == utc_text(record.start_ms) + "000"
        assert flow["timestamp_end"] == utc_text(record.end_ms) + "000"
        if record.protocol not in (1, 58):
            assert (flow["port_src"], flow["port_dst"]) == (record.source_port,
                                                            record.destination_port)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _ipfixdump_records(path: Path) -> list[dict[str, str]]:
    """ipfixDump's text: one dict per data record, '(id)' or '(pen/id)' -> the value shown."""
    out = subprocess.run(["ipfixDump", "--data", "--in", str(path)], env=UTC,
                         capture_output=True, text=True, check=True).stdout
    records: list[dict[str, str]] = []
    for line in out.splitlines():
        if line.startswith("--- data record"):
            records.append({})
        match = re.match(r"\s+\(([\d/]+)\)\s+\S+ : (.*)$", line)
        if match and records:
            records[-1][match[1]] = match[2].strip()
    return records


def test_ipfixdump_reads_every_field(tmp_path):
    encoder = MessageEncoder(77)
    data = [(template_for(r).template, [template_for(r).encode(r)]) for r in RECORDS]
    messages = encoder.template_messages(ALL_TEMPLATES, END_MS // 1000) + \
        encoder.data_messages(data, END_MS // 1000)
    path = tmp_path / "export.ipfix"
    path.write_bytes(b"".join(messages))
    shown = _ipfixdump_records(path)
    assert len(shown) == len(RECORDS)
    for record, fields in zip(RECORDS, shown):
        v6 = record.ipv6
        # (ipfixDump prints IPv6 groups zero-padded: compare addresses, not texts)
        assert ip_address(fields["27" if v6 else "8"]) == ip_address(record.source_address)
        assert ip_address(fields["28" if v6 else "12"]) == ip_address(
            record.destination_address)
        assert fields["4"] == str(record.protocol)
        assert fields["7"] == str(record.source_port)
        assert fields["11"] == str(record.destination_port)
        assert fields["150"] == utc_text(record.start_ms)[:-4]
        assert fields["151"] == utc_text(record.end_ms)[:-4]
        assert fields["152"] == utc_text(record.start_ms)
        assert fields["153"] == utc_text(record.end_ms)
        assert fields["136"] == str(record.end_reason)
        assert fields["86"] == str(record.packets)
        assert fields["85"] == str(record.octets)
        assert fields["2"] == str(record.packet_delta)
        assert fields["1"] == str(record.octet_delta)
        # ICMP: the combined element and the separate type and code elements agree
        assert fields["139" if v6 else "32"] == str(record.icmp_type * 256 + record.icmp_code)
        assert fields["178" if v6 else "176"] == str(record.icmp_type)
        assert fields["179" if v6 else "177"] == str(record.icmp_code)
        if record.kind == CONNTRACK:
            assert fields["29305/86"] == str(record.reverse_packets)
            assert fields["29305/85"] == str(record.reverse_octets)
            assert fields["29305/2"] == str(record.reverse_packet_delta)
            assert fields["29305/1"] == str(record.reverse_octet_delta)
            assert fields["56506/137"] == str(record.flow_type)  # flowType
            assert fields["56506/136"] == f"len: {len(record.tcp_state)}"  # tcpState
        else:
            assert fields["56506/139"] == str(RULE_DROP)  # ingressNetworkPolicyRuleAction
            assert fields["56506/140"] == str(RULE_DROP)
            assert fields["56506/141"] == f"len: {len(record.ingress_rule_name)}"


@pytest.fixture(autouse=True)
def _tools_installed():
    """scripts/setup installs them (nfdump, pmacct, libfixbuf-tools): a missing one is a
    setup failure, not a reason to skip."""
    for tool in ("nfcapd", "nfdump", "nfacctd", "ipfixDump"):
        assert subprocess.run(["which", tool], capture_output=True).returncode == 0, tool
