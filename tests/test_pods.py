"""The live Pod map from OVSDB: against a real ovsdb-server (and ovs-vswitchd with the
userspace datapath, lab/ovs_lab.py), Pods added and removed while it runs, OVSDB restarted
under it, and a large Port table."""

import ipaddress
import json
import logging
import socket
import time

import pytest

from lab.ovs_lab import OvsLab, pod_external_ids
from ovsflow.ipfix.templates import RECORD_TEMPLATES
from ovsflow.pods import MAX_VALUE_BYTES, PodMap, PodRef, pod_addresses
from ovsflow.record import CONNTRACK, FlowRecord


def packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_pod_addresses_reads_antreas_external_ids(caplog):
    ids = pod_external_ids("web-1", "shop", ["10.10.1.5", "fd00:10::5"], "02:00:00:00:00:01",
                           "/var/run/netns/x")
    assert pod_addresses("web-1-abc", ids) == (
        PodRef("shop", "web-1"), [packed("10.10.1.5"), packed("fd00:10::5")], frozenset())
    # the gateway, tunnel and uplink ports carry other antrea-types; plain ports none
    assert pod_addresses("antrea-gw0", {**ids, "antrea-type": "gateway"}) == (
        None, [], frozenset())
    assert pod_addresses("eth1", {}) == (None, [], frozenset())
    with caplog.at_level(logging.WARNING, logger="ovsflow.pods"):
        pod, addresses, _ = pod_addresses("web-2-def", {**ids, "ip-address": "10.10.1.6,bogus"})
    assert addresses == [packed("10.10.1.6")]
    assert "web-2-def" in caplog.text and "'bogus'" in caplog.text


@pytest.fixture
def lab(tmp_path):
    lab = OvsLab(tmp_path / "ovs")
    yield lab
    lab.stop()


@pytest.fixture
def pod_map(lab):
    pods = PodMap(f"unix:{lab.run_dir}/db.sock")
    pods.start()
    yield pods
    pods.stop()


def test_pods_added_and_removed_while_it_runs(lab, pod_map):
    assert pod_map.synced.wait(10)
    assert len(pod_map) == 0
    web = lab.add_pod("10.70.0.1/24", name="web", namespace="shop")
    lab.add_pod("10.70.0.9/24", pod=False)  # a port that is not a Pod's
    db = lab.add_pod("10.70.0.2/24", name="db", namespace="shop")
    wait_for(lambda: pod_map.lookup(packed("10.70.0.2")) is not None, timeout=2)
    assert pod_map.lookup(packed("10.70.0.1")) == PodRef("shop", "web")
    assert pod_map.lookup(packed("10.70.0.2")) == PodRef("shop", "db")
    assert pod_map.lookup(packed("10.70.0.9")) is None
    remembered = pod_map.lookup(packed("10.70.0.1"))

    lab.remove_pod(web)
    wait_for(lambda: pod_map.lookup(packed("10.70.0.1")) is None, timeout=2)
    assert remembered == PodRef("shop", "web")  # what a connection kept stays valid
    # a Port's addresses change (Antrea rewrites ip-address, e.g. dual-stack added)
    lab.vsctl("set", "Port", db.port, 'external_ids:ip-address="10.70.0.3,fd00:70::3"')
    wait_for(lambda: pod_map.lookup(packed("fd00:70::3")) is not None, timeout=2)
    assert pod_map.lookup(packed("10.70.0.3")) == PodRef("shop", "db")
    assert pod_map.lookup(packed("10.70.0.2")) is None
    assert len(pod_map) == 2 and pod_map.resyncs == 1


