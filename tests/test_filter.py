"""The one filter: zones and protocols, and what it drops counted per protocol."""

from ovsflow.connection import Connection, identity
from ovsflow.filter import ConnectionFilter
from ovsflow.polled import Polled
from ovsflow.protocol_list import parse_protocol_list


def conn(protocol, zone):
    return Connection(protocol, b"\0" * 4, b"\0" * 4, zone=zone)


def test_zones_and_protocols_and_what_was_dropped():
    f = ConnectionFilter(frozenset({0, 7}), parse_protocol_list(["tcp", "icmp"]).protocols)
    given = [conn(6, 0), conn(6, 9), conn(17, 0), conn(1, 7), conn(17, 7), conn(6, 7)]
    kept = f.apply(given)
    assert [(c.protocol, c.zone) for c in kept] == [(6, 0), (1, 7), (6, 7)]
    assert f.rejected == {6: 1, 17: 2}
    assert f.accepts(0, 6, 0) and not f.accepts(9, 6, 0) and not f.accepts(0, 17, 0)
    assert f.accepts_protocol(1) and not f.accepts_protocol(17)


def test_every_zone_and_every_protocol_keeps_everything():
    f = ConnectionFilter(frozenset(), parse_protocol_list([]).protocols)
    given = [conn(47, 3), conn(132, 65520)]
    assert f.apply(given) == given and not f.rejected


def test_columns_are_filtered_and_counted_alike():
    """The kernel source's pieces (columns) through the same rule."""
    f = ConnectionFilter(frozenset({0, 7}), parse_protocol_list(["tcp", "icmp"]).protocols)
    given = [c._replace(key=identity(c.protocol, c.source, c.destination, 0, 0, 0, 0, 0,
                                     c.zone), id=index)
             for index, c in enumerate([conn(6, 0), conn(6, 9), conn(17, 0), conn(1, 7),
                                        conn(17, 7), conn(6, 7)])]
    kept = f.apply_polled(Polled.from_connections(given))
    assert list(zip(kept.protocols.tolist(), kept.zones.tolist(), kept.ids.tolist())) == [
        (6, 0, 0), (1, 7, 3), (6, 7, 5)]
    assert kept.keys == [given[0].key, given[3].key, given[5].key]
    assert f.rejected == {6: 1, 17: 2}
    everything = ConnectionFilter(frozenset(), parse_protocol_list([]).protocols)
    whole = Polled.from_connections(given)
    assert everything.apply_polled(whole) is whole and not everything.rejected
