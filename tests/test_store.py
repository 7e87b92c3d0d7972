"""The connection store's export decisions, poll by poll (pure logic: no I/O to fake). The
store writes records as IPFIX rows; the tests read them back with ovsflow's decoder."""

import os
import socket
from pathlib import Path

from hypothesis import given, settings, strategies as st

from ovsflow.record import (
    ACTIVE_TIMEOUT, CONNTRACK, CONNTRACK_UNCOUNTED, END_OF_FLOW, FORCED_END, IDLE_TIMEOUT,
)
from ovsflow.connection import Connection, identity, labels_bytes
from ovsflow.enrich import Enricher, PodNetworks
from ovsflow.pods import POD_PORT, PodMap
from ovsflow.record import BATCH
from ovsflow.store import MAX_SPANS, ConnectionStore
from ovsflow.store.memory import lazy_zeros

import numpy as np

from helpers import flow_records

A, B = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")


def conn(sport=1000, packets=0, octets=0, *, conn_id=1, state="ESTABLISHED", ended=False,
         counted=True, protocol=6, zone=65520, labels=b""):
    return Connection(protocol, A, B, sport, 80, B, A, 80, sport, zone=zone, state=state,
                      labels=labels,
                      packets=packets, octets=octets, reply_packets=packets,
                      reply_octets=octets * 2, counted=counted, id=conn_id,
                      start_ns=1_000_000_000_000 if counted else 0, ended=ended,
                      key=identity(protocol, A, B, sport, 80, 0, 0, 0, zone))


class Store(ConnectionStore):
    """The store, its records decoded."""

    def update(self, connections, now):
        return flow_records(super().update(connections, now))

    def flush(self, now):
        return flow_records(super().flush(now))


def store(active=5.0, idle=15.0, **kwargs):
    return Store(active, idle, **kwargs)


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


def test_an_idle_connection_gets_its_first_record_and_its_idle_record_then_nothing():
    """Antrea's defaults (poll 5 s, active 5 s, idle 15 s) and a connection that never
    moves: its first record at 5 s, nothing at 10 s (it would say nothing new), its idle
    record at 15 s, then nothing for as long as it stays in conntrack."""
    s = store(active=5, idle=15)
    records = []
    for t in range(0, 121, 5):
        records += [(t, r.end_reason, r.packet_delta)
                    for r in s.update([conn(packets=3, octets=300)], float(t))]
    assert records == [(5, ACTIVE_TIMEOUT, 3), (15, IDLE_TIMEOUT, 0)]


def test_an_active_timeout_record_only_when_counters_moved_since_the_last_record():
    s = store(active=5, idle=100)
    growth = {2: 1, 7: 2, 20: 4}  # packets added at these seconds
    packets, records = 0, []
    for t in range(31):
        packets += growth.get(t, 0)
        records += [(t, r.end_reason, r.packet_delta)
                    for r in s.update([conn(packets=packets)], float(t))]
    # 5: the first; 10: moved at 7; 15: nothing new; 20: moved at 20; 25, 30: nothing
    assert records == [(5, ACTIVE_TIMEOUT, 1), (10, ACTIVE_TIMEOUT, 2),
                       (20, ACTIVE_TIMEOUT, 4)]


def test_without_counters_a_record_when_the_state_changed_or_packets_came():
    """The OVS userspace source keeps no counters: a connection moved when its remaining
    timeout was set back (packets came) or its TCP state changed."""
    s = store(active=5, idle=100)

    def polled(t, state="ESTABLISHED", refreshed_at=0):
        # OVS prints the seconds left; a packet sets them back to the state's timeout
        return [conn(counted=False, state=state)._replace(timeout=300 - (t - refreshed_at))]
    records = []
    for t in range(41):
        state = "FIN_WAIT" if t >= 12 else "ESTABLISHED"
        refreshed = 30 if t >= 30 else 0  # a packet at 30 s
        records += [(t, r.end_reason, r.tcp_state)
                    for r in s.update(polled(t, state, refreshed), float(t))]
    # 5: the first; 10: nothing to say; 12: its state changed, past its active timeout;
    # 30: a packet came
    assert records == [(5, ACTIVE_TIMEOUT, "ESTABLISHED"), (12, ACTIVE_TIMEOUT, "FIN_WAIT"),
                       (30, ACTIVE_TIMEOUT, "FIN_WAIT")]


