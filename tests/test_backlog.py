"""A collector's waiting records, at most one per connection (ovsflow/exporter/backlog.py):
a newer record of a connection takes in the deltas of its older waiting one; records on
their way out are never changed; what is put back folds again; end records and records
without identity fold into nothing and are what the bound counts. Records are made with
ovsflow's encoder and read back with ovsflow's decoder (tests/helpers.flow_records); the
sums at an independent decoder are checked end to end (test_delivery.py)."""

import gc
import socket
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import flow_records
from ovsflow.exporter import encode_records
from ovsflow.exporter.backlog import POSITION, SHIFT, Backlog
from ovsflow.exporter.queue import ExportQueue, records_of
from ovsflow.record import (
    ACTIVE_TIMEOUT, CONNTRACK, CONNTRACK_UNCOUNTED, DENY, END_OF_FLOW, IDLE_TIMEOUT, FlowRecord,
)

A, B = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")
A6 = socket.inet_pton(socket.AF_INET6, "fd00::1")


def record(port, delta, total=None, reason=ACTIVE_TIMEOUT, kind=CONNTRACK, identity=None,
           source=A):
    total = delta if total is None else total
    return FlowRecord(kind, source, B if len(source) == 4 else A6, 6, port, 80,
                      end_reason=reason, packets=total, octets=10 * total,
                      packet_delta=delta, octet_delta=10 * delta, reverse_packets=total,
                      reverse_octets=20 * total, reverse_packet_delta=delta,
                      reverse_octet_delta=20 * delta, flow_id=port,
                      identity=f"conn-{port}".encode() if identity is None else identity)


def waiting(backlog):
    """(port, reason, packet delta, octet delta, reverse octet delta, packet total) of each
    waiting record, in order."""
    found = []
    for batch in backlog.frozen():
        found += [(r.source_port, r.end_reason, r.packet_delta, r.octet_delta,
                   r.reverse_octet_delta, r.packets) for r in flow_records([records_of(batch)])]
    return found


def test_a_newer_record_takes_in_the_older_ones_deltas():
    backlog = Backlog()
    assert backlog.append(encode_records([record(1, 3), record(2, 5)])) == 0
    assert backlog.append(encode_records([record(1, 4, total=7), record(3, 1)])) == 1
    assert backlog.waiting == 3 and backlog.unmergeable == 0
    assert sorted(waiting(backlog)) == [(1, ACTIVE_TIMEOUT, 7, 70, 140, 7),
                                        (2, ACTIVE_TIMEOUT, 5, 50, 100, 5),
                                        (3, ACTIVE_TIMEOUT, 1, 10, 20, 1)]
    # the newest waits where it was queued: after the older records still waiting
    assert [port for port, *_ in waiting(backlog)] == [2, 1, 3]


def test_folding_changes_only_this_collectors_copy():
    shared = encode_records([record(1, 4, total=7)])
    before = [bytes(data) for _, data, _ in shared.groups]
    backlog = Backlog()
    backlog.append(encode_records([record(1, 3)]))
    backlog.append(shared)
    assert waiting(backlog) == [(1, ACTIVE_TIMEOUT, 7, 70, 140, 7)]
    assert [bytes(data) for _, data, _ in shared.groups] == before  # the other collectors'
    assert [r.packet_delta for r in flow_records([shared])] == [4]


def test_a_wave_per_poll_for_a_long_outage_keeps_one_record_per_connection():
    backlog = Backlog()
    for poll in range(1, 31):
        backlog.append(encode_records([record(port, port, total=port * poll)
                                       for port in range(1, 201)]))
        assert backlog.waiting == 200
    assert sorted(waiting(backlog)) == [(port, ACTIVE_TIMEOUT, 30 * port, 300 * port,
                                         600 * port, 30 * port) for port in range(1, 201)]
    assert len(backlog.batches) == 1 and len(backlog.index) == 200


def test_an_end_record_takes_in_the_last_active_one_and_then_folds_into_nothing():
    backlog = Backlog()
    backlog.append(encode_records([record(1, 3)]))
    backlog.append(encode_records([record(1, 2, total=5, reason=END_OF_FLOW)]))
    assert backlog.unmergeable == 1 and not backlog.index
    # a connection reusing the key (no start time to tell them apart): a record of its own
    backlog.append(encode_records([record(1, 9)]))
    assert waiting(backlog) == [(1, END_OF_FLOW, 5, 50, 100, 5),
                                (1, ACTIVE_TIMEOUT, 9, 90, 180, 9)]


