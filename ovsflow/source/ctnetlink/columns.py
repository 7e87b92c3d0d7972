"""The agent's poll of the kernel's conntrack: receive buffers in, `polled.Polled` columns out.

This is where the agent spends most of what it adds to the kernel's own dump, so it is
built for numpy's strengths: a few calls over thousands of entries, never a Python
statement per entry. A run of receive buffers (~1 MB, ~3,500 entries) is received straight
into one buffer (`room`, `received`; or `feed` for bytes at hand), then `take` decodes it:

1. **Where the messages start.** Every message of a dump carries the dump request's
   sequence number in the third word of its header: the words equal to it are the
   candidates, kept only if they chain exactly (each message starts where the one before
   ends, from the run's first byte to its last). A look-alike inside an entry breaks the
   chain and the run is walked message by message instead (`dump.entries`).
2. **One layout at a time.** Entries of one kind come with the same attributes at the same
   offsets: the layouts `layouts.learn` described from the walk of a first message.
   Each message of a layout's length is copied out as a row of words (one gather of whole
   rows); each row is read as records whose fields sit where the layout has them: its
   attribute headers (compared with the layout's as one record), its values, and the
   fields of its key, copied as raw bytes to where `polled.KEY` has them.
3. An entry of no known layout is decoded by the walk, which learns its layout.

numpy is imported here and only here in the source: `ovsflow conntrack` does without it.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ...connection import ENDED_STATES, IDENTITY_FIELDS, Connection
from ...polled import EMPTY, KEY, KEY_WIDTH, LABELS, Malformed, Polled, state_code
from .dump import CT_NEW, LENGTH_TYPE, entries
from .layouts import LAYOUTS
from .walk import walk
from .wire import IPS_DYING, NFGENMSG, NLMSG_DONE, NLMSGHDR, CtnetlinkError

_BODY = NLMSGHDR.size + NFGENMSG.size  # an entry's attributes start this far in
_BODY_WORDS = _BODY // 4
_DONE_SIZE = NLMSGHDR.size + 4  # NLMSG_DONE and its errno
_DONE = (_DONE_SIZE, NLMSG_DONE)  # its length and type
_TYPE = struct.Struct("=H").unpack_from

# The values a Polled takes from a message: name and struct code. Each layout reads them as
# the fields of a record over its messages' rows of words, where the layout has them (a
# value the message lacks is 0).
_VALUES = (("protocol", "B"), ("zone", "H"), ("destination_port", "H"), ("start_ns", "Q"),
           ("id", "I"), ("packets", "Q"), ("octets", "Q"), ("reply_packets", "Q"),
           ("reply_octets", "Q"), ("timeout", "I"), ("status", "I"), ("state", "B"),
           ("labels", "16s"), ("mark", "I"))
_NUMPY = {"B": "u1", "H": ">u2", "I": ">u4", "Q": ">u8", "16s": LABELS}


class _Gathers(NamedTuple):
    """What `take` reads of the messages of one layout, each as the fields of a record over
    a message's row of words (a view: nothing gathered but the fields)."""

    headers: np.dtype  # the attribute headers (each a word)
    expected: np.void  # and what they must be, as one record
    values: np.dtype  # the _VALUES it has
    key_fields: np.dtype  # the identity's fields it has, as raw bytes
    key: np.dtype  # the same fields where `polled.KEY` has them (none: zeros, ICMP's ports)
    key_length: int  # of the identity (27 or 51)
    state_codes: np.ndarray  # polled.STATE_NAMES codes by the state's byte
    state_ended: np.ndarray  # and whether that state ends a connection


_GATHERS: dict[tuple, _Gathers | None] = {}  # layout description -> its gathers


def _gathers(description: tuple, names: tuple[str, ...] | None, width: int
             ) -> _Gathers | None:
    """A layout's gathers (its messages' rows `width` words long), made once per layout.
    None for a layout the columns cannot take (labels not 128 bits): the walk decodes
    those."""
    if description in _GATHERS:
        return _GATHERS[description]
    headers, leaves = description
    at = {name: (offset, struct.calcsize(">" + code)) for offset, code, name in leaves}
    gathers = None
    if at.get("labels", (0, 16))[1] == 16:
        present = [(name, code) for name, code in _VALUES if name in at]
        values = np.dtype({"names": [name for name, _ in present],
                           "formats": [_NUMPY[code] for _, code in present],
                           "offsets": [at[name][0] for name, _ in present],
                           "itemsize": 4 * width})
        address = at["source"][1]
        key_names, offsets, key_offsets, formats, key_length = [], [], [], [], 0
        for name, code in [*IDENTITY_FIELDS, ("source", f"{address}s"),
                           ("destination", f"{address}s")]:
            size = struct.calcsize(">" + code)
            if name in at:
                key_names.append(name)
                offsets.append(at[name][0])
                key_offsets.append(key_length)
                formats.append(f"V{size}")
            key_length += size
        # the headers as words read in the host's order, compared as one record each
        header_names = [f"h{i}" for i in range(len(headers))]
        expected = np.frombuffer(b"".join(value.to_bytes(4, "big") for _, value in headers),
                                 [(name, np.uint32) for name in header_names])[0]
        named = names or ("",) * 256
        gathers = _Gathers(
            np.dtype({"names": header_names, "formats": [np.uint32] * len(headers),
                      "offsets": [offset for offset, _ in headers], "itemsize": 4 * width}),
            expected, values,
            np.dtype({"names": key_names, "formats": formats, "offsets": offsets,
                      "itemsize": 4 * width}),
            np.dtype({"names": key_names, "formats": formats, "offsets": key_offsets,
                      "itemsize": KEY_WIDTH}),
            key_length,
            np.array([state_code(name) if names else 0 for name in named], np.uint16),
            np.array([name in ENDED_STATES for name in named], bool))
    if len(_GATHERS) > 64:  # layouts come and go with the kernel's: keep the recent ones
        _GATHERS.clear()
    _GATHERS[description] = gathers
    return gathers