def test_an_address_taken_over_stays_with_the_newer_pod(lab, pod_map):
    """A Pod replaced by one with the same address: when the old Port goes last, the address
    must stay with the new Pod."""
    old = lab.add_pod("10.71.0.1/24", name="old", namespace="ns")
    lab.vsctl("--", "--id=@i", "create", "Interface", "name=q-new", "type=internal", "--",
              "--id=@p", "create", "Port", "name=q-new", "interfaces=@i",
              *(f'external_ids:{k}="{v}"' for k, v in pod_external_ids(
                  "new", "ns", ["10.71.0.1"], "02:00:00:00:00:02", "/x").items()),
              "--", "add", "Bridge", lab.bridge, "ports", "@p")
    wait_for(lambda: pod_map.lookup(packed("10.71.0.1")) == PodRef("ns", "new"), timeout=2)
    lab.remove_pod(old)
    wait_for(lambda: "p0" not in lab.vsctl("list-ports", lab.bridge).split())
    time.sleep(0.3)
    assert pod_map.lookup(packed("10.71.0.1")) == PodRef("ns", "new")


def test_ovsdb_restart_is_survived_and_resynced(lab, pod_map):
    """ovsdb-server stops; while it is down the database changes (ovsdb-tool on the file, as
    a restored backup or a CNI that ran meanwhile would); the map reconnects and has the
    database's Pods, not the ones it had."""
    kept = lab.add_pod("10.72.0.1/24", name="kept", namespace="ns")
    gone = lab.add_pod("10.72.0.2/24", name="gone", namespace="ns")
    wait_for(lambda: len(pod_map) == 2, timeout=2)
    gone_uuid = lab.vsctl("get", "Port", gone.port, "_uuid").strip()

    lab.stop_daemon("ovsdb-server")
    renamed = pod_external_ids("renamed", "ns", ["10.72.0.5"], "02:00:00:00:00:05", "/x")
    operations = [
        {"op": "update", "table": "Port", "where": [["name", "==", kept.port]],
         "row": {"external_ids": ["map", sorted(renamed.items())]}},
        {"op": "mutate", "table": "Bridge", "where": [["name", "==", lab.bridge]],
         "mutations": [["ports", "delete", ["uuid", gone_uuid]]]},
    ]
    lab._ovs("ovsdb-tool", "transact", f"{lab.run_dir}/conf.db",
             json.dumps(["Open_vSwitch", *operations]))
    time.sleep(1)  # lookups meanwhile answer from the last known Pods
    assert pod_map.lookup(packed("10.72.0.2")) == PodRef("ns", "gone")
    lab.start_ovsdb()

    wait_for(lambda: pod_map.resyncs == 2, timeout=20)
    assert pod_map.lookup(packed("10.72.0.5")) == PodRef("ns", "renamed")
    assert pod_map.lookup(packed("10.72.0.1")) is None
    assert pod_map.lookup(packed("10.72.0.2")) is None
    assert len(pod_map) == 1
    # and it follows changes again after the restart
    lab.add_pod("10.72.0.3/24", name="after", namespace="ns")
    wait_for(lambda: pod_map.lookup(packed("10.72.0.3")) == PodRef("ns", "after"), timeout=5)


def test_starts_before_ovsdb_and_waits_for_it(tmp_path):
    """The agent may come up first: the map keeps trying, and loads once OVSDB is there."""
    run_dir = tmp_path / "ovs"
    pods = PodMap(f"unix:{run_dir}/db.sock")
    pods.start()
    lab = None
    try:
        assert not pods.synced.wait(1)
        lab = OvsLab(run_dir)
        lab.add_pod("10.73.0.1/24", name="late", namespace="ns")
        wait_for(lambda: pods.lookup(packed("10.73.0.1")) == PodRef("ns", "late"), timeout=20)
    finally:
        pods.stop()
        if lab is not None:
            lab.stop()


def test_a_large_table_loads_whole(tmp_path):
    lab = OvsLab(tmp_path / "ovs", switch=False)
    pods = PodMap(f"unix:{lab.run_dir}/db.sock")
    try:
        addresses = lab.add_pod_rows(2000, "10.80.0.1")
        pods.start()
        assert pods.synced.wait(60)
        assert len(pods) == 2000
        assert pods.lookup(socket.inet_aton(addresses[1234])) == PodRef("ns-34", "pod-1234")
    finally:
        pods.stop()
        lab.stop()


