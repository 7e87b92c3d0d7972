"""A piece of a poll as columns: what the store compares and keeps of each polled connection.

A poll brings 10k-500k connections, nearly all unchanged since the one before. As columns,
the store matches them with its own in a few array operations (`store/poll.py`)
instead of a loop of Python statements per connection. The kernel decoder makes them
straight from its receive buffers (`ctnetlink.columns.ColumnDecoder`: a few gathers per
learned layout, no object per entry); `from_connections` makes them from `Connection`s
(the OVS source's parser, the tests).

States and labels are columns of numbers too: a state is a code in `STATE_NAMES` (every
state any source names gets one, for the life of the process), labels are the kernel's 16
bytes (all zero: none, as the kernel sends none then). Keys are too: each connection's
identity (`connection.identity`, 27 bytes for IPv4, 51 for IPv6) as a row of `KEY`, so
that the store finds a whole piece's connections with array operations
(`store/index.py`) and no `bytes` object is made per connection and poll.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from .connection import Connection

log = logging.getLogger(__name__)

LABELS = np.dtype("V16")
NO_LABELS = bytes(16)
# A key row: the identity's bytes, zeros, and in the last byte the identity's length (27 or
# 51): the row says how much of it is the identity, and the two families never look alike.
# 56 bytes: seven 64-bit words, which the index hashes and compares.
KEY_WIDTH = 56
KEY = np.dtype(f"V{KEY_WIDTH}")
MAX_STATES = 4096  # distinct state names kept; any further one is recorded as ""
STATE_NAMES: list[str] = [""]  # by code
_STATE_CODES: dict[str, int] = {"": 0}


def labels_differ(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """first != second, row by row, for two contiguous columns of LABELS: numpy compares
    16-byte values one at a time, ~5x slower than this, which compares them as two u8
    and reads the two answers of a row as one u2."""
    return (first.view("u8") != second.view("u8")).view("u2") != 0


def key_rows(keys: Sequence[bytes]) -> np.ndarray:
    """Identities (`connection.identity`) as `KEY` rows."""
    rows = np.zeros((len(keys), KEY_WIDTH), np.uint8)
    if keys:
        lengths = np.fromiter(map(len, keys), np.intp, len(keys))
        if (lengths >= KEY_WIDTH).any():
            raise ValueError(f"a key of {lengths.max()} bytes: at most {KEY_WIDTH - 1}")
        for length in np.unique(lengths).tolist():  # one family at a time: no loop per key
            of_length = np.flatnonzero(lengths == length)
            rows[of_length, :length] = np.frombuffer(
                b"".join([keys[i] for i in of_length.tolist()]), np.uint8).reshape(-1, length)
        rows[:, -1] = lengths
    return rows.view(KEY).ravel()


def key_bytes(rows: np.ndarray) -> list[bytes]:
    """`KEY` rows back as identities, in order."""
    octets = rows.view(np.uint8).reshape(len(rows), KEY_WIDTH)
    lengths = octets[:, -1]
    if len(rows) and (lengths == lengths[0]).all():  # one family, as usual: in one C call
        return np.ascontiguousarray(octets[:, :lengths[0]]).view(f"V{lengths[0]}").ravel(
            ).tolist()
    return [row[:length].tobytes() for row, length in zip(octets, lengths.tolist())]


def rows_equal(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Row by row, whether `first` (2-D) equals `second` (of its shape, or one row for all):
    the rows with a difference found in one pass (`.all(axis=1)` over rows of a few values
    costs 5x as much)."""
    equal = np.ones(len(first), bool)
    equal[np.flatnonzero((first != second).ravel()) // first.shape[1]] = False
    return equal


def state_code(name: str) -> int:
    code = _STATE_CODES.get(name)
    if code is None:
        if len(STATE_NAMES) >= MAX_STATES:
            if len(_STATE_CODES) < 2 * MAX_STATES:  # each said once, up to a bound
                _STATE_CODES[name] = 0
                log.warning("more than %d distinct connection states: %r recorded as none",
                            MAX_STATES, name)
            return 0
        code = _STATE_CODES[name] = len(STATE_NAMES)
        STATE_NAMES.append(name)
    return code


class Malformed(ValueError):
    """A connection with a value its column cannot hold; `connection` says which."""

    def __init__(self, connection: Connection, reason: str):
        super().__init__(reason)
        self.connection = connection


@dataclass
class Polled:
    """Connections of one piece of a poll, a row each."""

    keys: np.ndarray  # KEY rows: Connection.key
    protocols: np.ndarray  # u1, zones and destination ports u2: what the filter reads
    zones: np.ndarray
    destination_ports: np.ndarray  # of the original direction (0 without ports, ICMP)
    ids: np.ndarray  # u4
    packets: np.ndarray  # u8, as are the other three counters
    octets: np.ndarray
    reply_packets: np.ndarray
    reply_octets: np.ndarray
    counted: np.ndarray  # bool: the source keeps counters
    starts_ns: np.ndarray  # u8, 0: unknown
    timeouts: np.ndarray  # u4, seconds left
    states: np.ndarray  # u2, codes in STATE_NAMES
    labels: np.ndarray  # LABELS
    ended: np.ndarray  # bool, Connection.ended
    marks: np.ndarray  # u4, the conntrack mark: what the filter reads beside Antrea

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, chosen: np.ndarray) -> Polled:
        """The rows at `chosen` (a mask or positions)."""
        return Polled(*(getattr(self, column.name)[chosen] for column in fields(self)))

    @classmethod
    def joined(cls, pieces: Sequence[Polled]) -> Polled:
        if len(pieces) == 1:
            return pieces[0]
        return cls(*(np.concatenate([getattr(piece, column.name) for piece in pieces])
                     for column in fields(cls)))

    @classmethod
    def from_connections(cls, connections: Sequence[Connection]) -> Polled:
        """Raises Malformed, naming the first connection with a value out of its column's
        range (a port over 65535, an id over 32 bits: a source gone wrong)."""
        if not connections:
            return EMPTY
        values = dict(zip(Connection._fields, zip(*connections)))
        try:
            return cls._from_values(values)
        except (ValueError, TypeError, OverflowError):
            for connection in connections:  # which one
                try:
                    cls._from_values(dict(zip(Connection._fields, zip(connection))))
                except (ValueError, TypeError, OverflowError) as err:
                    raise Malformed(connection, str(err)) from None
            raise  # out of range together only: not expected

    @classmethod
    def _from_values(cls, values: dict) -> Polled:
        labels = values["labels"]
        if any(labels):
            if max(map(len, labels)) > LABELS.itemsize:
                raise ValueError("labels longer than 128 bits")
            labels_column = np.array(labels, f"S{LABELS.itemsize}").view(LABELS)
        else:
            labels_column = np.zeros(len(labels), LABELS)
        return cls(
            key_rows(values["key"]), np.array(values["protocol"], "u1"),
            np.array(values["zone"], "u2"), np.array(values["destination_port"], "u2"),
            np.array(values["id"], "u4"),
            np.array(values["packets"], "u8"), np.array(values["octets"], "u8"),
            np.array(values["reply_packets"], "u8"), np.array(values["reply_octets"], "u8"),
            np.array(values["counted"], bool), np.array(values["start_ns"], "u8"),
            np.array(values["timeout"], "u4"),
            np.fromiter(map(state_code, values["state"]), "u2", len(labels)),
            labels_column, np.array(values["ended"], bool), np.array(values["mark"], "u4"))


EMPTY = Polled(*(np.zeros(0, dtype) for dtype in (
    KEY, "u1", "u2", "u2", "u4", "u8", "u8", "u8", "u8", bool, "u8", "u4", "u2", LABELS, bool,
    "u4")))
