"""The dump plan against every answer the filter probe can give. Which answers real kernels
give is tested on them: tests/test_conntrack_kernel.py (the host's), tests/test_kernel_61.py
(Debian 12's 6.1, in a VM). Here a few lines model what a kernel returns to a dump, given
which filters it applies; the model is no stand-in for a kernel (the tests above run the
real ones), it spells out what "no entry twice, none missing" means for a plan."""

import itertools
import socket

from hypothesis import given, strategies as st

from ovsflow.filter import ConnectionFilter
from ovsflow.protocols import parse_protocol_list
from ovsflow.source.kernel import Dump, KernelFilters, plan_dumps

ZONES = (0, 7, 100, 65510, 65520)
PROTOCOLS = {socket.AF_INET: (1, 6, 17, 47, 132), socket.AF_INET6: (6, 17, 47, 58, 132)}
TABLE = [(family, protocol, zone) for family, protocols in PROTOCOLS.items()
         for protocol in protocols for zone in ZONES]
ANSWERS = [KernelFilters(*flags) for flags in itertools.product((False, True), repeat=3)]


def returns(dump: Dump, kernel: KernelFilters, family: int, protocol: int, zone: int) -> bool:
    """Whether `kernel` puts the entry into the dump: filters it ignores let everything by."""
    return ((not kernel.family or dump.family in (0, family))
            and (not kernel.protocol or dump.protocol in (None, protocol))
            and (not kernel.zone or dump.zone in (None, zone)))


@given(zones=st.sets(st.sampled_from(ZONES)),
       protocols=st.none() | st.sets(st.sampled_from([1, 6, 17, 47, 58, 132]), min_size=1),
       kernel=st.sampled_from(ANSWERS))
def test_every_wanted_entry_comes_in_exactly_one_dump(zones, protocols, kernel):
    connection_filter = ConnectionFilter(frozenset(zones), parse_protocol_list(
        None if protocols is None else sorted(protocols)).protocols)
    plan = plan_dumps(connection_filter, kernel)
    for family, protocol, zone in TABLE:
        if connection_filter.accepts(zone, protocol):
            count = sum(returns(dump, kernel, family, protocol, zone) for dump in plan)
            assert count == 1, (family, protocol, zone, plan)


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