# --- values over their bound (pods.MAX_VALUE_BYTES): OVSDB takes any length

def test_values_over_their_bound_are_left_out_alone():
    ids = pod_external_ids("web-1", "shop", ["10.10.1.5"], "02:00:00:00:00:01", "/x")
    addresses = ",".join(["10.10.1.5"] * 24 + ["fd00:10:200::55"])
    assert len(addresses) == 255
    at_bound = {**ids, "pod-name": "p" * 253, "pod-namespace": "n" * 63,
                "ip-address": addresses}
    assert pod_addresses("p1", at_bound) == (
        PodRef("n" * 63, "p" * 253), [packed("10.10.1.5")] * 24 + [packed("fd00:10:200::55")],
        frozenset())
    # one byte over: the value goes, the rest of the Pod stays
    assert pod_addresses("p1", {**ids, "pod-name": "p" * 254}) == (
        PodRef("shop", ""), [packed("10.10.1.5")], frozenset({"pod-name"}))
    # bytes, not characters: 32 two-byte characters are 64 bytes
    assert pod_addresses("p1", {**ids, "pod-namespace": "é" * 32}) == (
        PodRef("", "web-1"), [packed("10.10.1.5")], frozenset({"pod-namespace"}))
    # an address list is left out whole: a prefix could parse as another address
    assert pod_addresses("p1", {**ids, "ip-address": addresses + "5"}) == (
        PodRef("shop", "web-1"), [], frozenset({"ip-address"}))
    huge = "x" * 70_000
    assert pod_addresses("p1", {**ids, "pod-name": huge, "pod-namespace": huge,
                                "ip-address": huge, "container-id": huge}) == (
        PodRef("", ""), [], frozenset({"pod-name", "pod-namespace", "ip-address"}))
    # values the map does not read, and Ports that are not a Pod's, are not its concern
    assert pod_addresses("p1", {**ids, "container-id": huge, "net-ns": huge})[2] == frozenset()
    assert pod_addresses(huge, {"antrea-type": "gateway", "pod-name": huge}) == (
        None, [], frozenset())


def test_a_cut_is_counted_and_logged_once_per_port_and_key(caplog):
    """Without OVSDB (the map's own entry points, as the replica calls them): a Port is read
    again at every change of its row and after every reconnect; that is not a new cut."""
    pods = PodMap("unix:/nonexistent")  # never started
    ids = pod_external_ids("web", "shop", ["10.10.2.1"], "02:00:00:00:00:01", "/x")
    bad = {**ids, "pod-name": "w" * 70_000}
    with caplog.at_level(logging.WARNING, logger="ovsflow.pods"):
        for mac in ("02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"):
            pods._learn("uuid-1", "web-port", {**bad, "attached-mac": mac})
        assert pods.lookup(packed("10.10.2.1")) == PodRef("shop", "")
        assert pods.values_cut == 1
        pods._learn("uuid-1", "web-port", {**bad, "pod-namespace": "s" * 64})  # a second key
        assert pods.values_cut == 2
        pods._learn("uuid-2", "db-port", {**ids, "ip-address": "10.10.2.2",
                                          "pod-name": "d" * 300})  # another Port
        assert pods.values_cut == 3
        pods._learn("uuid-1", "web-port", ids)  # mended ...
        pods._learn("uuid-1", "web-port", bad)  # ... and broken again: a new cut
        assert pods.values_cut == 4
        pods._forget("uuid-2")
        assert pods._cut.keys() == {"uuid-1"}  # nothing kept for a Port that is gone
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 4, warnings
    assert warnings[0] == ("OVSDB Port web-port: external_ids:pod-name has 70000 bytes, over "
                           "253: not what Antrea writes; left out (1 so far)")
    assert "external_ids:pod-namespace has 64 bytes, over 63" in warnings[1]
    assert "pod-name " not in warnings[1]
    assert warnings[2].startswith("OVSDB Port db-port: external_ids:pod-name has 300 bytes")