def test_records_without_identity_never_fold():
    backlog = Backlog()
    backlog.append(encode_records([record(1, 3, identity=b"")]))
    backlog.append(encode_records([record(1, 4, identity=b"")]))
    assert backlog.waiting == 2 and backlog.unmergeable == 2 and not backlog.index


def test_deny_idle_records_end_their_entry_conntrack_idle_ones_do_not():
    backlog = Backlog()
    backlog.append(encode_records([record(1, 3, kind=DENY, reason=IDLE_TIMEOUT),
                                   record(2, 3, reason=IDLE_TIMEOUT)]))
    assert backlog.unmergeable == 1
    backlog.append(encode_records([record(1, 1, kind=DENY), record(2, 1, total=4)]))
    assert sorted(waiting(backlog)) == [(1, IDLE_TIMEOUT, 3, 30, 0, 3),
                                        (1, ACTIVE_TIMEOUT, 1, 10, 0, 1),
                                        (2, ACTIVE_TIMEOUT, 4, 40, 80, 4)]


def test_records_on_their_way_out_are_never_changed_and_fold_again_when_put_back():
    backlog = Backlog()
    backlog.append(encode_records([record(1, 3), record(2, 5)]))
    flight = backlog.take_front()
    flown = [bytes(data) for _, data, _ in flight.groups]
    assert not backlog and not backlog.index
    backlog.append(encode_records([record(1, 4, total=7)]))
    assert [bytes(data) for _, data, _ in flight.groups] == flown
    assert waiting(backlog) == [(1, ACTIVE_TIMEOUT, 4, 40, 80, 7)]
    # the session ended without taking it: record 1 joins its newer record, 2 waits first
    assert backlog.prepend(flight) == 1
    assert waiting(backlog) == [(2, ACTIVE_TIMEOUT, 5, 50, 100, 5),
                                (1, ACTIVE_TIMEOUT, 7, 70, 140, 7)]


def test_the_bound_drops_only_what_cannot_fold():
    queue = ExportQueue(max_buffered=2, stall_timeout=1.0)
    queue.reachable = False
    ended = [record(port, 1, reason=END_OF_FLOW) for port in range(100, 105)]
    queue.submit([encode_records([record(1, 3), *ended[:3], record(2, 1)])])
    queue.submit([encode_records([record(1, 1, total=4), *ended[3:]])])
    assert queue.stats.records_dropped == 3
    assert sorted(waiting(queue.backlog)) == [(1, ACTIVE_TIMEOUT, 4, 40, 80, 4),
                                              (2, ACTIVE_TIMEOUT, 1, 10, 20, 1),
                                              (103, END_OF_FLOW, 1, 10, 20, 1),
                                              (104, END_OF_FLOW, 1, 10, 20, 1)]
    stats = queue.stats
    assert stats.records_submitted == (stats.records_folded + stats.records_dropped
                                       + queue.queued)


def test_live_records_over_their_own_bound_are_dropped_oldest_first():
    queue = ExportQueue(max_buffered=10, stall_timeout=1.0, max_waiting_live=2)
    queue.reachable = False
    queue.submit([encode_records([record(port, 1) for port in (1, 2, 3)])])
    assert [port for port, *_ in waiting(queue.backlog)] == [2, 3]
    assert queue.stats.records_dropped == 1 and set(queue.backlog.index) == {
        b"conn-2", b"conn-3"}


def test_records_of_one_poll_are_indexed_only_once_a_newer_poll_begins():
    """A collector that keeps up never pays for the index: a poll's records wait, are
    taken off, and nothing was indexed; those still waiting when the next poll begins are,
    and the next poll's records fold into them."""
    backlog = Backlog()
    backlog.new_generation()
    backlog.append(encode_records([record(port, 1) for port in range(100)]))
    backlog.append(encode_records([record(port, 1) for port in range(100, 200)]))
    assert not backlog.index
    backlog.take_front()
    backlog.new_generation()
    assert backlog.append(encode_records([record(port, 2, total=3)
                                          for port in range(0, 200, 2)])) == 50
    assert len(backlog.index) == 100 and backlog.waiting == 150  # the new poll's 50 that
    # took in an older record, and the 50 older ones still waiting
    assert sorted(waiting(backlog))[-2:] == [(198, ACTIVE_TIMEOUT, 3, 30, 60, 3),
                                             (199, ACTIVE_TIMEOUT, 1, 10, 20, 1)]


