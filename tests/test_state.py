"""Export state and connection identity, at the store's level (pure logic and a real file in a
temporary directory): what a next agent continues, what it sets aside, and when a reused
tuple is a new connection. End to end, with real conntrack and agents: test_restart.py."""

import fcntl
import os
import socket
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from ovsflow.connection import Connection, identity
from ovsflow.deny.packet import DeniedPacket
from ovsflow.deny.store import DenyStore
from ovsflow.enrich import Enricher, PodNetworks
from ovsflow.filter import ConnectionFilter
from ovsflow.pods import POD_PORT, PodMap
from ovsflow.protocols import ProtocolSet
from ovsflow.record import ACTIVE_TIMEOUT, END_OF_FLOW, FORCED_END, IDLE_TIMEOUT
from ovsflow.state import MAGIC, Origin, Section, StateError, decode, encode
from ovsflow.state_file import ExportState
from ovsflow.store import ConnectionStore

from helpers import flow_records

A, B = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")
ORIGIN = Origin("boot-1", 4026531840, "node-a", 7)


def conn(sport=1000, packets=0, *, conn_id=1, start_ns=0, state="ESTABLISHED", ended=False,
         counted=True, timeout=0, protocol=6, zone=65520):
    return Connection(protocol, A, B, sport, 80, B, A, 80, sport, zone=zone, state=state,
                      packets=packets, octets=100 * packets, reply_packets=packets,
                      reply_octets=200 * packets, counted=counted, id=conn_id,
                      start_ns=start_ns, ended=ended, timeout=timeout,
                      key=identity(protocol, A, B, sport, 80, 0, 0, 0, zone, start_ns))


def records(store, connections, now):
    return flow_records(store.update(connections, now))


def summary(found):
    return sorted((r.source_port, r.end_reason, r.packet_delta, r.octet_delta,
                   r.reverse_octet_delta) for r in found)


def saved_and_restored(store, now, seen=None):
    """The store's state through the file format, into a new store."""
    data = b"".join(encode(ORIGIN, now, {"conntrack": store.snapshot("kernel")}))
    section = decode(data).sections["conntrack"]
    new = ConnectionStore(store.active_timeout, store.idle_timeout)
    assert sum(new.restore(keys, rows, seen if seen is not None else now)
               for keys, rows in section.parts) == len(store)
    return new


def test_a_restart_continues_each_connection_from_what_was_exported():
    first = ConnectionStore(5.0, 15.0)
    records(first, [conn(1, 10), conn(2, 20), conn(3, 30, ended=True)], 0.0)
    assert summary(records(first, [conn(1, 15), conn(2, 20), conn(3, 30, ended=True)],
                           5.0)) == [(1, ACTIVE_TIMEOUT, 15, 1500, 3000),
                                     (2, ACTIVE_TIMEOUT, 20, 2000, 4000)]
    records(first, [conn(1, 18), conn(2, 20), conn(3, 30, ended=True)], 6.0)
    # stopping: a last poll was taken; the moved connection is brought up to date, not ended
    assert summary(flow_records(first.flush(6.5, continued=True))) == [
        (1, ACTIVE_TIMEOUT, 3, 300, 600)]
    second = saved_and_restored(first, 6.5)
    # the next agent: 1 moved on, 2 ended while no agent ran, 3's end was exported already
    found = records(second, [conn(1, 25), conn(3, 30, ended=True)], 8.0)
    assert summary(found) == [(2, END_OF_FLOW, 0, 0, 0)]
    [gone] = found
    assert gone.end_ms == 6500  # last seen alive: when the state was written
    assert summary(records(second, [conn(1, 25), conn(3, 30, ended=True)], 11.6)) == [
        (1, ACTIVE_TIMEOUT, 7, 700, 1400)]


def test_without_export_state_the_final_records_end_every_live_connection():
    s = ConnectionStore(5.0, 15.0)
    records(s, [conn(1, 10), conn(2, 20, ended=True)], 0.0)
    assert [(r.source_port, r.end_reason) for r in flow_records(s.flush(1.0))] == [
        (1, FORCED_END)]