def test_a_70000_byte_value_in_ovsdb_costs_that_field_alone(lab, caplog):
    """The real thing: ovsdb-server stores a 70,000-byte value; the map loads it (first dump
    and as a change), keeps the Pods, and counts the cut once per Port and key across an
    OVSDB restart (a reconnect reads every row again)."""
    huge = "x" * 70_000
    before = lab.add_pod("10.75.0.1/24", name="before", namespace="ns")
    lab.vsctl("set", "Port", before.port, f'external_ids:pod-name="{huge}"')
    assert lab.vsctl("get", "Port", before.port, "external_ids:pod-name").strip() == huge
    pods = PodMap(f"unix:{lab.run_dir}/db.sock")
    with caplog.at_level(logging.WARNING, logger="ovsflow.pods"):
        pods.start()
        try:
            assert pods.synced.wait(10)
            assert pods.lookup(packed("10.75.0.1")) == PodRef("ns", "")
            after = lab.add_pod("10.75.0.2/24", name="after", namespace="ns")
            lab.vsctl("set", "Port", after.port, f'external_ids:ip-address="{huge}"',
                      f'external_ids:container-id="{huge}"')
            # counted as the row is read, its addresses released just after
            wait_for(lambda: pods.values_cut == 2
                     and pods.lookup(packed("10.75.0.2")) is None, timeout=5)
            ok = lab.add_pod("10.75.0.3/24", name="ok", namespace="ns")
            wait_for(lambda: pods.lookup(packed("10.75.0.3")) == PodRef("ns", "ok"))

            lab.stop_daemon("ovsdb-server")
            lab.start_ovsdb()
            wait_for(lambda: pods.resyncs == 2, timeout=20)
            assert pods.lookup(packed("10.75.0.1")) == PodRef("ns", "")
            assert pods.values_cut == 2
            lab.remove_pod(after)
            lab.remove_pod(ok)  # the later change: once it is in, so is the one before
            wait_for(lambda: pods.lookup(packed("10.75.0.3")) is None)
            assert set(pods._cut.values()) == {frozenset({"pod-name"})}
        finally:
            pods.stop()
    cut_lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(cut_lines) == 2, cut_lines
    assert cut_lines[0].startswith(f"OVSDB Port {before.port}: external_ids:pod-name has "
                                   "70000 bytes, over 253")
    assert cut_lines[1].startswith(f"OVSDB Port {after.port}: external_ids:ip-address has "
                                   "70000 bytes, over 255")


def test_at_the_bounds_every_record_fits_a_udp_message_on_a_1500_byte_path():
    """What the bounds buy: Pod names and namespaces at their bounds at both ends, a node
    name of 253 bytes (a DNS subdomain as well), rule ids of ten digits, the longest TCP
    state: every template's record stays within a 1500-byte path MTU's UDP message (IPv6:
    40 + 8 bytes of headers, 16 of IPFIX message header, 4 of set header, 3 of padding)."""
    name, namespace = "p" * MAX_VALUE_BYTES["pod-name"], "n" * MAX_VALUE_BYTES["pod-namespace"]
    lengths = {}
    for (kind, ipv6), record_template in RECORD_TEMPLATES.items():
        address = bytes(16 if ipv6 else 4)
        record = FlowRecord(
            kind, address, address, 6, tcp_state="ESTABLISHED", source_pod_name=name,
            destination_pod_name=name, source_pod_namespace=namespace,
            destination_pod_namespace=namespace, source_node_name="x" * 253,
            destination_node_name="x" * 253, ingress_rule_name=str(2**32 - 1),
            egress_rule_name=str(2**32 - 1))
        lengths[kind, ipv6] = len(record_template.encode(record))
    assert max(lengths.values()) == lengths[CONNTRACK, True] == 1319  # as pods.py says
    assert max(lengths.values()) <= 1500 - 40 - 8 - 16 - 4 - 3
