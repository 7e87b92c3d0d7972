"""Counters zeroed under the store by `conntrack -L -z` (an operator's routine command), with
the real kernel conntrack in a network namespace, read by the kernel source as the agent
reads it."""

import json
import sys

import pytest

from lab.netns import Netns

SCENARIO = """
import asyncio, json, socket, subprocess, sys
from ovsflow.filter import ConnectionFilter
from ovsflow.protocol_list import parse_protocol_list
from ovsflow.source.kernel import KernelSource, probe_filters
from ovsflow.store import ConnectionStore
from helpers import flow_records

source = KernelSource(ConnectionFilter(frozenset({65520}), parse_protocol_list(["udp"]).protocols),
                      probe_filters())
store = ConnectionStore(active_timeout=1.0, idle_timeout=100.0)
server, client = socket.socket(type=socket.SOCK_DGRAM), socket.socket(type=socket.SOCK_DGRAM)
server.bind(("127.0.0.1", 0))
client.bind(("127.0.0.1", 0))

def exchange(count, size):
    for _ in range(count):
        client.sendto(b"x" * size, server.getsockname())
        data, peer = server.recvfrom(65536)
        server.sendto(data + data, peer)
        client.recv(65536)

def poll(now):
    records = flow_records(asyncio.run(source.update(store, now)))
    return [{"packets": r.packets, "octets": r.octets, "packet_delta": r.packet_delta,
             "octet_delta": r.octet_delta, "reverse_packet_delta": r.reverse_packet_delta,
             "reverse_octet_delta": r.reverse_octet_delta, "reverse_octets": r.reverse_octets,
             "sport": r.source_port} for r in records]

def conntrack_list():
    text = subprocess.run(["conntrack", "-L", "-p", "udp", "--sport",
                           str(client.getsockname()[1])], capture_output=True, text=True,
                          check=True).stdout
    fields = text.split()
    return [int(f.split("=")[1]) for f in fields if f.startswith(("packets=", "bytes="))]

exchange(10, 100)
report = {"polls": [poll(0.0), poll(1.0)], "sport": client.getsockname()[1]}
subprocess.run(["conntrack", "-L", "-z"], capture_output=True, check=True)
exchange(3, 50)
report["polls"].append(poll(2.0))
report["reference"] = conntrack_list()
print(json.dumps(report))
"""


@pytest.fixture
def namespace():
    ns = Netns("ctreset")
    try:
        ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1",
               "net.netfilter.nf_conntrack_timestamp=1")
        for chain in ("OUTPUT", "PREROUTING"):
            ns.run("iptables", "-t", "raw", "-A", chain, "-j", "CT", "--zone", "65520")
        yield ns
    finally:
        ns.delete()


def test_zeroed_counters_give_the_new_totals_as_deltas(namespace):
    code = f"import sys; sys.path[:0] = {sys.path!r}\n" + SCENARIO
    report = json.loads(namespace.run(sys.executable, "-c", code).stdout)
    before, first, after_reset = report["polls"]
    assert before == []
    # 10 datagrams of 100 bytes each way (+ 28 bytes of IP and UDP headers), 200 back
    [record] = first
    assert record["sport"] == report["sport"]
    assert (record["packet_delta"], record["octet_delta"]) == (10, 10 * 128)
    assert (record["reverse_packet_delta"], record["reverse_octet_delta"]) == (10, 10 * 228)
    # zeroed, then 3 datagrams of 50 bytes: the deltas are the new totals, not 3 - 10
    [record] = after_reset
    assert (record["packets"], record["packet_delta"]) == (3, 3)
    assert (record["octets"], record["octet_delta"]) == (3 * 78, 3 * 78)
    assert (record["reverse_packet_delta"], record["reverse_octet_delta"]) == (3, 3 * 128)
    # ... and they are what conntrack itself reports: packets, bytes each way
    assert report["reference"] == [3, 3 * 78, 3, 3 * 128]