def test_a_quiet_connection_stays_quiet_across_a_restart():
    first = ConnectionStore(5.0, 15.0)
    records(first, [conn(1, 10)], 0.0)
    records(first, [conn(1, 10)], 5.0)
    assert summary(records(first, [conn(1, 10)], 15.0)) == [(1, IDLE_TIMEOUT, 0, 0, 0)]
    assert flow_records(first.flush(16.0, continued=True)) == []
    second = saved_and_restored(first, 16.0)
    assert records(second, [conn(1, 10)], 17.0) == []
    assert records(second, [conn(1, 10)], 40.0) == []
    # it moves: its last record is long past the active timeout
    assert summary(records(second, [conn(1, 12)], 41.0)) == [(1, ACTIVE_TIMEOUT, 2, 200, 400)]


def test_a_reused_tuple_with_the_same_id_is_a_new_connection_by_its_start_time():
    s = ConnectionStore(5.0, 15.0)
    records(s, [conn(7, 5, start_ns=10**18, state="TIME_WAIT", ended=True)], 0.0)
    # the kernel gave the next connection on the tuple the same id; same counters too
    found = records(s, [conn(7, 5, start_ns=10**18 + 10**9, state="TIME_WAIT", ended=True)],
                    1.0)
    assert summary(found) == [(7, END_OF_FLOW, 5, 500, 1000)]
    assert found[0].start_ms == 10**18 // 10**6 + 1000


def test_a_reused_tuple_without_start_times_is_told_by_its_end_and_counters():
    s = ConnectionStore(5.0, 15.0)
    records(s, [conn(7, 6, state="TIME_WAIT", ended=True)], 0.0)
    # same id, no start time: the ended connection moves again in a live state
    assert records(s, [conn(7, 3, state="ESTABLISHED")], 1.0) == []
    found = records(s, [conn(7, 4, state="TIME_WAIT", ended=True)], 2.0)
    assert summary(found) == [(7, END_OF_FLOW, 4, 400, 800)]  # its own, not 4 - 6


def test_a_counter_reset_is_not_a_new_connection():
    s = ConnectionStore(5.0, 15.0)
    records(s, [conn(7, 6)], 0.0)
    assert summary(records(s, [conn(7, 6)], 5.0)) == [(7, ACTIVE_TIMEOUT, 6, 600, 1200)]
    found = records(s, [conn(7, 2)], 10.0)  # conntrack -L -z, then 2 packets
    assert summary(found) == [(7, ACTIVE_TIMEOUT, 2, 200, 400)]
    assert found[0].flow_id == 1


def test_without_counters_only_a_refreshed_timeout_is_activity():
    """OVS userspace conntrack: each packet sets the remaining timeout back to the full
    one; a quiet connection's runs down with the clock."""
    s = ConnectionStore(5.0, 15.0)
    polls = [(0.0, 30, 30), (5.0, 25, 30), (10.0, 20, 30), (15.0, 15, 30), (20.0, 10, 30),
             (25.0, 5, 30)]
    reasons = {1: [], 2: []}
    for now, quiet_timeout, busy_timeout in polls:
        for r in records(s, [conn(1, counted=False, timeout=quiet_timeout, conn_id=1),
                             conn(2, counted=False, timeout=busy_timeout, conn_id=2)], now):
            reasons[r.source_port].append((now, r.end_reason))
    # quiet from the start: its first record, nothing new at 10 s, its idle record, then
    # nothing more
    assert reasons[1] == [(5.0, ACTIVE_TIMEOUT), (15.0, IDLE_TIMEOUT)]
    assert reasons[2] == [(5.0, ACTIVE_TIMEOUT), (10.0, ACTIVE_TIMEOUT),
                          (15.0, ACTIVE_TIMEOUT), (20.0, ACTIVE_TIMEOUT),
                          (25.0, ACTIVE_TIMEOUT)]


