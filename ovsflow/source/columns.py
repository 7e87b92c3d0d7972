"""The agent's poll of the kernel's conntrack: receive buffers in, `polled.Polled` columns out.

This is where the agent spends most of what it adds to the kernel's own dump, so it is
built for numpy's strengths: a few calls over thousands of entries, never a Python
statement per entry. A run of receive buffers (~1 MB, ~3,500 entries) is received straight
into one buffer (`room`, `received`; or `feed` for bytes at hand), then `take` decodes it:

1. **Where the messages start.** Every message of a dump carries the dump request's
   sequence number in the third word of its header: the words equal to it are the
   candidates, kept only if they chain exactly (each message starts where the one before
   ends, from the run's first byte to its last). A look-alike inside an entry breaks the
   chain and the run is walked message by message instead (`ctnetlink._entries`).
2. **One layout at a time.** Entries of one kind come with the same attributes at the same
   offsets: the layouts `ctnetlink._learn` described from the walk of a first message.
   Each message of a layout's length is copied out as a row of words (one gather of whole
   rows), its attribute headers compared with the layout's at once, and its values and
   key read from the rows: the values as whole words, the key (`polled.KEY`) byte by byte.
3. An entry of no known layout is decoded by the walk, which learns its layout.

numpy is imported here and only here in the source: `ovsflow conntrack` does without it.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..connection import ENDED_STATES, IDENTITY_FIELDS, Connection
from ..polled import EMPTY, KEY, KEY_WIDTH, LABELS, Malformed, Polled, rows_equal, state_code
from .ctnetlink import (
    _CT_NEW, _LAYOUTS, _LENGTH_TYPE, IPS_DYING, NFGENMSG, NLMSG_DONE, NLMSGHDR, CtnetlinkError,
    _entries, _walk,
)

_BODY = NLMSGHDR.size + NFGENMSG.size  # an entry's attributes start this far in
_BODY_WORDS = _BODY // 4
_DONE_SIZE = NLMSGHDR.size + 4  # NLMSG_DONE and its errno

# The values a Polled takes from a message, each read as the whole words it lies in (every
# attribute's payload starts on a word): name, struct code, words. A value's place in the
# row of words is fixed, whatever the layout; one the message lacks reads as zero.
_VALUES = (("protocol", "B", 1), ("zone", "H", 1), ("destination_port", "H", 1),
           ("start_ns", "Q", 2), ("id", "I", 1), ("packets", "Q", 2), ("octets", "Q", 2),
           ("reply_packets", "Q", 2), ("reply_octets", "Q", 2), ("timeout", "I", 1),
           ("status", "I", 1), ("state", "B", 1), ("labels", "16s", 4), ("mark", "I", 1))
_NUMPY = {"B": "u1", "H": ">u2", "I": ">u4", "Q": ">u8", "16s": LABELS}
_VALUE_ROW = np.dtype({"names": [name for name, _, _ in _VALUES],
                       "formats": [_NUMPY[code] for _, code, _ in _VALUES],
                       "offsets": [4 * sum(words for _, _, words in _VALUES[:i])
                                   for i in range(len(_VALUES))],
                       "itemsize": 4 * sum(words for _, _, words in _VALUES)})


class _Gathers(NamedTuple):
    """What `take` reads of the messages of one layout."""

    header_words: np.ndarray  # where the attribute headers are (words into the body)
    headers: np.ndarray  # and what they must be
    value_words: np.ndarray  # the words of _VALUE_ROW
    value_zeros: np.ndarray  # its words the message does not have
    key_bytes: np.ndarray  # the identity's bytes (bytes into the body)
    key_zeros: np.ndarray  # those of them that are none of the message's
    key_length: int  # of the identity (27 or 51)
    state_codes: np.ndarray  # polled.STATE_NAMES codes by the state's byte
    state_ended: np.ndarray  # and whether that state ends a connection


_GATHERS: dict[tuple, _Gathers | None] = {}  # layout description -> its gathers


def _gathers(description: tuple, names: tuple[str, ...] | None) -> _Gathers | None:
    """A layout's gathers, made once per layout. None for a layout the columns cannot
    take (labels not 128 bits, an attribute off its word): the walk decodes those."""
    if description in _GATHERS:
        return _GATHERS[description]
    headers, leaves = description
    at = {name: (offset, struct.calcsize(">" + code)) for offset, code, name in leaves}
    gathers = None
    if at.get("labels", (0, 16))[1] == 16 and all(offset % 4 == 0 for offset, _ in at.values()):
        value_words, value_zeros = [], []
        for name, _, words in _VALUES:
            offset = at.get(name, (None,))[0]
            if offset is None:
                value_zeros += range(len(value_words), len(value_words) + words)
            value_words += [(offset or 0) // 4 + i for i in range(words)]
        address = at["source"][1]
        key_bytes: list[int] = []
        for name, code in [*IDENTITY_FIELDS, ("source", f"{address}s"),
                           ("destination", f"{address}s")]:
            offset = at.get(name, (None,))[0]
            key_bytes += [-1 if offset is None else offset + i
                          for i in range(struct.calcsize(">" + code))]
        named = names or ("",) * 256
        gathers = _Gathers(
            np.array([offset // 4 for offset, _ in headers], np.intp),
            np.frombuffer(b"".join(value.to_bytes(4, "big") for _, value in headers),
                          np.uint32),
            np.array(value_words, np.intp), np.array(value_zeros, np.intp),
            np.maximum(np.array(key_bytes, np.intp), 0),
            np.flatnonzero(np.array(key_bytes) < 0), len(key_bytes),
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
        self._clear()

    def _clear(self) -> None:
        self.size = 0  # bytes received since the last take
        # (begin, end, starts, lengths): a part of the run and its entries, read in `take`
        # (starts None) or already walked
        self._parts: list[tuple[int, int, np.ndarray | None, np.ndarray | None]] = []

    def room(self) -> memoryview:
        """Where the next receive buffer goes: `receive` bytes (give it whole to recv_into:
        the kernel sizes its dump buffers by what is asked)."""
        if len(self._buffer) < self.size + self._receive:
            self._buffer.extend(bytes(self.size + self._receive - len(self._buffer)))
        return memoryview(self._buffer)[self.size:self.size + self._receive]

    def feed(self, data: bytes) -> bool:
        """`received` for a buffer at hand."""
        if len(self._buffer) < self.size + len(data):
            self._buffer.extend(bytes(self.size + len(data) - len(self._buffer)))
        self._buffer[self.size:self.size + len(data)] = data
        return self.received(len(data))

    def received(self, count: int) -> bool:
        """The `count` bytes after the run so far are a receive buffer: True when the dump
        is complete. A buffer of entries is read in `take`; any other (the dump's end, an
        error reply) is walked now. The dump's end comes last in its buffer (the kernel
        adds it after the entries it fits, or in a buffer of its own), so a buffer whose
        tail is not an NLMSG_DONE holds no end."""
        begin, end = self.size, self.size + count
        self.size = (end + 3) & ~3  # the next buffer on a word
        data = self._buffer
        plain = count >= NLMSGHDR.size and count % 4 == 0 \
            and _LENGTH_TYPE(data, begin)[1] == _CT_NEW
        if plain and not (count >= _DONE_SIZE and _LENGTH_TYPE(data, end - _DONE_SIZE)
                          == (_DONE_SIZE, NLMSG_DONE)):
            parts = self._parts
            if parts and parts[-1][2] is None and parts[-1][1] == begin:
                parts[-1] = (parts[-1][0], end, None, None)  # one part of many buffers
            else:
                parts.append((begin, end, None, None))
            return False
        starts, lengths, done = _entries(bytes(data[begin:end]))
        self._parts.append((begin, end, np.array(starts, np.intp) + begin,
                            np.array(lengths, np.intp)))
        return done

    def take(self) -> Polled:
        """The entries received since the last take, decoded."""
        parts, size = self._parts, self.size
        self._clear()
        words = np.frombuffer(self._buffer, np.uint32, size // 4)
        starts, lengths = [], []
        for begin, end, part_starts, part_lengths in parts:
            if part_starts is None:
                part_starts, part_lengths = _chain(words[begin // 4:end // 4])
                if part_starts is None:  # a look-alike: walked
                    walked, sizes, _ = _entries(bytes(self._buffer[begin:end]))
                    part_starts, part_lengths = np.array(walked, np.intp), np.array(sizes)
                part_starts = part_starts + begin
            starts.append(part_starts)
            lengths.append(part_lengths)
        if not parts:
            return EMPTY
        return self._decode(words, np.concatenate(starts), np.concatenate(lengths))

    def _decode(self, words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> Polled:
        pieces: list[Polled] = []
        walked: list[Connection] = []
        for length in np.flatnonzero(np.bincount(lengths)).tolist():
            pending = starts[lengths == length]
            rows = sliding_window_view(words, (length - _BODY + 3) // 4)[
                pending // 4 + _BODY_WORDS] if length > _BODY else None
            tried: set[int] = set()
            while len(pending):
                for layout in _LAYOUTS.get(length, ()) if rows is not None else ():
                    if id(layout) in tried or not len(pending):
                        continue
                    tried.add(id(layout))
                    gathers = _gathers(layout[11], layout[4])
                    if gathers is None:
                        continue
                    matched = rows_equal(rows.take(gathers.header_words, axis=1),
                                         gathers.headers)
                    if matched.all():  # as usual: no copy
                        pieces.append(_decoded(rows, gathers))
                        pending = pending[:0]
                    elif matched.any():
                        pieces.append(_decoded(rows[matched], gathers))
                        pending, rows = pending[~matched], rows[~matched]
                if len(pending):  # of no layout known yet: the walk decodes it, and learns
                    first = int(pending[0])
                    message = bytes(self._buffer[first:first + length])
                    walked.append(_walk(message, 0, _BODY, length))
                    pending = pending[1:]  # the rest: with what it learned
                    rows = rows[1:] if rows is not None else None
        if walked:
            try:
                pieces.append(Polled.from_connections(walked))
            except Malformed as err:
                raise CtnetlinkError(f"conntrack entry with a value out of range: {err}"
                                     ) from None
        return Polled.joined(pieces) if pieces else EMPTY


def _chain(words: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The starts (bytes) and lengths of a run's messages, if the words that hold the
    first message's sequence number chain exactly, as an entry's header each (see the
    module's docstring); (None, None) otherwise."""
    if len(words) < 4:
        return None, None
    starts = np.flatnonzero(words == words[2]) - 2
    starts = starts[(starts >= 0) & (starts + 4 <= len(words))]
    types = words.view(np.uint16)[2 * starts + 2]  # each header's type, as the host reads it
    starts = starts[(types == _CT_NEW) & (words[starts + 3] == words[3])]
    if not len(starts) or starts[0]:
        return None, None
    lengths = words[starts].astype(np.intp)
    ends = starts + ((lengths + 3) >> 2)
    if ends[-1] != len(words) or (starts[1:] != ends[:-1]).any() or (lengths < _BODY).any():
        return None, None
    return 4 * starts, lengths