def test_a_queue_keeps_nothing_of_the_batches_that_left_it():
    """A poll's batches wait for the next poll to be indexed; those taken off meanwhile are
    the flight's alone (at 500k a wave's bytes, 65 MB, were kept to the next poll)."""
    backlog = Backlog()
    backlog.new_generation()
    tracemalloc.start()
    for first in range(0, 20_000, 2_000):
        backlog.append(encode_records([record(port, 1) for port in range(first, first + 2_000)]))
    gc.collect()
    queued = tracemalloc.get_traced_memory()[0]
    flown = [backlog.take_front() for _ in range(10)]
    del flown
    gc.collect()
    left = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert not backlog and queued - left > 20_000 * 100  # the records' bytes went with them
    backlog.new_generation()
    backlog.append(encode_records([record(1, 1)]))
    assert backlog.waiting == 1 and not backlog.index


def test_a_batch_mostly_folded_away_keeps_only_its_waiting_bytes():
    backlog = Backlog()
    backlog.append(encode_records([record(port, 1) for port in range(1000)]))
    backlog.append(encode_records([record(port, 1, total=2) for port in range(10, 1000)]))
    first = backlog.batches[0]
    assert first.waiting == 10 and len(first.alive) == 10  # compacted
    assert sum(len(data) for _, data, _ in first.groups) < 10 * 200
    assert sorted(waiting(backlog))[:11] == [(port, ACTIVE_TIMEOUT, 1, 10, 20, 1)
                                             for port in range(10)] + [
        (10, ACTIVE_TIMEOUT, 2, 20, 40, 2)]
    backlog.append(encode_records([record(port, 5, total=6) for port in range(10)]))
    assert backlog.waiting == 1000 and len(backlog.batches) == 2


def test_records_of_many_lengths_in_one_group_fold_each_into_its_own():
    """Names of different lengths (Pods, rules) give a group's records different lengths:
    the counters are found in each run of one length; a template without counters (OVS
    userspace conntrack) folds by the newer standing for the older."""
    def named(port, delta, total, name):
        r = record(port, delta, total, kind=DENY)
        r.ingress_rule_name = name
        return r
    backlog = Backlog()
    backlog.append(encode_records([named(port, port, port, "r" * (port % 7))
                                   for port in range(1, 40)]
                                  + [record(port, 0, kind=CONNTRACK_UNCOUNTED)
                                     for port in range(100, 103)]))
    backlog.append(encode_records([named(port, 1, port + 1, "x" * (port % 5))
                                   for port in range(39, 0, -1)]
                                  + [record(port, 0, kind=CONNTRACK_UNCOUNTED)
                                     for port in range(100, 103)]))
    assert sorted(waiting(backlog)) == sorted(
        [(port, ACTIVE_TIMEOUT, port + 1, 10 * (port + 1), 0, port + 1)
         for port in range(1, 40)] + [(port, ACTIVE_TIMEOUT, 0, 0, 0, 0)
                                      for port in range(100, 103)])
    assert backlog.waiting == 42


def test_other_templates_of_one_identity_wait_side_by_side():
    """Never made so (a connection keeps its template), but a queue must not mix them."""
    backlog = Backlog()
    backlog.append(encode_records([record(1, 3, kind=CONNTRACK_UNCOUNTED)]))
    backlog.append(encode_records([record(1, 4)]))
    assert backlog.waiting == 2 and backlog.unmergeable == 1
    assert backlog.take_front() and backlog.take_front() and not backlog.index


def test_an_identity_twice_in_one_batch_waits_twice():
    backlog = Backlog()
    backlog.append(encode_records([record(1, 3)]))
    backlog.append(encode_records([record(1, 4), record(1, 5, total=12)]))
    assert sorted(waiting(backlog)) == [(1, ACTIVE_TIMEOUT, 4, 40, 80, 4),
                                        (1, ACTIVE_TIMEOUT, 8, 80, 160, 12)]
    assert backlog.unmergeable == 1
    assert list(backlog.index) == [b"conn-1"]


def test_ipv4_and_ipv6_records_fold_each_into_its_own():
    backlog = Backlog()
    backlog.append(encode_records([record(1, 3), record(2, 3, source=A6)]))
    backlog.append(encode_records([record(2, 1, total=4, source=A6), record(1, 1, total=4)]))
    assert sorted(waiting(backlog)) == [(1, ACTIVE_TIMEOUT, 4, 40, 80, 4),
                                        (2, ACTIVE_TIMEOUT, 4, 40, 80, 4)]