def test_a_heartbeat_gives_every_live_connection_a_record_that_often():
    """`heartbeat` (flowExporter.heartbeatFlowExportTimeout): a record at least that often
    for a connection still in conntrack, quiet or not, with zero deltas when it did not
    move; the deltas still add up."""
    s = store(active=5, idle=15, heartbeat=30)
    records = []
    for t in range(0, 101, 5):
        packets = 3 if t < 60 else 5  # moves once, at 60 s
        records += [(t, r.end_reason, r.packet_delta)
                    for r in s.update([conn(packets=packets)], float(t))]
    assert records == [(5, ACTIVE_TIMEOUT, 3), (15, IDLE_TIMEOUT, 0),
                       (45, ACTIVE_TIMEOUT, 0),  # 30 s after the idle record
                       (60, ACTIVE_TIMEOUT, 2),  # it moved (active, not quiet any more)
                       (75, IDLE_TIMEOUT, 0)]  # then quiet again; next beat at 105
    assert sum(delta for _, _, delta in records) == 5


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
    [end] = s.update([conn(packets=6, state="TIME_WAIT", ended=True)], 1.0)
    assert end.end_reason == END_OF_FLOW and end.packet_delta == 6
    assert end.tcp_state == "TIME_WAIT"
    for t in (2.0, 10.0, 30.0):
        assert s.update([conn(packets=6, state="TIME_WAIT", ended=True)], t) == []
    assert s.update([], 31.0) == []  # its disappearance adds nothing


def test_the_sources_ended_flag_ends_the_flow():
    """The store reads no source's constants (IPS_DYING, state names): the flag is all."""
    s = store()
    s.update([conn(protocol=17, state="")], 0.0)
    [end] = s.update([conn(protocol=17, state="", ended=True, packets=1)], 1.0)
    assert end.end_reason == END_OF_FLOW and end.tcp_state == ""
    assert s.update([conn(state="TIME_WAIT", sport=7)], 2.0) == []  # a name alone: no end


def test_same_tuple_new_conntrack_entry_ends_the_old_one():
    s = store()
    s.update([conn(packets=5, octets=50, conn_id=1)], 0.0)
    [old] = s.update([conn(packets=1, octets=10, conn_id=2)], 1.0)
    assert old.end_reason == END_OF_FLOW and old.flow_id == 1 and old.octets == 50
    [new] = s.update([conn(packets=1, octets=10, conn_id=2)], 6.0)
    assert new.flow_id == 2 and new.octet_delta == 10


def test_a_retried_dump_that_repeats_a_reused_tuple_ends_the_old_entry_once():
    """ENOBUFS restarts a dump: the connections before the overflow come twice in one
    poll. A tuple whose conntrack entry was replaced must still end once, not twice."""
    s = store()
    s.update([conn(packets=5, conn_id=1)], 0.0)
    records = s.update([conn(packets=1, conn_id=2), conn(packets=1, conn_id=2)], 1.0)
    assert [(r.flow_id, r.end_reason) for r in records] == [(1, END_OF_FLOW)]
    [new] = s.update([conn(packets=2, conn_id=2)], 6.0)
    assert (new.flow_id, new.packet_delta) == (2, 2)


def test_a_new_connection_twice_in_one_piece_keeps_its_last_sighting():
    """A retried dump brings a new connection twice, having moved in between: the last
    sighting is what the store keeps, so the next poll that brings the same counters finds
    it quiet, and it gets its idle record on time."""
    s = store(active=100, idle=15)
    assert s.update([conn(packets=1, octets=10), conn(packets=3, octets=30)], 0.0) == []
    assert s.update([conn(packets=3, octets=30)], 10.0) == []
    [idle] = s.update([conn(packets=3, octets=30)], 15.0)
    assert (idle.end_reason, idle.packet_delta, idle.octet_delta) == (IDLE_TIMEOUT, 3, 30)


