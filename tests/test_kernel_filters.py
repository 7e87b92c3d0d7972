"""The dump plan against every answer the filter probe can give. Which answers real kernels
give is tested on them: tests/test_conntrack_kernel.py (the host's), tests/test_kernel_61.py
(Debian 12's 6.1, in a VM). Here a few lines model what a kernel returns to a dump, given
which filters it applies; the model is no stand-in for a kernel (the tests above run the
real ones), it spells out what "no entry twice, none missing" means for a plan. Then the
probe's answer kept per boot, kernel and network namespace, against this machine's kernel."""

import itertools
import json
import logging
import os
import socket
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from ovsflow.filter import ConnectionFilter
from ovsflow.protocol_list import parse_protocol_list
from ovsflow.source.kernel import (
    Dump, KernelFilters, kept_filters, plan_dumps, probe_filters,
)
from ovsflow.state import network_namespace

ZONES = (0, 7, 100, 65510, 65520)
PROTOCOLS = {socket.AF_INET: (1, 6, 17, 47, 132), socket.AF_INET6: (6, 17, 47, 58, 132)}
PORTS = (22, 53, 80, 443, 8080)  # of each protocol with ports; 0 for the others
TABLE = [(family, protocol, zone, port) for family, protocols in PROTOCOLS.items()
         for protocol in protocols for zone in ZONES
         for port in (PORTS if protocol in (6, 17, 132) else (0,))]
# the flags, and the protocols whose ports are filtered: none, or what Linux 5.8-6.18 does
ANSWERS = [KernelFilters(*flags, ports=ports)
           for flags in itertools.product((False, True), repeat=3)
           for ports in (frozenset(), frozenset({6, 17}))]
ENTRIES = ["tcp", "udp", "icmp", "icmpv6", "gre", "sctp", "tcp/80", "tcp/443", "udp/53",
           "udp/53-80", "sctp/80", "sctp/443", "tcp/1-100", "tcp/22", "udp/8080"]


def returns(dump: Dump, kernel: KernelFilters, family: int, protocol: int, zone: int,
            port: int) -> bool:
    """Whether `kernel` puts the entry into the dump: filters it ignores let everything by
    (a port filter is one of CTA_FILTER's, beside the protocol)."""
    return ((not kernel.family or dump.family in (0, family))
            and (not kernel.protocol or dump.protocol in (None, protocol))
            and (not kernel.zone or dump.zone in (None, zone))
            and (not kernel.protocol or protocol not in kernel.ports
                 or dump.port in (None, port)))


@given(zones=st.sets(st.sampled_from(ZONES)),
       protocols=st.none() | st.sets(st.sampled_from(ENTRIES), min_size=1),
       kernel=st.sampled_from(ANSWERS))
def test_every_wanted_entry_comes_in_exactly_one_dump(zones, protocols, kernel):
    connection_filter = ConnectionFilter(frozenset(zones), parse_protocol_list(
        None if protocols is None else sorted(protocols)).protocols)
    plan = plan_dumps(connection_filter, kernel)
    for family, protocol, zone, port in TABLE:
        if connection_filter.accepts(zone, protocol, port):
            count = sum(returns(dump, kernel, family, protocol, zone, port) for dump in plan)
            assert count == 1, (family, protocol, zone, port, plan)


def filtered(zones, protocols) -> ConnectionFilter:
    return ConnectionFilter(frozenset(zones), parse_protocol_list(protocols).protocols)


def test_a_kernel_that_ignores_zones_gets_no_zone_in_its_dumps():
    """Linux 6.1 with Antrea's zones: one dump per family and protocol, not per zone too."""
    linux_6_1 = KernelFilters(family=True, protocol=True, zone=False)
    plan = plan_dumps(filtered([65520, 65510], ["tcp", "udp"]), linux_6_1)
    assert plan == [Dump(socket.AF_INET, None, 6), Dump(socket.AF_INET, None, 17),
                    Dump(socket.AF_INET6, None, 6), Dump(socket.AF_INET6, None, 17)]
    assert plan_dumps(filtered([65520, 65510], None), linux_6_1) == [Dump(0, None, None)]


