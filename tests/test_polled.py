"""A poll's pieces as columns (`polled.Polled`): what `from_connections` makes of
connections, values out of range, and the bound on state names. The kernel decoder's columns
are held to the connections it decodes in tests/test_ctnetlink.py."""

import logging
import socket

import numpy as np
import pytest

from ovsflow import polled
from ovsflow.connection import Connection, identity, labels_bytes
from ovsflow.polled import STATE_NAMES, Malformed, Polled, key_bytes, key_rows

A, B = socket.inet_aton("10.1.0.1"), socket.inet_aton("10.1.0.2")


def conn(sport, **fields):
    return Connection(6, A, B, sport, 80, zone=7, key=identity(6, A, B, sport, 80, 0, 0, 0, 7),
                      **fields)


def test_columns_hold_what_the_store_compares():
    given = [conn(1, id=11, packets=2, octets=300, reply_packets=4, reply_octets=500,
                  start_ns=6 * 10**9, timeout=120, state="ESTABLISHED",
                  labels=labels_bytes(1 << 70 | 5)),
             conn(2, id=12, counted=False, state="TIME_WAIT", ended=True, mark=0x13)]
    columns = Polled.from_connections(given)
    assert key_bytes(columns.keys) == [c.key for c in given]
    assert columns.marks.tolist() == [0, 0x13]
    assert columns.ids.tolist() == [11, 12] and columns.zones.tolist() == [7, 7]
    assert columns.protocols.tolist() == [6, 6]
    assert (columns.packets.tolist(), columns.octets.tolist()) == ([2, 0], [300, 0])
    assert (columns.reply_packets.tolist(), columns.reply_octets.tolist()) == ([4, 0],
                                                                                [500, 0])
    assert columns.counted.tolist() == [True, False] and columns.ended.tolist() == [False, True]
    assert columns.starts_ns.tolist() == [6 * 10**9, 0]
    assert columns.timeouts.tolist() == [120, 0]
    assert [STATE_NAMES[code] for code in columns.states.tolist()] == ["ESTABLISHED",
                                                                        "TIME_WAIT"]
    assert [value.tobytes() for value in columns.labels] == [labels_bytes(1 << 70 | 5),
                                                            bytes(16)]
    chosen = columns.select(np.array([False, True]))
    assert key_bytes(chosen.keys) == [given[1].key] and chosen.ids.tolist() == [12]
    assert Polled.joined([chosen, columns]).ids.tolist() == [12, 11, 12]


def test_key_rows_keep_each_identity_and_its_length():
    """IPv4 (27 bytes) and IPv6 (51) identities share a column of fixed-width rows: each
    row says its identity's length, so that the two never look alike, whatever the bytes
    (an address that ends in zeros)."""
    a6 = socket.inet_pton(socket.AF_INET6, "fd00::")
    keys = [identity(6, A, B, 1, 80, 0, 0, 0, 7), identity(17, a6, a6, 2, 53, 0, 0, 0, 7),
            identity(6, bytes(4), bytes(4), 0, 0, 0, 0, 0, 0), bytes(51)]
    rows = key_rows(keys)
    assert rows.dtype.itemsize == polled.KEY_WIDTH and len(set(rows.tolist())) == 4
    assert key_bytes(rows) == keys
    assert key_bytes(rows[[0, 2]]) == [keys[0], keys[2]]  # one family: the fast way
    with pytest.raises(ValueError):
        key_rows([bytes(polled.KEY_WIDTH)])


@pytest.mark.parametrize("field, value", [("id", 2**32), ("packets", -1), ("zone", 70000),
                                          ("labels", b"x" * 17), ("mark", 2**32)])
def test_a_value_out_of_its_column_is_named_with_its_connection(field, value):
    bad = conn(2)._replace(**{field: value})
    with pytest.raises(Malformed) as caught:
        Polled.from_connections([conn(1), bad, conn(3)])
    assert caught.value.connection is bad


def test_state_names_past_the_bound_are_recorded_as_none(monkeypatch, caplog):
    """The codes are the process's: a source that names states without end (a broken one)
    cannot grow them without bound."""
    monkeypatch.setattr(polled, "MAX_STATES", len(STATE_NAMES) + 1)
    with caplog.at_level(logging.WARNING):
        codes = Polled.from_connections([conn(1, state="BOUND-TEST-1"),
                                         conn(2, state="BOUND-TEST-2"),
                                         conn(3, state="BOUND-TEST-2")]).states.tolist()
    assert STATE_NAMES[codes[0]] == "BOUND-TEST-1" and codes[1:] == [0, 0]
    assert caplog.text.count("'BOUND-TEST-2' recorded as none") == 1


def test_labels_differ_where_any_byte_of_a_row_does():
    rng = np.random.default_rng(7)
    first = rng.integers(0, 256, (64, 16), dtype="u1")
    second = first.copy()
    for row in range(0, 64, 2):  # every other row: one byte changed, at each place in turn
        second[row, row // 2 % 16] ^= 1 << (row % 8)
    as_labels = [np.ascontiguousarray(values).view(polled.LABELS).reshape(-1)
                 for values in (first, second)]
    expected = [bytes(a) != bytes(b) for a, b in zip(first, second)]
    assert expected == [row % 2 == 0 for row in range(64)]
    assert polled.labels_differ(*as_labels).tolist() == expected
    assert not polled.labels_differ(as_labels[0], as_labels[0].copy()).any()