@settings(max_examples=100, deadline=None)
@given(st.booleans(), st.lists(st.one_of(
    st.tuples(st.just("append"), st.lists(st.tuples(st.integers(0, 12), st.integers(1, 9),
                                                    st.booleans()), max_size=8)),
    st.tuples(st.just("fly"), st.booleans()),
    st.tuples(st.just("poll"), st.none()))))
def test_whatever_happens_each_connection_is_delivered_exactly(polls, steps):
    """Records queued, taken off, delivered or put back, in any order, with polls said
    (`polls`: the index takes batches lazily) or not: what is delivered and what still
    waits add up to what was made, per connection; each index entry names a waiting record
    of its own; without polls said, a connection has at most one waiting record that can
    fold."""
    backlog, made, delivered = Backlog(), {}, {}
    if polls:
        backlog.new_generation()
    in_flight = None
    ended = set()
    for step, value in steps:
        if step == "poll":
            if polls:
                backlog.new_generation()
        elif step == "append":
            batch, seen = [], set()
            for port, delta, end in value:
                if port in ended or port in seen:
                    continue
                seen.add(port)
                made[port] = made.get(port, 0) + delta
                batch.append(record(port, delta, reason=END_OF_FLOW if end else ACTIVE_TIMEOUT))
                if end:
                    ended.add(port)
            if batch:
                backlog.append(encode_records(batch))
        elif in_flight is None and backlog:
            in_flight = backlog.take_front()
        elif in_flight is not None:
            if value:  # delivered
                for r in flow_records([in_flight]):
                    delivered[r.source_port] = delivered.get(r.source_port, 0) + r.packet_delta
            else:
                backlog.prepend(in_flight)
            in_flight = None
        live = [(port, reason) for port, reason, *_ in waiting(backlog)
                if reason == ACTIVE_TIMEOUT]
        indexed = {backlog.by_serial[ticket >> SHIFT].identities[ticket & POSITION]
                   for ticket in backlog.index.values()}
        assert indexed == set(backlog.index)  # each entry names a waiting record of its own
        if not polls:
            assert len(live) == len(set(live)) == len(backlog.index)
    if in_flight is not None:
        backlog.prepend(in_flight)
    for port, _, delta, *_ in waiting(backlog):
        delivered[port] = delivered.get(port, 0) + delta
    assert delivered == made
    assert backlog.waiting == sum(batch.waiting for batch in backlog.batches)
    assert backlog.unmergeable == sum(int(np.count_nonzero(b.alive & ~b.mergeable))
                                      for b in backlog.batches)


@pytest.mark.parametrize("count", [1, 5000])
def test_a_flight_put_back_after_part_was_delivered_folds_the_rest(count):
    queue = ExportQueue(max_buffered=10, stall_timeout=1.0)
    queue.submit([encode_records([record(port, 1) for port in range(count)])])
    from ovsflow.exporter.session import Session
    flight = queue.take_off(Session(1, 1400), 0)
    queue.delivered()  # the first message reached the kernel
    first = flight.counts[0]
    queue.submit([encode_records([record(port, 2, total=3) for port in range(count)])])
    queue.put_back()
    deltas = {r.source_port: r.packet_delta for r in flow_records(
        [records_of(b) for b in queue.backlog.frozen()])}
    assert deltas == {port: 2 if port < first else 3 for port in range(count)}
    assert queue.stats.records_exported == first


def test_a_record_a_collector_missed_reaches_it_though_its_connection_says_nothing_more():
    """A record is made only when it says something (docs/ipfix.md § When a record is sent),
    decided once for all collectors: a connection that stops moving while its collector is
    away gets no new record, and the one waiting, which took in the earlier one's deltas,
    is what the collector receives when it is back, with every packet conntrack counted."""
    from test_state import conn

    from ovsflow.store import ConnectionStore
    store = ConnectionStore(5.0, 1e9)
    queue = ExportQueue(max_buffered=10, stall_timeout=1.0)
    queue.reachable = False
    made = []
    for now, packets in ((0.0, 10), (5.0, 12), (10.0, 15), (15.0, 15), (20.0, 15)):
        queue.new_poll()
        batches = store.update([conn(1, packets)], now)
        made.append(sum(map(len, batches)))
        queue.submit(batches)
    assert made == [0, 1, 1, 0, 0]  # its first record, one more while it moved, then none
    [left] = flow_records([records_of(part) for part in queue.snapshot()])
    assert (left.packet_delta, left.octet_delta, left.reverse_octet_delta, left.packets) == (
        15, 1500, 3000, 15)
    assert queue.stats.records_folded == 1 and queue.stats.records_dropped == 0
