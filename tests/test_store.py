"""The connection store's export decisions, poll by poll (pure logic: no I/O to fake)."""

import socket

from hypothesis import given, settings, strategies as st

from ovsflow.record import (
    ACTIVE_TIMEOUT, CONNTRACK, CONNTRACK_UNCOUNTED, END_OF_FLOW, FORCED_END, IDLE_TIMEOUT,
)
from ovsflow.connection import Connection
from ovsflow.source.ctnetlink import IPS_DYING
from ovsflow.store import ConnectionStore

A, B = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")


def conn(sport=1000, packets=0, octets=0, *, conn_id=1, state="ESTABLISHED", status=0,
         counted=True, protocol=6, zone=65520):
    return Connection(protocol, A, B, sport, 80, B, A, 80, sport, zone=zone, state=state,
                      status=status, packets=packets, octets=octets, reply_packets=packets,
                      reply_octets=octets * 2, counted=counted, id=conn_id,
                      start_ns=1_000_000_000_000 if counted else 0)


def store(active=5.0, idle=15.0, **kwargs):
    return ConnectionStore(active, idle, **kwargs)


def test_a_new_connection_is_exported_at_its_active_timeout_with_deltas():
    s = store()
    assert s.update([conn(packets=1, octets=100)], 0.0) == []
    assert s.update([conn(packets=3, octets=300)], 4.9) == []
    [record] = s.update([conn(packets=5, octets=500)], 5.0)
    assert record.end_reason == ACTIVE_TIMEOUT and record.kind == CONNTRACK
    assert (record.packets, record.octets, record.packet_delta, record.octet_delta) == (
        5, 500, 5, 500)
    assert (record.reverse_octets, record.reverse_octet_delta) == (1000, 1000)
    assert (record.start_ms, record.end_ms, record.start_seconds) == (1_000_000, 5000, 1000)
    assert record.tcp_state == "ESTABLISHED" and record.flow_id == 1
    [record] = s.update([conn(packets=9, octets=900)], 10.0)
    assert (record.packet_delta, record.octet_delta, record.octets) == (4, 400, 900)


def test_idle_connection_is_exported_once_then_again_when_it_moves():
    s = store(active=100, idle=15)
    s.update([conn(packets=1, octets=10)], 0.0)
    assert s.update([conn(packets=1, octets=10)], 14.0) == []
    [idle] = s.update([conn(packets=1, octets=10)], 15.0)
    assert idle.end_reason == IDLE_TIMEOUT and idle.octet_delta == 10
    for t in (20.0, 40.0, 60.0):  # still in conntrack, still idle: nothing more
        assert s.update([conn(packets=1, octets=10)], t) == []
    s.update([conn(packets=2, octets=30)], 61.0)  # moves again
    [again] = s.update([conn(packets=2, octets=30)], 76.0)
    assert again.end_reason == IDLE_TIMEOUT and again.octet_delta == 20


def test_a_connection_gone_between_polls_gets_a_final_record_with_its_last_counters():
    s = store()
    s.update([conn(packets=2, octets=200)], 0.0)
    s.update([conn(packets=4, octets=400)], 1.0)
    [final] = s.update([], 2.0)
    assert final.end_reason == END_OF_FLOW
    assert (final.octets, final.octet_delta, final.end_ms) == (400, 400, 1000)
    assert len(s) == 0 and s.update([], 3.0) == []


def test_time_wait_ends_the_flow_once():
    s = store()
    s.update([conn(packets=2)], 0.0)
    [end] = s.update([conn(packets=6, state="TIME_WAIT")], 1.0)
    assert end.end_reason == END_OF_FLOW and end.packet_delta == 6
    assert end.tcp_state == "TIME_WAIT"
    for t in (2.0, 10.0, 30.0):
        assert s.update([conn(packets=6, state="TIME_WAIT")], t) == []
    assert s.update([], 31.0) == []  # its disappearance adds nothing


def test_dying_status_ends_the_flow():
    s = store()
    s.update([conn(protocol=17, state="")], 0.0)
    [end] = s.update([conn(protocol=17, state="", status=IPS_DYING, packets=1)], 1.0)
    assert end.end_reason == END_OF_FLOW and end.tcp_state == ""


def test_same_tuple_new_conntrack_entry_ends_the_old_one():
    s = store()
    s.update([conn(packets=5, octets=50, conn_id=1)], 0.0)
    [old] = s.update([conn(packets=1, octets=10, conn_id=2)], 1.0)
    assert old.end_reason == END_OF_FLOW and old.flow_id == 1 and old.octets == 50
    [new] = s.update([conn(packets=1, octets=10, conn_id=2)], 6.0)
    assert new.flow_id == 2 and new.octet_delta == 10


def test_the_store_is_bounded_and_counts_what_it_could_not_track(caplog):
    s = store(max_connections=3)
    assert s.update([conn(sport=p) for p in range(5)], 0.0) == []
    assert len(s) == 3 and s.rejected == 2
    assert "2 new connections not tracked" in caplog.text


def test_flush_gives_live_connections_a_forced_end():
    s = store()
    s.update([conn(sport=1, packets=1), conn(sport=2, packets=2, state="TIME_WAIT")], 0.0)
    records = s.flush(3.0)
    assert [(r.source_port, r.end_reason) for r in records] == [(1, FORCED_END)]
    assert len(s) == 0


def test_uncounted_connections_use_their_own_template_and_first_seen_time():
    s = store()
    s.update([conn(counted=False)], 100.0)
    [record] = s.update([conn(counted=False)], 105.0)
    assert record.kind == CONNTRACK_UNCOUNTED and record.start_ms == 100_000
    assert record.end_reason == ACTIVE_TIMEOUT  # present in every poll counts as active


def test_one_heap_item_per_connection():
    s = store(active=1, idle=2)
    connections = [conn(sport=p, packets=1) for p in range(100)]
    for t in range(20):
        s.update([conn(sport=c.source_port, packets=t) for c in connections], float(t))
        assert len(s._heap) <= len(s)


@settings(max_examples=200)
@given(st.lists(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 3)), max_size=4),
                min_size=1, max_size=25),
       st.sampled_from([(1.0, 2.0), (3.0, 1.0), (5.0, 15.0)]))
def test_deltas_always_add_up_to_the_totals(polls, timeouts):
    """Any sequence of polls (connections appearing, growing, vanishing): for every
    connection the deltas exported sum to its last totals, and no delta is negative."""
    s = store(*timeouts)
    totals: dict[int, int] = {}
    exported: dict[int, int] = {}
    last: dict[int, int] = {}
    for t, poll in enumerate(polls):
        seen = {}
        for port, growth in poll:
            totals[port] = totals.get(port, 0) + growth if port in last else growth
            seen[port] = totals[port]
        records = s.update([conn(sport=p, packets=n, octets=n) for p, n in seen.items()],
                           float(t))
        for r in records:
            assert r.packet_delta >= 0
            exported[r.source_port] = exported.get(r.source_port, 0) + r.packet_delta
            if r.end_reason == END_OF_FLOW:
                assert exported.pop(r.source_port) == last[r.source_port]
        for port in list(last):
            if port not in seen:
                del last[port]
        last.update(seen)
        for port in [p for p in totals if p not in seen]:
            del totals[port]
    for r in s.flush(float(len(polls))):
        exported[r.source_port] = exported.get(r.source_port, 0) + r.packet_delta
        assert exported.pop(r.source_port) == last[r.source_port]
