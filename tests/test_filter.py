"""The one filter: zones and protocols, and what it drops counted per protocol."""

from ovsflow.connection import Connection, identity
from ovsflow.filter import ConnectionFilter
from ovsflow.polled import Polled, key_bytes
from ovsflow.protocol_list import parse_protocol_list


def conn(protocol, zone, mark=0):
    return Connection(protocol, b"\0" * 4, b"\0" * 4, zone=zone, mark=mark)


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
    assert key_bytes(kept.keys) == [given[0].key, given[3].key, given[5].key]
    assert f.rejected == {6: 1, 17: 2}
    everything = ConnectionFilter(frozenset(), parse_protocol_list([]).protocols)
    whole = Polled.from_connections(given)
    assert everything.apply_polled(whole) is whole and not everything.rejected


def test_beside_antrea_entries_without_the_source_mark_are_left_out_outside_zone_0():
    """Antrea's ConntrackCommit sets ct_mark[0..3] (the packet's source) once policy allowed
    the connection; an entry committed earlier and then denied keeps 0 there (a Service's
    ct_mark 0x10 alone). Zone 0 is not Antrea's: its entries are not judged by the mark.
    The same rule over objects (`ovsflow conntrack`, the OVS source), columns (the kernel
    source) and single values (`--count`), counted by protocol as any entry left out."""
    marks = [0x13, 0x10, 0x0, 0x2, 0x0, 0x5]
    zones = [65520, 65520, 65510, 65510, 0, 65520]
    given = [conn(6 if i % 2 else 17, zone, mark)._replace(
        id=i, key=identity(6 if i % 2 else 17, b"\0" * 4, b"\0" * 4, i, 80, 0, 0, 0, zone))
        for i, (zone, mark) in enumerate(zip(zones, marks))]
    wanted = [0, 3, 4, 5]  # source bits set, or zone 0
    beside_antrea = ConnectionFilter(frozenset(), parse_protocol_list([]).protocols, True)
    assert [c.id for c in beside_antrea.apply(given)] == wanted
    assert beside_antrea.rejected == {6: 1, 17: 1}
    columns = ConnectionFilter(frozenset(), parse_protocol_list([]).protocols, True)
    assert columns.apply_polled(Polled.from_connections(given)).ids.tolist() == wanted
    assert columns.rejected == {6: 1, 17: 1}
    assert [i for i, c in enumerate(given)
            if columns.accepts(c.zone, c.protocol, 80, c.mark)] == wanted
    # without Antrea: the mark means nothing
    plain = ConnectionFilter(frozenset(), parse_protocol_list([]).protocols)
    assert plain.apply(given) == given
    assert len(plain.apply_polled(Polled.from_connections(given))) == 6