def test_narrowing_the_filter_forgets_connections_without_ending_them():
    s = ConnectionStore(5.0, 15.0)
    records(s, [conn(1, 1, protocol=6), conn(2, 1, protocol=17), conn(3, 1, zone=7)], 0.0)
    narrowed = ConnectionFilter(frozenset({65520}), ProtocolSet(frozenset({6})))
    assert s.forget(lambda keys: narrowed.accepts_columns(
        keys["zone"], keys["protocol"], keys["destination_port"])) == 2
    assert len(s) == 1
    # the next poll no longer brings them: no end record for the two still alive
    assert summary(records(s, [conn(1, 1, protocol=6)], 1.0)) == []


def test_a_key_twice_in_a_state_is_restored_once_from_its_last_row():
    """A state that names a connection twice (written by hand, say) restores it once,
    from its last row: the next record's deltas count from that row's counters."""
    first = ConnectionStore(5.0, 15.0)
    records(first, [conn(1, 10)], 0.0)
    records(first, [conn(1, 30)], 5.0)  # exported: 30 packets
    keys, rows = next(iter(first.snapshot("kernel").parts))
    earlier = rows.copy()
    earlier["packets"] = 4
    new = ConnectionStore(5.0, 15.0)
    assert new.restore(keys + keys, np.concatenate([earlier, rows]), 5.0) == 1
    assert len(new) == 1
    [record] = records(new, [conn(1, 50)], 10.0)
    assert (record.packet_delta, record.packets) == (20, 50)


def test_a_connection_rejected_poll_after_poll_is_counted_once():
    s = ConnectionStore(5.0, 15.0, max_connections=1)
    for now in (0.0, 1.0, 2.0):
        records(s, [conn(1, 1), conn(2, 1), conn(3, 1)], now)
    assert s.rejected == 2
    records(s, [conn(1, 1), conn(2, 1), conn(4, 1)], 3.0)
    assert s.rejected == 3


def test_deny_entries_continue_with_their_start_and_unexported_packets():
    packet = DeniedPacket(A, B, 17, 5000, 53, 0, 0, 60)
    first = DenyStore(5.0, 15.0, 100)
    for now in (100.0, 101.0, 102.0):
        first.add(packet, 42, now)
    assert [(r.packet_delta, r.end_reason) for r in first.expired(105.0)] == [
        (3, ACTIVE_TIMEOUT)]
    first.add(packet, 42, 106.0)  # not exported yet when the agent dies
    keys, rows = first.snapshot()
    second = DenyStore(5.0, 15.0, 100)
    assert second.restore(keys, rows) == 1
    second.add(packet, 42, 107.0)
    [record] = second.expired(111.0)
    assert (record.packet_delta, record.octet_delta, record.packets) == (2, 120, 5)
    assert record.start_ms == 100_000 and record.ingress_rule_name == "42"


def write(directory, origin=ORIGIN, source="kernel", data=None):
    state = ExportState(str(directory), origin)
    s = ConnectionStore(5.0, 15.0)
    records(s, [conn(1, 10)], 0.0)
    assert state.save({"conntrack": s.snapshot(source)}, 1.0)
    if data is not None:
        with open(state.path, "rb") as file:
            changed = data(file.read())
        with open(state.path, "wb") as file:
            file.write(changed)
    return state.path