class ColumnDecoder:
    """A run of receive buffers in, one `polled.Polled` out (see the module's docstring).
    `room` is where the next buffer is to be received, `received` says how much was (and
    whether the dump is complete); `take` decodes the run and starts the next."""

    def __init__(self, run: int = 1 << 20, receive: int = 1 << 16):
        self._receive = receive
        self._buffer = bytearray(run + receive)
        self._view = memoryview(self._buffer)
        self._clear()

    def _clear(self) -> None:
        self.size = 0  # bytes received since the last take
        # (begin, end, starts, lengths): a part of the run and its entries, read in `take`
        # (starts None) or already walked; and where the part of entries being received
        # began (None: none is)
        self._parts: list[tuple[int, int, np.ndarray | None, np.ndarray | None]] = []
        self._plain: int | None = None

    def _make_room(self, count: int) -> None:
        if len(self._buffer) < self.size + count:
            self._view.release()
            self._buffer.extend(bytes(self.size + count - len(self._buffer)))
            self._view = memoryview(self._buffer)

    def room(self) -> memoryview:
        """Where the next receive buffer goes: `receive` bytes (give it whole to recv_into:
        the kernel sizes its dump buffers by what is asked)."""
        self._make_room(self._receive)
        return self._view[self.size:self.size + self._receive]

    def feed(self, data: bytes) -> bool:
        """`received` for a buffer at hand."""
        self._make_room(len(data))
        self._buffer[self.size:self.size + len(data)] = data
        return self.received(len(data))

    def received(self, count: int) -> bool:
        """The `count` bytes after the run so far are a receive buffer: True when the dump
        is complete. A buffer of entries is read in `take`; any other (the dump's end, an
        error reply) is walked now. The dump's end comes last in its buffer (the kernel
        adds it after the entries it fits, or in a buffer of its own), so a buffer whose
        tail is not an NLMSG_DONE holds no end."""
        begin = self.size
        end = begin + count
        self.size = (end + 3) & ~3  # the next buffer on a word
        data = self._buffer
        if (count >= _DONE_SIZE and not count & 3 and _TYPE(data, begin + 4)[0] == CT_NEW
                and LENGTH_TYPE(data, end - _DONE_SIZE) != _DONE):
            if self._plain is None:
                self._plain = begin
            return False
        self._end_plain(begin)
        starts, lengths, done = entries(bytes(data[begin:end]))
        self._parts.append((begin, end, np.array(starts, np.intp) + begin,
                            np.array(lengths, np.intp)))
        return done

    def _end_plain(self, end: int) -> None:
        if self._plain is not None:
            self._parts.append((self._plain, end, None, None))
            self._plain = None

    def take(self) -> Polled:
        """The entries received since the last take, decoded."""
        self._end_plain(self.size)
        parts, size = self._parts, self.size
        self._clear()
        words = np.frombuffer(self._buffer, np.uint32, size // 4)
        starts, lengths = [], []
        for begin, end, part_starts, part_lengths in parts:
            if part_starts is None:
                part_starts, part_lengths = _chain(words[begin // 4:end // 4])
                if part_starts is None:  # a look-alike: walked
                    walked, sizes, _ = entries(bytes(self._buffer[begin:end]))
                    part_starts, part_lengths = np.array(walked, np.intp), np.array(sizes)
                part_starts = part_starts + begin
            starts.append(part_starts)
            lengths.append(part_lengths)
        if not parts:
            return EMPTY
        return self._decode(words, np.concatenate(starts), np.concatenate(lengths))

    def _decode(self, words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> Polled:
        """Each layout's messages written into one set of columns for the whole run; the
        walk's (first messages of a layout, odd ones) as a piece of their own."""
        out = _Columns(len(starts))
        walked: list[Connection] = []
        for length in np.flatnonzero(np.bincount(lengths)).tolist():
            pending = starts[lengths == length]
            rows = None
            if length > _BODY:  # each message's words from its body on, one row each
                # (np.take would first copy the whole window view: indexing does not)
                rows = sliding_window_view(words, (length - _BODY + 3) // 4)[
                    pending // 4 + _BODY_WORDS]
            tried: set[int] = set()
            while len(pending):
                for layout in LAYOUTS.get(length, ()) if rows is not None else ():
                    if id(layout) in tried or not len(pending):
                        continue
                    tried.add(id(layout))
                    gathers = _gathers(layout[11], layout[4], rows.shape[1])
                    if gathers is None:
                        continue
                    matched = rows.view(gathers.headers).ravel() == gathers.expected
                    if matched.all():  # as usual: no copy
                        out.write(rows, gathers)
                        pending = pending[:0]
                    elif matched.any():
                        out.write(rows[matched], gathers)
                        pending, rows = pending[~matched], rows[~matched]
                if len(pending):  # of no layout known yet: the walk decodes it, and learns
                    first = int(pending[0])
                    message = bytes(self._buffer[first:first + length])
                    walked.append(walk(message, 0, _BODY, length))
                    pending = pending[1:]  # the rest: with what it learned
                    rows = rows[1:] if rows is not None else None
        decoded = out.polled()
        if walked:
            try:
                return Polled.joined([decoded, Polled.from_connections(walked)])
            except Malformed as err:
                raise CtnetlinkError(f"conntrack entry with a value out of range: {err}"
                                     ) from None
        return decoded


def _chain(words: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The starts (bytes) and lengths of a run's messages, if the words that hold the
    first message's sequence number chain exactly, as an entry's header each (see the
    module's docstring); (None, None) otherwise."""
    if len(words) < 4:
        return None, None
    starts = np.flatnonzero(words == words[2]) - 2
    starts = starts[(starts >= 0) & (starts + 4 <= len(words))]
    types = words.view(np.uint16)[2 * starts + 2]  # each header's type, as the host reads it
    starts = starts[(types == CT_NEW) & (words[starts + 3] == words[3])]
    if not len(starts) or starts[0]:
        return None, None
    lengths = words[starts].astype(np.intp)
    ends = starts + ((lengths + 3) >> 2)
    if ends[-1] != len(words) or (starts[1:] != ends[:-1]).any() or (lengths < _BODY).any():
        return None, None
    return 4 * starts, lengths


# The columns of a run, as `_Columns` fills them (the identities aside): the _VALUES as
# the store takes them, then what the state's byte and the status say
_OUTPUT = (("protocol", np.uint8), ("zone", np.uint16), ("destination_port", np.uint16),
           ("start_ns", np.uint64), ("id", np.uint32), ("packets", np.uint64),
           ("octets", np.uint64), ("reply_packets", np.uint64), ("reply_octets", np.uint64),
           ("timeout", np.uint32), ("status", np.uint32), ("state_byte", np.uint8),
           ("labels", LABELS), ("mark", np.uint32), ("state", np.uint16), ("ended", bool))


class _Columns:
    """A run's columns, filled layout by layout (`write`), then handed over as a Polled."""

    def __init__(self, size: int):
        self.filled = 0
        self.keys = np.zeros((size, KEY_WIDTH), np.uint8)
        self.values = {name: np.empty(size, dtype) for name, dtype in _OUTPUT}

    def write(self, rows: np.ndarray, gathers: _Gathers) -> None:
        """Messages of one layout at the next rows: their `rows` of words (from the body
        on), read as records of the layout's values and of its key's fields."""
        first = self.filled
        self.filled = last = first + len(rows)
        values = rows.view(gathers.values).ravel()
        columns = {name: column[first:last] for name, column in self.values.items()}
        for name, _ in _VALUES:  # from the wire's byte order
            column = columns["state_byte" if name == "state" else name]
            if name in values.dtype.names:
                np.copyto(column, values[name])
            else:
                column.view(np.uint8).fill(0)
        state = columns["state_byte"]
        np.take(gathers.state_codes, state, out=columns["state"])
        np.bitwise_and(columns["status"], IPS_DYING, out=columns["status"])
        np.logical_or(gathers.state_ended[state], columns["status"], out=columns["ended"])
        keys = self.keys[first:last]  # zeros where the layout has no field
        keys.view(gathers.key).ravel()[...] = rows.view(gathers.key_fields).ravel()
        keys[:, -1] = gathers.key_length

    def polled(self) -> Polled:
        last, v = self.filled, self.values
        return Polled(
            self.keys[:last].view(KEY).ravel(), v["protocol"][:last], v["zone"][:last],
            v["destination_port"][:last], v["id"][:last], v["packets"][:last],
            v["octets"][:last], v["reply_packets"][:last], v["reply_octets"][:last],
            np.ones(last, bool), v["start_ns"][:last], v["timeout"][:last], v["state"][:last],
            v["labels"][:last], v["ended"][:last], v["mark"][:last])
