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
from ovsflow.pods import PodMap, PodRef, pod_addresses


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
        PodRef("shop", "web-1"), [packed("10.10.1.5"), packed("fd00:10::5")])
    # the gateway, tunnel and uplink ports carry other antrea-types; plain ports none
    assert pod_addresses("antrea-gw0", {**ids, "antrea-type": "gateway"}) == (None, [])
    assert pod_addresses("eth1", {}) == (None, [])
    with caplog.at_level(logging.WARNING, logger="ovsflow.pods"):
        pod, addresses = pod_addresses("web-2-def", {**ids, "ip-address": "10.10.1.6,bogus"})
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