@pytest.mark.parametrize("change, reason", [
    (lambda data: data[:len(data) // 2], "corrupt"),
    (lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:], "corrupt"),
    (lambda data: b"garbage" * 10, "corrupt"),
    (lambda data: b"", "corrupt"),
])
def test_a_truncated_or_corrupt_file_is_set_aside(tmp_path, change, reason, caplog):
    write(tmp_path, data=change)
    state = ExportState(str(tmp_path), ORIGIN)
    state.load()
    assert state.take("conntrack", "kernel") is None
    assert state.restores == {("discarded", reason): 1}
    assert "not used, starting anew" in caplog.text


def test_a_store_that_never_tracked_a_connection_is_saved_and_read_back(tmp_path):
    """An agent that saw no connection (a new node, only denied traffic) streams no part
    for its store; its successor must read the file, not fail on it."""
    state = ExportState(str(tmp_path), ORIGIN)
    assert state.save({"conntrack": ConnectionStore(5.0, 15.0).snapshot("kernel")}, 1.0)
    state = ExportState(str(tmp_path), ORIGIN)
    state.load()
    section = state.take("conntrack", "kernel")
    assert section.count == 0 and [len(keys) for keys, _ in section.parts] == [0]
    assert state.restores == {("restored", "conntrack"): 1}


def test_parts_that_do_not_add_up_under_a_good_checksum_are_a_state_error():
    """A section announcing more entries than its parts hold (a writer gone wrong), with a
    checksum that matches: an error naming the file unreadable, never a crash."""
    store = ConnectionStore(5.0, 15.0)
    records(store, [conn(1, 10)], 0.0)
    data = b"".join(encode(ORIGIN, 1.0, {"conntrack": store.snapshot("kernel")}))
    body = data[:-4].replace(b'"count": 1', b'"count": 2')
    with pytest.raises(StateError, match="unreadable"):
        decode(body + struct.pack("<I", zlib.adler32(body)))


@pytest.mark.parametrize("field, value, reason", [
    ("boot_id", "boot-2", "boot"), ("node", "node-b", "node"),
    ("observation_domain", 8, "domain"), ("netns", 1, "netns"),
])
def test_state_of_another_boot_node_domain_or_namespace_is_set_aside(tmp_path, field, value,
                                                                     reason):
    theirs = Origin(**{**ORIGIN.__dict__, field: value})
    path = write(tmp_path, origin=theirs)
    ours = ExportState(str(tmp_path), ORIGIN)
    os.replace(path, ours.path)  # their file where ours would be
    ours.load()
    assert ours.take("conntrack", "kernel") is None
    assert ours.restores == {("discarded", reason): 1}


def test_state_of_another_source_or_format_is_set_aside(tmp_path):
    write(tmp_path, source="ovs /run/ovs/ovs-vswitchd.77.ctl")
    state = ExportState(str(tmp_path), ORIGIN)
    state.load()
    assert state.take("conntrack", "kernel") is None
    assert state.restores == {("discarded", "source"): 1}
    data = b"".join(encode(ORIGIN, 1.0, {}))
    body = data[:-4].replace(b"\"version\": 2", b"\"version\": 99")
    body = body[:len(MAGIC)] + struct.pack("<I", len(body) - len(MAGIC) - 4) + body[
        len(MAGIC) + 4:]
    with pytest.raises(StateError, match="version 99"):
        decode(body + struct.pack("<I", zlib.adler32(body)))


def test_a_good_file_is_restored_and_no_file_is_a_fresh_start(tmp_path):
    state = ExportState(str(tmp_path), ORIGIN)
    state.load()
    assert state.restores == {("none", ""): 1}
    write(tmp_path)
    state = ExportState(str(tmp_path), ORIGIN)
    state.load()
    section = state.take("conntrack", "kernel")
    assert section.written_at == 1.0 and section.count == 1
    [(keys, rows)] = section.parts
    assert len(keys) == 1 and rows["packets"].tolist() == [0]  # nothing exported yet at 0.0
    assert state.restores == {("restored", "conntrack"): 1}


def test_a_section_no_store_took_is_written_again_as_it_was(tmp_path):
    """An agent whose source cannot open saves its deny entries; the connections of the
    agent before it stay in the file, with their time, for the agent after it."""
    write(tmp_path)
    state = ExportState(str(tmp_path), ORIGIN)
    state.load()
    assert state.take("deny", "deny") is None  # none in the file
    deny = Section("deny", [b"denied-key"], np.zeros(1, [("packets", "<u8")]))
    assert state.save({"deny": deny, "conntrack": state.untaken("conntrack")}, 9.0)
    after = ExportState(str(tmp_path), ORIGIN)
    after.load()
    section = after.take("conntrack", "kernel")
    assert section.written_at == 1.0 and section.count == 1
    assert after.take("deny", "deny").written_at == 9.0
    assert after.untaken("conntrack") is None  # taken: its store writes it from now on


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = write(tmp_path)
    before = open(path, "rb").read()
    state = ExportState(str(tmp_path), ORIGIN)
    os.chmod(tmp_path, 0o500)
    try:
        if os.geteuid() == 0:  # root writes anyway: make the directory a file's path instead
            state.path = os.path.join(path, "below-a-file")
        assert not state.save({}, 2.0)
    finally:
        os.chmod(tmp_path, 0o700)
    assert state.save_errors == 1 and open(path, "rb").read() == before
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []


def test_the_state_of_many_connections_round_trips(tmp_path):
    s = ConnectionStore(5.0, 15.0)
    connections = [conn(port, port % 7 + 1, conn_id=port, start_ns=port * 10**9)
                   for port in range(1, 20001)]
    records(s, connections, 0.0)
    records(s, connections, 5.0)
    keys, rows = zip(*s.snapshot("kernel").parts)
    keys, rows = [key for part in keys for key in part], np.concatenate(rows)
    state = ExportState(str(tmp_path), ORIGIN)
    assert state.save({"conntrack": Section("kernel", keys, rows)}, 5.0)
    loaded = ExportState(str(tmp_path), ORIGIN)
    loaded.load()
    section = loaded.take("conntrack", "kernel")
    assert [len(part) for part, _ in section.parts] == [20000]  # as written: one part
    [(loaded_keys, loaded_rows)] = section.parts
    assert loaded_keys == keys
    assert np.array_equal(loaded_rows, rows)
    assert sorted(loaded_rows["packets"].tolist()) == sorted(
        port % 7 + 1 for port in range(1, 20001))


def test_a_section_is_read_part_by_part_as_its_store_restores_it(tmp_path):
    """At start only the file's checksum and sizes are read; each part (keys and rows, ~150
    bytes a connection) is read when the store restores it, and freed once it has. Holding
    the file's bytes and every decoded part until the restore ended made a restoring agent's
    peak RSS 5-15 MB above a fresh one's at 100k (issue 31). The file is closed once no
    section may be read from it any more (on tmpfs, an open file is memory)."""
    s = ConnectionStore(5.0, 15.0)
    records(s, [conn(port, 1) for port in range(1, 40001)], 0.0)
    state = ExportState(str(tmp_path), ORIGIN)
    assert state.save({"conntrack": s.snapshot("kernel")}, 0.0)
    restored = ConnectionStore(5.0, 15.0)
    loaded = ExportState(str(tmp_path), ORIGIN)
    tracemalloc.start()
    try:
        loaded.load()
        held_after_load = tracemalloc.get_traced_memory()[0]
        section = loaded.take("conntrack", "kernel")
        assert len(section.parts) == 3  # 16384, 16384, 7232 entries, as written
        held_parts = []
        while section.parts:
            keys, rows = section.parts.pop(0)
            assert rows.base is None and rows.flags.writeable  # its own memory
            held_parts.append(len(keys))
            restored.restore(keys, rows, section.written_at)
            del keys, rows
    finally:
        tracemalloc.stop()
    assert held_parts == [16384, 16384, 7232]
    assert held_after_load < 100_000  # bytes: the old load held ~6 MB for these 40000
    assert len(restored) == 40000
    assert loaded.take("conntrack", "kernel") is None and loaded.untaken("conntrack") is None
    assert loaded.path in open_files()  # `section` may still be read
    del section
    assert loaded.path not in open_files()


def open_files() -> list[str]:
    """The paths this process has open."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the listing's own
            pass
    return paths


def pod_row(pods, uuid, name, address):
    pods._learn(uuid, f"{name}-port", {"antrea-type": POD_PORT, "ip-address": address,
                                       "pod-name": name, "pod-namespace": "shop"})


def test_a_pod_that_reuses_an_address_is_not_credited_with_older_connections():
    """Pods as the connection was first seen (here the map is fed as its OVSDB thread
    feeds it): web goes, api gets its address; web's connection keeps web's name."""
    pods = PodMap("unix:/nonexistent")
    enricher = Enricher(pods, "node-a", PodNetworks(["10.0.0.0/16"]))
    pod_row(pods, "uuid-web", "web", "10.0.0.1")
    s = ConnectionStore(1.0, 100.0, enricher=enricher)
    records(s, [conn(1, 1)], 0.0)
    pods._forget("uuid-web")
    pod_row(pods, "uuid-api", "api", "10.0.0.1")
    [old] = records(s, [conn(1, 2)], 1.0)
    records(s, [conn(1, 2), conn(2, 1)], 1.5)  # a new connection from the new Pod
    found = {r.source_port: r.source_pod_name for r in records(s, [conn(1, 3), conn(2, 2)],
                                                                3.0)}
    assert old.source_pod_name == "web" and found == {1: "web", 2: "api"}

    deny = DenyStore(1.0, 100.0, 10, enricher)
    pods._forget("uuid-api")
    pod_row(pods, "uuid-web2", "web", "10.0.0.1")
    deny.add(DeniedPacket(A, B, 17, 5000, 53, 0, 0, 60), 3, 10.0)
    pods._forget("uuid-web2")
    pod_row(pods, "uuid-other", "other", "10.0.0.1")
    [denied] = deny.expired(11.0)
    assert denied.source_pod_name == "web"


def test_a_connection_never_reported_gets_a_record_at_shutdown_even_when_continued():
    """No next agent may ever come: what the collector has not heard of at all, it hears of
    now (as an active-timeout record: the connection goes on)."""
    s = ConnectionStore(30.0, 30.0)
    records(s, [conn(1, counted=False, timeout=30), conn(2, 4)], 0.0)
    records(s, [conn(1, counted=False, timeout=29), conn(2, 4)], 1.0)
    found = flow_records(s.flush(1.5, continued=True))
    assert sorted((r.source_port, r.end_reason) for r in found) == [
        (1, ACTIVE_TIMEOUT), (2, ACTIVE_TIMEOUT)]
    second = saved_and_restored(s, 1.5)
    assert flow_records(second.flush(2.0, continued=True)) == []  # reported: nothing new


def tcp_only(keys):
    return keys["protocol"] == 6


def test_narrowed_then_widened_connections_continue_from_their_last_records():
    """A reload leaves UDP out, then takes it again: no end record while it is left out,
    and its next record counts from its last one (the bytes it moved while left out
    included), with its start unchanged: the collector's sum is conntrack's total."""
    s = ConnectionStore(5.0, 15.0)
    s.wanted = tcp_only
    records(s, [conn(1, 10), conn(2, 10, protocol=17)], 0.0)
    assert summary(records(s, [conn(1, 12), conn(2, 14, protocol=17)], 5.0)) == [
        (1, ACTIVE_TIMEOUT, 12, 1200, 2400), (2, ACTIVE_TIMEOUT, 14, 1400, 2800)]
    assert s.forget() == 1  # narrowed: the source no longer brings UDP
    assert summary(records(s, [conn(1, 13)], 10.0)) == [(1, ACTIVE_TIMEOUT, 1, 100, 200)]
    assert summary(records(s, [conn(1, 13)], 12.0)) == []
    s.forget(lambda keys: np.ones(len(keys), bool))  # widened again
    found = [r for r in records(s, [conn(1, 13), conn(2, 30, protocol=17)], 16.0)
             if r.source_port == 2]
    assert summary(found) == [(2, ACTIVE_TIMEOUT, 16, 1600, 3200)]
    assert found[0].start_ms == 0 and len(s.forgotten) == 0


def test_a_connection_that_ended_while_left_out_is_let_go_without_a_record():
    s = ConnectionStore(5.0, 15.0)
    records(s, [conn(1, 10), conn(2, 10, protocol=17)], 0.0)
    s.forget(tcp_only)
    records(s, [conn(1, 10)], 5.0)
    s.forget(lambda keys: np.ones(len(keys), bool))
    assert summary(records(s, [conn(1, 10)], 6.0)) == []  # UDP 2 is gone: nothing said
    assert len(s.forgotten) == 0 and len(s) == 1


def test_a_left_out_tuple_polled_again_as_another_connection_starts_anew():
    """Without start times a key can come back as another connection: a new conntrack id
    says so, and it starts from nothing."""
    s = ConnectionStore(5.0, 15.0)
    records(s, [conn(2, 10, protocol=17)], 0.0)
    s.forget(tcp_only)
    s.forget(lambda keys: np.ones(len(keys), bool))
    found = records(s, [conn(2, 3, protocol=17, conn_id=99, ended=True)], 6.0)
    assert summary(found) == [(2, END_OF_FLOW, 3, 300, 600)]


def test_across_restarts_a_narrowed_filter_leaves_connections_out_as_a_reload_does():
    """The same rule through the export state: an agent started with fewer protocols sends
    no false end for the live connections it leaves out, keeps their rows for the next, and
    an agent with them again continues each from its last record."""
    first = ConnectionStore(5.0, 15.0)
    records(first, [conn(1, 10), conn(2, 10, protocol=17)], 0.0)
    first.flush(1.0, continued=True)
    narrowed = ConnectionStore(5.0, 15.0)
    narrowed.wanted = tcp_only
    data = b"".join(encode(ORIGIN, 1.0, {"conntrack": first.snapshot("kernel")}))
    for keys, rows in decode(data).sections["conntrack"].parts:
        assert narrowed.restore(keys, rows, 1.0) == 1
    assert summary(records(narrowed, [conn(1, 11)], 6.0)) == [(1, ACTIVE_TIMEOUT, 1, 100, 200)]
    assert summary(flow_records(narrowed.flush(7.0, continued=True))) == []
    widened = saved_and_restored(narrowed, 7.0)
    assert len(widened) == 1 and len(widened.forgotten) == 1
    found = records(widened, [conn(1, 11), conn(2, 25, protocol=17)], 12.0)
    assert summary(r for r in found if r.source_port == 2) == [
        (2, ACTIVE_TIMEOUT, 15, 1500, 3000)]


def test_a_state_whose_counter_rows_were_damaged_is_set_aside(tmp_path):
    """One bit of a counter flipped, the header and sizes intact: only the checksum can
    tell, and the next agent must not continue from the wrong counters."""
    path = write(tmp_path)
    data = bytearray(open(path, "rb").read())
    section = decode(bytes(data)).sections["conntrack"]
    [(keys, rows)] = section.parts
    at = data.index(rows.tobytes())  # the rows as written
    data[at + rows.dtype.fields["packets"][1]] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(StateError, match="checksum"):
        decode(bytes(data))
    state = ExportState(str(tmp_path), ORIGIN)
    state.load()
    assert state.take("conntrack", "kernel") is None
    assert state.restores == {("discarded", "corrupt"): 1}


def test_a_file_of_another_observation_domain_is_set_aside_unless_its_agent_runs(tmp_path):
    """The domain changed across a restart: the old file is counted as discarded (domain)
    and renamed, not left behind as if there were none. An agent of that domain still
    running (its lock held) keeps its file."""
    old = ExportState(str(tmp_path), ORIGIN)
    assert old.save({}, 1.0)
    running = os.open(old.path + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(running, fcntl.LOCK_EX)  # that agent runs: its file stays
    try:
        other = ExportState(str(tmp_path), Origin(**{**ORIGIN.__dict__,
                                                    "observation_domain": 8}))
        other.load()
        assert other.restores == {("none", ""): 1} and os.path.exists(old.path)
    finally:
        os.close(running)
    changed = ExportState(str(tmp_path), Origin(**{**ORIGIN.__dict__, "observation_domain": 9}))
    changed.load()
    assert changed.restores == {("discarded", "domain"): 1}
    assert not os.path.exists(old.path) and os.path.exists(old.path + ".discarded")
    again = ExportState(str(tmp_path), Origin(**{**ORIGIN.__dict__, "observation_domain": 9}))
    again.load()
    assert again.restores == {("none", ""): 1}  # said once