def test_a_connection_is_not_taken_for_new_when_the_poll_numbers_start_again():
    """Polls mark the slots they fill with their number, one byte: a connection filled at
    poll 1 is not taken for one filled again at poll 256, when the numbers start again
    (that would zero what was exported: the deltas would count from the start)."""
    s = store(active=100, idle=1e9)
    deltas = []
    for t in range(256):
        deltas += [r.packet_delta for r in s.update([conn(packets=t + 1)], float(t))]
    assert deltas == [101, 100]  # at 100 s and 200 s
    [end] = s.flush(256.0)
    assert (end.end_reason, end.packet_delta, end.packets) == (FORCED_END, 55, 256)


def test_the_store_is_bounded_and_counts_what_it_could_not_track(caplog):
    s = store(max_connections=3)
    assert s.update([conn(sport=p) for p in range(5)], 0.0) == []
    assert len(s) == 3 and s.rejected == 2
    assert "2 new connections not tracked" in caplog.text


def test_flush_gives_live_connections_a_forced_end():
    s = store()
    s.update([conn(sport=1, packets=1), conn(sport=2, packets=2, ended=True)], 0.0)
    records = s.flush(3.0)
    assert [(r.source_port, r.end_reason) for r in records] == [(1, FORCED_END)]


def test_uncounted_connections_use_their_own_template_and_first_seen_time():
    s = store()
    s.update([conn(counted=False)], 100.0)
    [record] = s.update([conn(counted=False)], 105.0)
    assert record.kind == CONNTRACK_UNCOUNTED and record.start_ms == 100_000
    assert record.end_reason == ACTIVE_TIMEOUT  # present in every poll counts as active


def test_counters_that_go_backwards_are_a_reset_and_the_delta_is_the_new_total():
    s = store(active=1, idle=100)
    s.update([conn(packets=10, octets=1000)], 0.0)
    [first] = s.update([conn(packets=10, octets=1000)], 1.0)
    assert (first.packet_delta, first.octet_delta) == (10, 1000)
    # `conntrack -L -z` between polls, then a little traffic
    [reset] = s.update([conn(packets=3, octets=300)], 2.0)
    assert (reset.packets, reset.packet_delta, reset.octet_delta) == (3, 3, 300)
    assert (reset.reverse_packet_delta, reset.reverse_octet_delta) == (3, 600)
    [after] = s.update([conn(packets=5, octets=500)], 3.0)
    assert (after.packet_delta, after.octet_delta) == (2, 200)


def test_a_reset_of_one_counter_resets_the_deltas_of_all():
    """Zeroing is per entry: one counter below its last export means all were zeroed,
    even if another has since grown past its old value."""
    s = store(active=1, idle=100)
    s.update([conn(packets=10, octets=100)], 0.0)
    s.update([conn(packets=10, octets=100)], 1.0)
    [reset] = s.update([conn(packets=4, octets=400)], 2.0)
    assert (reset.packet_delta, reset.octet_delta) == (4, 400)


def test_tuple_reuse_soak_keeps_one_slot_per_tuple():
    """A fake clock, 50 tuples whose conntrack entries end and come back under a new id
    every few polls (a busy client reusing ports), 400 polls: the columns do not grow."""
    s = store(active=5, idle=15)
    conn_ids = {port: 1 for port in range(50)}
    for t in range(400):
        for port in conn_ids:
            if (t + port) % 3 == 0:
                conn_ids[port] += 1
        s.update([conn(sport=port, packets=t, conn_id=i) for port, i in conn_ids.items()],
                 float(t))
        assert s.table.used == len(s) == 50