def test_a_kernel_that_applies_every_filter_gets_a_dump_per_zone():
    plan = plan_dumps(filtered([65520, 65510], ["tcp"]), KernelFilters(True, True, True))
    assert plan == [Dump(socket.AF_INET, 65510, 6), Dump(socket.AF_INET6, 65510, 6),
                    Dump(socket.AF_INET, 65520, 6), Dump(socket.AF_INET6, 65520, 6)]


def test_protocol_dumps_need_the_family_filter_too():
    """CTA_FILTER's protocol needs a family in the request: a kernel that returned both
    families to each would hand over every entry twice."""
    plan = plan_dumps(filtered([65520], ["tcp"]), KernelFilters(family=False, protocol=True,
                                                                 zone=True))
    assert plan == [Dump(0, 65520, None)]


# The probe's answer kept per boot, kernel and network namespace (kernel.kept_filters): run
# against this machine's kernel, in the test process's own network namespace.

def origin() -> dict:
    return {"boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            "kernel": os.uname().release, "netns": network_namespace()}


def kept_file(directory: Path) -> Path:
    return directory / f"kernel-filters-{network_namespace()}.json"


def test_the_first_start_probes_and_keeps_the_answer(tmp_path):
    directory = tmp_path / "state"  # created when missing, as /var/run/ovsflow may be
    filters = kept_filters(str(directory))
    assert filters == probe_filters()
    kept = json.loads(kept_file(directory).read_text())
    assert kept == {"origin": origin(), "filters": filters.to_json()}
    assert kept["origin"]["netns"] > 0 and len(kept["origin"]["boot_id"]) == 36
    assert [path.name for path in directory.iterdir()] == [kept_file(directory).name]


def test_a_kept_answer_of_this_boot_kernel_and_namespace_is_used_without_probing(tmp_path):
    """The file says what no probe of this kernel says (every filter ignored): the answer
    read back is the file's."""
    kept_file(tmp_path).write_text(json.dumps({
        "origin": origin(),
        "filters": {"family": False, "protocol": True, "zone": False, "ports": [132]}}))
    assert kept_filters(str(tmp_path)) == KernelFilters(family=False, protocol=True,
                                                        zone=False, ports=frozenset({132}))


@pytest.mark.parametrize("change", ["boot_id", "kernel", "netns"])
def test_another_boot_kernel_or_namespace_answer_is_probed_again(tmp_path, caplog, change):
    foreign = origin() | {change: 1 if change == "netns" else "something else"}
    kept_file(tmp_path).write_text(json.dumps({
        "origin": foreign,
        "filters": {"family": False, "protocol": False, "zone": False, "ports": []}}))
    with caplog.at_level(logging.DEBUG, logger="ovsflow.source.kernel"):
        filters = kept_filters(str(tmp_path))
    assert filters == probe_filters()
    assert json.loads(kept_file(tmp_path).read_text())["origin"] == origin()
    [line] = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert "written for" in line and str(kept_file(tmp_path)) in line


@pytest.mark.parametrize("text", [
    "", "\x00\xff garbage", "[]", '{"origin": 5}', json.dumps({"filters": {}}),
    {"family": 1, "protocol": True}, {"family": True, "protocol": True, "zone": True},
    {"family": True, "protocol": True, "zone": True, "ports": [6, "x"]},
    {"family": True, "protocol": True, "zone": True, "ports": [[6]]}],
    ids=["empty", "garbage", "list", "origin", "no origin", "not flags", "before ports",
         "not a protocol", "unhashable"])
def test_a_corrupt_file_is_set_aside_with_one_debug_line(tmp_path, caplog, text):
    """Dicts: this machine's origin with an answer that is not one (or one written before
    the port filter was probed: probed again)."""
    if isinstance(text, dict):
        text = json.dumps({"origin": origin(), "filters": text})
    kept_file(tmp_path).write_text(text, errors="surrogateescape")
    with caplog.at_level(logging.DEBUG, logger="ovsflow.source.kernel"):
        filters = kept_filters(str(tmp_path))
    assert filters == probe_filters()
    assert len([r for r in caplog.records if "not used" in r.getMessage()]) == 1
    assert json.loads(kept_file(tmp_path).read_text())["filters"] == filters.to_json()


def test_no_state_directory_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert kept_filters("") == probe_filters()
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_directory_still_gives_the_answer(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the directory should be")
    assert kept_filters(str(blocked / "state")) == probe_filters()