def _decoded(rows: np.ndarray, gathers: _Gathers) -> Polled:
    """The Polled of messages of one layout, a row of words (from the body on) each."""
    values = rows.take(gathers.value_words, axis=1)  # C order, unlike rows[:, words]
    values[:, gathers.value_zeros] = 0
    values = values.view(_VALUE_ROW).ravel()
    keys = np.zeros((len(rows), KEY_WIDTH), np.uint8)
    keys[:, :gathers.key_length] = rows.view(np.uint8).take(gathers.key_bytes, axis=1)
    keys[:, gathers.key_zeros] = 0  # fields the message has not (ports of ICMP, a zone)
    keys[:, -1] = gathers.key_length
    state = values["state"]
    return Polled(
        keys.view(KEY).ravel(), values["protocol"], values["zone"].astype(np.uint16),
        values["destination_port"].astype(np.uint16), values["id"].astype(np.uint32),
        *(values[name].astype(np.uint64) for name in (
            "packets", "octets", "reply_packets", "reply_octets")),
        np.ones(len(rows), bool), values["start_ns"].astype(np.uint64),
        values["timeout"].astype(np.uint32), gathers.state_codes[state], values["labels"],
        gathers.state_ended[state] | (values["status"] & IPS_DYING != 0),
        values["mark"].astype(np.uint32))
