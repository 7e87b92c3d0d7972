"""IPFIX encode throughput, in process, for a realistic mix of records (one in ten IPv6; TCP
states that repeat; a quarter with Pod names, some with rule names).

The conntrack path (the target's): the connection store writes due records straight from
its columns as template rows (`RecordMaker.emit`, timed here on a store holding the
mix, every connection due: deltas, times, the cached runs of strings, the rows), alone and
then cut into messages of at most 1472 bytes (UDP over a 1500-byte MTU) or 65535 (TCP), as
the exporter cuts them at send time. The FlowRecord path (deny records): the records of each
template in bulk (`RecordTemplate.encode_many`), then cut into messages; per-record
`encode_record`, its fallback for a batch holding a bad value, for comparison.

References measured in the same run: one precompiled struct.pack per record of a fixed layout
as long as the IPv4 template's fixed fields, with the values already in a tuple and no message
framing (a lower bound on the time), and reading each record's values with the template's
attrgetter alone (what any encoder of FlowRecord objects pays). Target (issue 12, the
conntrack path): >= 2M records/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import socket
import time

import numpy as np

from ovsflow.connection import Connection, identity, labels_bytes
from ovsflow.enrich import Enricher, PodNetworks
from ovsflow.ipfix.messages import MessageEncoder
from ovsflow.ipfix.templates import template_for
from ovsflow.pods import POD_PORT, PodMap
from ovsflow.record import ACTIVE_TIMEOUT, CONNTRACK, RULE_ALLOW, FlowRecord
from ovsflow.store import ConnectionStore

TARGET = 2_000_000
STATES = ["ESTABLISHED"] * 7 + ["TIME_WAIT", "SYN_SENT", "CLOSE"]


def make_records(count: int) -> list[FlowRecord]:
    records = []
    for i in range(count):
        ipv6 = i % 10 == 9
        source = (0x0A000000 + i).to_bytes(16 if ipv6 else 4, "big")
        record = FlowRecord(CONNTRACK, source, bytes(15 if ipv6 else 3) + b"\x01", 6,
                            1024 + i % 60000, 80, start_ms=1_700_000_000_000 + i,
                            end_ms=1_700_000_005_000 + i, start_seconds=1_700_000_000,
                            end_seconds=1_700_000_005, end_reason=2, packets=i,
                            octets=i * 100, packet_delta=i % 7, octet_delta=i % 7 * 100,
                            reverse_packets=i // 2, reverse_octets=i * 50, flow_id=i,
                            tcp_state=STATES[i % len(STATES)])
        if i % 4 == 0:  # a Pod of this node
            record.source_pod_name = f"web-7d9c5b6f4-{i % 40:05d}"
            record.source_pod_namespace = "default"
            record.source_node_name = "node-1"
        if i % 20 == 0:
            record.ingress_rule_name, record.ingress_rule_action = "allow-http", RULE_ALLOW
        records.append(record)
    return records


def make_store(records: list[FlowRecord]) -> ConnectionStore:
    """A store tracking the connections of `records`, with their Pods in its Pod map (fed
    as its OVSDB thread feeds it) and their rules in their labels."""
    pods = PodMap("unix:/nonexistent")  # never started: filled below
    for record in records:
        if record.source_pod_name:
            pods._learn(record.source_pod_name, record.source_pod_name,
                        {"antrea-type": POD_PORT, "pod-name": record.source_pod_name,
                         "pod-namespace": record.source_pod_namespace,
                         "ip-address": socket.inet_ntop(
                             socket.AF_INET6 if record.ipv6 else socket.AF_INET,
                             record.source_address)})
    store = ConnectionStore(1.0, 100.0, max_connections=len(records),
                            enricher=Enricher(pods, "node-1", PodNetworks()))
    store.update([Connection(6, r.source_address, r.destination_address, r.source_port,
                             r.destination_port, state=r.tcp_state, packets=r.packets,
                             octets=r.octets, reply_packets=r.reverse_packets,
                             reply_octets=r.reverse_octets, id=r.flow_id,
                             start_ns=r.start_ms * 1_000_000,
                             labels=labels_bytes(20) if r.ingress_rule_name else b"",
                             key=identity(6, r.source_address, r.destination_address,
                                          r.source_port, r.destination_port, 0, 0, 0, 0))
                  for r in records], 0.0)
    return store


def encode_from_columns(store: ConnectionStore, max_size: int) -> None:
    made: list = []
    slots = np.arange(len(store))
    store.records.emit(slots, ACTIVE_TIMEOUT, 5.0, made)
    if max_size:
        encoder = MessageEncoder(1, max_size)
        for batch in made:
            encoder.joined_data_messages(batch.groups, 0)


def by_template(records: list[FlowRecord]) -> dict:
    groups: dict = {}
    for record in records:
        groups.setdefault(template_for(record), []).append(record)
    return groups


def encode_bulk(groups: dict, max_size: int) -> list[bytes]:
    return MessageEncoder(1, max_size).data_messages(
        [(t.template, t.encode_many(records)) for t, records in groups.items()], 0)


def encode_one_by_one(groups: dict, max_size: int) -> list[bytes]:
    return MessageEncoder(1, max_size).data_messages(
        [(t.template, [t.template.encode_record(t.values(r)) for r in records])
         for t, records in groups.items()], 0)


def read_values(groups: dict, max_size: int) -> None:
    for t, records in groups.items():
        list(map(t.values, records))


def lower_bound(records: list[FlowRecord]) -> float:
    layout = struct.Struct("!IIQQB4s4sHHBBBQQQQQQQQQB")
    tuples = [(1, 2, 3, 4, 2, r.source_address[:4], r.destination_address[:4], 1, 2, 6, 0, 0,
               1, 2, 3, 4, 5, 6, 7, 8, 9, 0) for r in records]
    start = time.perf_counter()
    for values in tuples:
        layout.pack(*values)
    return time.perf_counter() - start


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000, help="records per encode call, "
                        "as the exporter's BATCH")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    records = make_records(args.records)
    batches = [by_template(records[i:i + args.batch])
               for i in range(0, len(records), args.batch)]
    for groups in batches[:1]:  # the bulk encoder gives the bytes of the per-record one
        for t, group in groups.items():
            assert t.encode_many(group) == [t.encode(r) for r in group]
    print(f"machine: {os.cpu_count()} cpus, {args.records} records in batches of {args.batch}, "
          f"median of {args.runs} runs")
    store = make_store(records)
    store_cases = [("store rows (conntrack path)", 0), ("store rows, udp (1472 bytes)", 1472),
                   ("store rows, tcp (65535 bytes)", 65535)]
    cases = [("struct.pack lower bound", None, None),
             ("attrgetter alone (reference)", read_values, 0),
             ("per record, udp (1472 bytes)", encode_one_by_one, 1472),
             ("per record, tcp (65535 bytes)", encode_one_by_one, 65535),
             ("bulk, udp (1472 bytes)", encode_bulk, 1472),
             ("bulk, tcp (65535 bytes)", encode_bulk, 65535)]
    times: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    times.update({label: [] for label, _ in store_cases})
    for _ in range(args.runs):  # interleaved, so that a busy moment hits every case alike
        for label, function, size in cases:
            times[label].append(lower_bound(records) if function is None else
                                sum(timed(function, groups, size) for groups in batches))
        for label, size in store_cases:
            times[label].append(timed(encode_from_columns, store, size))
    bound = statistics.median(times["struct.pack lower bound"])
    for label, size in store_cases:
        rate = args.records / statistics.median(times[label])
        verdict = (f"  target >= {TARGET:,}: {'met' if rate >= TARGET else 'NOT met'}"
                   if not size else "")
        print(f"{label:<30} {rate:>12,.0f} records/s{verdict}", flush=True)
    reading = statistics.median(times["attrgetter alone (reference)"])
    for label, function, _ in cases:
        seconds = statistics.median(times[label])
        rate = args.records / seconds
        line = f"{label:<30} {rate:>12,.0f} records/s  ({bound / seconds:.2f}x the bound's rate"
        if function is encode_bulk:
            line += f", {reading / seconds:.2f}x attrgetter's)"
        else:
            line += ")"
        print(line, flush=True)


if __name__ == "__main__":
    main()