def test_churn_soak_reuses_the_slots_of_gone_connections():
    """Connections that end and others that take their place (freed slots reused), with
    tuple reuse among them, over 500 polls of a fake clock with uneven steps."""
    s = store(active=3, idle=7)
    for poll in range(500):
        window = range(poll * 5, poll * 5 + 40)  # 5 gone and 5 new per poll
        now = poll * 0.7 + (poll % 3) * 0.2
        s.update([conn(sport=port, packets=poll * (port % 2),
                       conn_id=1 + poll // 4 * (port % 3 == 0)) for port in window], now)
        assert len(s) == 40 and s.table.used <= 45  # 40 live, and the 5 new before 5 gone left


def test_a_record_says_the_tcp_state_and_rules_of_its_time():
    """What a record says beyond numbers is kept encoded per connection: it must follow a
    change of state or labels."""
    s = store(active=1, idle=100, enricher=Enricher(None, "node-a", PodNetworks()))
    s.update([conn(packets=1)], 0.0)
    [first] = s.update([conn(packets=2)], 1.0)
    [second] = s.update([conn(packets=3, state="FIN_WAIT")], 2.0)
    labelled = conn(packets=4, state="FIN_WAIT")._replace(labels=labels_bytes(7 << 32 | 5))
    [third] = s.update([labelled], 3.0)
    assert [r.tcp_state for r in (first, second, third)] == [
        "ESTABLISHED", "FIN_WAIT", "FIN_WAIT"]
    assert (first.ingress_rule_name, first.egress_rule_name) == ("", "")
    assert (third.ingress_rule_name, third.egress_rule_name) == ("5", "7")


def test_records_due_together_each_say_their_own_state_and_rules():
    """Many connections' strings are found at once (without Pods, once per distinct state
    and labels): each record must still get its own, the TCP state only for TCP."""
    s = store(active=1, idle=100, enricher=Enricher(None, "node-a", PodNetworks()))
    wanted = {}
    polled = []
    for sport in range(1000, 1060):  # every mix of protocol, state and labels
        protocol = 6 if sport % 3 else 17
        state = ("ESTABLISHED", "TIME_WAIT", "SYN_SENT")[sport // 3 % 3]
        rules = (sport % 5, sport % 4 + 10) if sport % 2 else (0, 0)
        labels = labels_bytes(rules[1] << 32 | rules[0]) if sport % 2 else b""
        polled.append(conn(sport, packets=1, conn_id=sport, protocol=protocol, state=state,
                           labels=labels))
        wanted[sport] = (state if protocol == 6 else "",
                         str(rules[0]) if rules[0] else "", str(rules[1]) if rules[1] else "")
    s.update(polled, 0.0)
    records = s.update([c._replace(packets=2) for c in polled], 1.0)
    assert {r.source_port: (r.tcp_state, r.ingress_rule_name, r.egress_rule_name)
            for r in records} == wanted
    assert len(records) == 60


def test_one_polls_records_of_every_kind_keep_their_own_reason_and_end_time():
    """A poll's ended, gone, idle and active records are made in one run: each still says
    its own end reason and end time (a gone one: the previous poll's)."""
    s = store(active=10, idle=15)
    ending, gone, quiet, busy = (conn(1000 + i, packets=1, conn_id=1 + i) for i in range(4))
    s.update([ending, gone, quiet, busy], 0.0)
    s.update([ending._replace(packets=2), gone._replace(packets=2), quiet,
              busy._replace(packets=2)], 8.0)
    records = s.update([ending._replace(packets=3, state="TIME_WAIT", ended=True), quiet,
                        busy._replace(packets=3)], 16.0)
    assert sorted((r.source_port, r.end_reason, r.end_ms, r.packet_delta, r.tcp_state)
                  for r in records) == [
        (1000, END_OF_FLOW, 16_000, 3, "TIME_WAIT"),
        (1001, END_OF_FLOW, 8_000, 2, "ESTABLISHED"),
        (1002, IDLE_TIMEOUT, 16_000, 1, "ESTABLISHED"),
        (1003, ACTIVE_TIMEOUT, 16_000, 3, "ESTABLISHED")]


def test_a_pod_learnt_after_its_connection_names_the_next_record():
    """The Pod map changes (here fed as its OVSDB thread feeds it): the next records of a
    connection already tracked carry the Pod's names."""
    pods = PodMap("unix:/nonexistent")
    enricher = Enricher(pods, "node-a", PodNetworks(["10.0.0.0/16"]))
    s = store(active=1, idle=100, enricher=enricher)
    s.update([conn(packets=1)], 0.0)
    [before] = s.update([conn(packets=2)], 1.0)
    pods._learn("uuid-1", "web-1a2b3c", {"antrea-type": POD_PORT,
                                        "ip-address": "10.0.0.2", "pod-name": "web",
                                        "pod-namespace": "shop"})
    [after] = s.update([conn(packets=3)], 2.0)
    assert (before.destination_pod_name, before.flow_type) == ("", 0)
    assert (after.destination_pod_name, after.destination_pod_namespace,
            after.destination_node_name, after.flow_type) == ("web", "shop", "node-a", 2)
    # another Pod comes: nothing changes for this connection
    pods._learn("uuid-2", "db-4d5e6f", {"antrea-type": POD_PORT, "ip-address": "10.0.0.9",
                                       "pod-name": "db", "pod-namespace": "shop"})
    [later] = s.update([conn(packets=4)], 3.0)
    assert (later.source_pod_name, later.destination_pod_name, later.flow_type) == (
        "", "web", 2)
    # a reload without Pod CIDRs: an inter-node peer can no longer be told from an external
    enricher.pod_networks = PodNetworks()
    [reloaded] = s.update([conn(packets=5)], 4.0)
    assert (reloaded.destination_pod_name, reloaded.flow_type) == ("web", 0)


def test_a_connection_with_a_value_out_of_range_is_left_out_and_counted(caplog):
    s = store(active=1)
    s.update([conn(sport=1, packets=1), conn(sport=3, conn_id=2**32), conn(sport=2)], 0.0)
    assert len(s) == 2 and s.malformed == 1
    assert "value out of range" in caplog.text and "id=4294967296" in caplog.text
    records = s.update([conn(sport=1, packets=2), conn(sport=2, packets=1)], 1.0)
    assert sorted(r.source_port for r in records) == [1, 2]


def test_the_table_of_encoded_spans_is_bounded():
    """Spans are told apart by state, labels (their rule ids) and Pods: 500 states (within
    the names a process keeps, polled.MAX_STATES) times 132 labels."""
    s = store(active=1, idle=100)
    spans = [(f"S{n % 500}", labels_bytes(n // 500 + 1)) for n in range(MAX_SPANS + 10)]

    def poll(packets):
        return [conn(sport=p % 60000, zone=p // 60000, packets=packets, state=state,
                     labels=labels) for p, (state, labels) in enumerate(spans)]
    s.update(poll(1), 0.0)
    records = s.update(poll(2), 1.0)
    assert len(s.spans.encoded) <= MAX_SPANS + BATCH  # checked before each batch
    assert sorted(r.tcp_state for r in records) == sorted(state for state, _ in spans)


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


@settings(max_examples=200)
@given(st.lists(st.dictionaries(st.integers(1, 4), st.integers(0, 2**63 - 1), max_size=4),
                min_size=1, max_size=20))
def test_counters_in_any_order_give_deltas_between_zero_and_the_total(polls):
    """Counters that jump anywhere between polls (grown, zeroed, zeroed and grown past the
    old value): every delta is within [0, total], whatever the history."""
    s = store(1.0, 2.0)
    for t, poll in enumerate(polls):
        records = s.update([conn(sport=port, packets=n, octets=n) for port, n in poll.items()],
                           float(t))
        records += s.flush(float(t)) if t == len(polls) - 1 else []
        for r in records:
            for delta, total in ((r.packet_delta, r.packets), (r.octet_delta, r.octets),
                                 (r.reverse_packet_delta, r.reverse_packets),
                                 (r.reverse_octet_delta, r.reverse_octets)):
                assert 0 <= delta <= total


def test_ipv4_and_ipv6_connections_due_together_keep_their_own_tuples():
    """Records are written per family from the connections' keys: a batch holding both
    reads each key with its own layout."""
    a6, b6 = socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(socket.AF_INET6,
                                                                             "fd00::2")
    v6 = Connection(17, a6, b6, 5353, 53, b6, a6, 53, 5353, zone=65510, packets=1,
                    octets=90, id=7, start_ns=2_000_000_000_000,
                    key=identity(17, a6, b6, 5353, 53, 0, 0, 0, 65510))
    icmp = Connection(1, A, B, icmp_type=8, icmp_id=99, zone=65520, packets=1, octets=84,
                      id=8, start_ns=2_000_000_000_000,
                      key=identity(1, A, B, 0, 0, 99, 8, 0, 65520))
    s = store(active=1)
    s.update([conn(sport=4242, packets=1), v6, icmp], 0.0)
    records = sorted(s.update([conn(sport=4242, packets=2), v6, icmp], 1.0),
                     key=lambda r: r.protocol)
    assert [(r.protocol, r.source_address, r.destination_address, r.source_port,
             r.destination_port, r.icmp_type, r.flow_id) for r in records] == [
        (1, A, B, 0, 0, 8, 8), (6, A, B, 4242, 80, 0, 1), (17, a6, b6, 5353, 53, 0, 7)]


def test_a_conntrack_id_over_32_bits_is_malformed_not_stored_wrapped():
    """The id column is 32 bits. NumPy 2 refuses an out-of-range Python int (OverflowError):
    the entry is counted (ovsflow_connections_malformed_total) and left out. NumPy 1.26 only
    warned and stored it wrapped: 2**32 as 0, 2**33 + 5 as 5, another connection's id. So
    pyproject.toml asks for numpy>=2.0."""
    s = store(active=1)
    good = conn(sport=1, conn_id=5, packets=1)
    wrapped_to_0, wrapped_to_5 = (conn(sport=2, conn_id=2**32, packets=1),
                                  conn(sport=3, conn_id=2**33 + 5, packets=1))
    assert s.update([good, wrapped_to_0, wrapped_to_5], 0.0) == []
    assert (len(s), s.malformed) == (1, 2)
    polled = [c._replace(packets=2) for c in (good, wrapped_to_0, wrapped_to_5)]
    assert [(r.source_port, r.flow_id) for r in s.update(polled, 1.0)] == [(1, 5)]
    assert [(r.source_port, r.flow_id) for r in s.flush(2.0)] == [(1, 5)]


def test_the_previous_polls_order_guesses_slots_and_a_wrong_guess_is_never_taken():
    """Rows come in the order of the poll before (store/order.py): the slot of each row is
    guessed from it, and checked. After connections came and went (the rest shifted), in
    another order altogether, or reversed, each row's counters still go to its own
    connection: every record says the totals its own row brought."""
    s = store(active=1, idle=1000)
    ports = list(range(1, 3001))
    s.update([conn(sport=p, packets=1, conn_id=p) for p in ports], 0.0)
    rng = np.random.default_rng(5)
    orders = [ports[:1000] + [5000, 5001, 5002] + ports[1005:],  # 3 new, 5 gone, a shift
              [ports[i] for i in rng.permutation(len(ports))],
              ports[::-1], ports]
    before = set(ports)
    for t, polled in enumerate(orders, 1):
        totals = {p: 10 * t + p % 7 for p in polled}
        records = s.update([conn(sport=p, packets=n, conn_id=p) for p, n in totals.items()],
                           float(t))
        moved = {r.source_port: r.packets for r in records if r.end_reason == ACTIVE_TIMEOUT}
        # those new in this poll get their first record at the next
        assert moved == {p: n for p, n in totals.items() if p in before}, t
        before = set(polled)


def test_a_column_takes_memory_page_by_page_not_in_huge_pages():
    """numpy asks for huge pages on arrays over 4 MB: a table's column, written from its
    first slot on, took 2 MB at a time past each 2 MB boundary (10 MB more at 100k
    connections in a table for 1M). The kernel's own view: the mapping's flags (`nh`:
    MADV_NOHUGEPAGE; numpy's arrays have `hg` there) and which of its pages are present."""
    column = lazy_zeros(1_000_000, "u8")  # 8 MB
    written = 3 << 20  # past at least one 2 MB boundary
    column[:written // 8] = 7
    address = column.__array_interface__["data"][0]
    flags = vm_flags(address + column.nbytes // 2)
    assert "nh" in flags and "hg" not in flags
    page = os.sysconf("SC_PAGE_SIZE")
    assert resident_pages(address, column.nbytes) <= written // page + 1
    assert (column[:written // 8].sum(), column[written // 8:].any()) == (7 * written // 8, False)


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:
            low, high = (int(end, 16) for end in first.split("-"))
            inside = low <= address < high
        elif inside and first == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def resident_pages(address: int, size: int) -> int:
    """Pages of [address, address + size) present in memory (/proc/self/pagemap)."""
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = address // page, (address + size - 1) // page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(8 * first)
        entries = np.frombuffer(pagemap.read(8 * (last - first + 1)), np.uint64)
    return int((entries >> np.uint64(63)).sum())
