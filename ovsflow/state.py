"""Export state: what each collector has received of each connection, kept across restarts.

Collectors sum deltas. An agent that starts with nothing would send each live connection's
whole total again as its first delta, so every rolling update would count the node's traffic
twice. The agent writes, per tracked connection and deny entry, the counters of its last
record made, and whether its end was made; and per collector the records it has not
received (identity, template, bytes), which the next agent queues for it again: what a
collector received is what was made less what still waits for it. The next agent reads them
back and continues:

- at shutdown, after the final records are made and the queues flushed (then nothing is
  counted twice or lost: the collectors have the final records, or the next agent sends
  them what they did not take), marked `final`;
- every `SAVE_INTERVAL` while running, so that after a SIGKILL the next agent counts again
  at most what was delivered in that interval (docs/ipfix.md). A file that is not `final`
  is continued from, and said so (`stale`);
- read once at start. Conntrack entries do not outlive a boot or their network namespace,
  and what was exported is the exporter's (node, observation domain) own: state that does
  not match in each of those, in its source, or in format, or that is cut short or corrupt,
  is set aside with one log line and a count (`restores`), and the agent starts as before.

The codec (`encode`, `decode`) is sans-IO; `state_file.ExportState` does the file's I/O:
written whole to a temporary file, fsynced, renamed over the old one.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import accumulate

import numpy as np

from .host import boot_id, network_namespace

MAGIC = b"ovsflow export state\n"
VERSION = 2  # 2: sections may hold values (a queue's records), files say whether final
READABLE = (1, 2)
SAVE_INTERVAL = 10.0  # seconds between two writes while running
_LENGTH = struct.Struct("<I")


class StateError(ValueError):
    """A state file that cannot be used; the message says why, in a few words, and
    `reason` in one (for the metric): corrupt or version."""

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Origin:
    """Whose export state a file holds: it is used only by an agent of the same origin."""

    boot_id: str
    netns: int
    node: str
    observation_domain: int

    @classmethod
    def here(cls, node: str, observation_domain: int) -> Origin:
        return cls(boot_id(), network_namespace(), node, observation_domain)


@dataclass
class Values:
    """A run of bytes per entry, kept joined (a queue's records: no object per record):
    each entry's length, and the bytes of all of them in order, in one or more chunks."""

    lengths: np.ndarray  # u4 per entry
    chunks: Sequence[bytes | bytearray | memoryview]

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass
class Section:
    """One store's state: `source` names what its keys mean (a conntrack source, the deny
    path, a collector), `keys` are the entries' identities and `rows` a structured numpy
    array of one row each; `values`, when given, one more run of bytes per entry (a queued
    record). `written_at`: when its store last saw them, if not at the file's time (a
    section carried over from the previous file, its store not yet running)."""

    source: str
    keys: Sequence[bytes]
    rows: np.ndarray
    written_at: float | None = None
    values: Values | None = None


@dataclass
class Parts:
    """A section in parts (`count` entries, rows of `row_type`): written part by part as a
    large store makes them, so that the write costs memory for one part, not the whole
    table; read back as `FileParts`, each part read from the file as the store taking it
    restores it, so that the whole table is never held beside the store. Each part
    is (keys, rows), or (keys, rows, values: `Values`) when the section `has_values`."""

    source: str
    count: int
    row_type: np.dtype
    parts: Iterable[tuple]
    written_at: float | None = None
    has_values: bool = False


def _as_parts(section: Section | Parts) -> Parts:
    if isinstance(section, Parts):
        return section
    part = (section.keys, section.rows) if section.values is None else (
        section.keys, section.rows, section.values)
    return Parts(section.source, len(section.keys), section.rows.dtype, [part],
                 section.written_at, section.values is not None)


def encode(origin: Origin, written_at: float, sections: dict[str, Section | Parts],
           final: bool = False) -> Iterator[bytes | memoryview]:
    """The file's bytes, in pieces: magic, a JSON header (origin, time, whether written at
    shutdown, each section's source, count, row type and whether it has values), per
    section its parts (each: how many entries, their key lengths, keys, their value lengths
    and values if any, and rows), then an Adler-32 of everything before it (enough to tell
    a cut or damaged file, and cheaper than CRC-32 at tens of MB)."""
    sections = {name: _as_parts(section) for name, section in sections.items()}
    header = json.dumps({
        "version": VERSION, "origin": asdict(origin), "written_at": written_at,
        "final": final,
        "sections": {name: {"source": section.source, "count": section.count,
                            "row": section.row_type.descr,
                            "written_at": section.written_at or written_at,
                            "values": section.has_values}
                     for name, section in sections.items()},
    }).encode()
    check = 1
    for piece in _pieces(header, sections):
        check = zlib.adler32(piece, check)
        yield piece
    yield _LENGTH.pack(check)


def _pieces(header: bytes, sections: dict[str, Parts]) -> Iterator[bytes | memoryview]:
    yield MAGIC + _LENGTH.pack(len(header)) + header
    for name, section in sections.items():
        count, parts = 0, 0
        for keys, rows, *values in section.parts:
            if len(keys) != len(rows) or rows.dtype != section.row_type or (
                    len(values) != section.has_values or values and len(values[0]) != len(keys)):
                raise ValueError(f"state section {name}: a part of {len(keys)} keys, "
                                 f"{len(rows)} rows of {rows.dtype} and "
                                 f"{[len(v) for v in values]} values")
            count += len(keys)
            joined = b"".join(keys)
            if keys and len(joined) == len(keys) * len(keys[0]):  # one family, as usual
                lengths = np.full(len(keys), len(keys[0]), np.uint8)
            else:
                lengths = np.fromiter(map(len, keys), np.uint8, len(keys))
            yield _LENGTH.pack(len(keys)) + lengths.tobytes()
            yield joined
            if values:
                yield values[0].lengths.astype("<u4").tobytes()
                yield from values[0].chunks
            yield memoryview(np.ascontiguousarray(rows)).cast("B")  # no copy
            parts += 1
        if not parts:  # a section has at least one part, if empty: decode reads one
            yield _LENGTH.pack(0)
        if count != section.count:
            raise ValueError(f"state section {name}: {section.count} entries announced, "
                             f"{count} written")


@dataclass
class Decoded:
    origin: Origin
    sections: dict[str, Parts]  # each with its written_at (the file's, if not its own)
    written_at: float = 0.0
    final: bool = True  # written at shutdown (version 1 files do not say: taken as such)


ReadAt = Callable[[int, int], bytes]  # (offset, size) -> those bytes of a file
_CHECKED = 1 << 20  # bytes per read of the checksum's pass


def decode(data: bytes) -> Decoded:
    """The state in `data`; StateError says what is wrong with it."""
    data = bytes(data)  # its slices are the keys: bytes, not bytearrays
    return decode_from(lambda offset, size: data[offset:offset + size], len(data))


def decode_from(read_at: ReadAt, size: int) -> Decoded:
    """The state in the `size` bytes `read_at` reads (a file's, by the caller's I/O), checked
    whole (its checksum, read a piece at a time, and every part's size), while only the
    header and each part's sizes are kept: each section's parts are read again when its
    store takes them (`FileParts`), so a restore never holds the file or the decoded table
    beside the store. StateError says what is wrong with it."""
    head = read_at(0, len(MAGIC) + _LENGTH.size)
    if not head.startswith(MAGIC):
        raise StateError("not an ovsflow export state file")
    if size < len(MAGIC) + 2 * _LENGTH.size:
        raise StateError("cut short")
    body_end = size - _LENGTH.size
    check = 1
    for offset in range(0, body_end, _CHECKED):
        check = zlib.adler32(read_at(offset, min(_CHECKED, body_end - offset)), check)
    if check != _LENGTH.unpack(read_at(body_end, _LENGTH.size))[0]:
        raise StateError("cut short or corrupt (checksum)")
    (header_length,) = _LENGTH.unpack_from(head, len(MAGIC))
    pos = len(MAGIC) + _LENGTH.size
    try:
        header = json.loads(read_at(pos, header_length))
        if header["version"] not in READABLE:
            raise StateError(f"format version {header['version']}, this agent reads "
                             f"{' and '.join(map(str, READABLE))}", "version")
        origin = Origin(**header["origin"])
        written_at = float(header["written_at"])
        pos += header_length
        sections = {}
        for name, description in header["sections"].items():
            count = int(description["count"])
            dtype = np.dtype([tuple(field) for field in description["row"]])
            has_values = bool(description.get("values", False))
            spans: list[tuple[int, int]] = []
            entries = 0
            while entries < count or not spans:
                part, end = _part_end(read_at, pos, dtype.itemsize, has_values)
                if end > body_end:
                    raise ValueError("a part past the end")
                spans.append((pos, end))
                entries += part
                pos = end
            if entries != count:
                raise StateError(f"unreadable ({name}: {entries} entries of {count})")
            sections[name] = Parts(description["source"], count, dtype,
                                   FileParts(read_at, spans, dtype, has_values),
                                   float(description.get("written_at", written_at)),
                                   has_values)
    except StateError:
        raise
    except (ValueError, KeyError, TypeError, struct.error) as err:  # json, numpy, a missing
        # field, parts that do not add up
        raise StateError(f"unreadable ({type(err).__name__}: {err})") from None
    if pos != body_end:
        raise StateError("unreadable (sizes do not add up)")
    return Decoded(origin, sections, written_at, bool(header.get("final", True)))


def _part_end(read_at: ReadAt, pos: int, row_size: int, has_values: bool
              ) -> tuple[int, int]:
    """How many entries the part at `pos` holds, and where it ends: its key lengths (and
    value sizes) read, not its keys or rows."""
    (part,) = _LENGTH.unpack(read_at(pos, _LENGTH.size))
    end = pos + _LENGTH.size + part
    end += int(np.frombuffer(read_at(pos + _LENGTH.size, part), np.uint8).sum())
    if has_values:
        sizes = np.frombuffer(read_at(end, 4 * part), "<u4")
        end += 4 * part + int(sizes.sum(dtype=np.int64))
    return part, end + part * row_size


def _part(data: bytes, dtype: np.dtype, has_values: bool) -> tuple:
    """The part whose bytes are `data`: (keys, rows) or (keys, rows, values)."""
    (part,) = _LENGTH.unpack_from(data)
    ends = list(accumulate(np.frombuffer(data, np.uint8, part, _LENGTH.size).tolist(),
                           initial=_LENGTH.size + part))
    keys = [data[start:end] for start, end in zip(ends, ends[1:])]
    pos = ends[-1]
    values: tuple = ()
    if has_values:
        sizes = np.frombuffer(data, "<u4", part, pos)
        pos += 4 * part
        end = pos + int(sizes.sum(dtype=np.int64))
        values = (Values(sizes.copy(), [data[pos:end]]),)
        pos = end
    # a copy: each part's rows their own, the part's bytes freed
    return (keys, np.frombuffer(data, dtype, part, pos).copy(), *values)


class FileParts:
    """A decoded section's parts, each read from the file when it is taken (`pop`) or
    written again (iteration: a section no store has taken yet, saved as it was)."""

    def __init__(self, read_at: ReadAt, spans: list[tuple[int, int]], row_type: np.dtype,
                 has_values: bool):
        self._read_at = read_at
        self._spans = spans  # each part's first byte and end
        self._row_type = row_type
        self._has_values = has_values

    def __len__(self) -> int:
        return len(self._spans)

    def __iter__(self) -> Iterator[tuple]:
        for span in list(self._spans):
            yield self._read(span)

    def pop(self, index: int = 0) -> tuple:
        return self._read(self._spans.pop(index))

    def _read(self, span: tuple[int, int]) -> tuple:
        start, end = span
        return _part(self._read_at(start, end - start), self._row_type, self._has_values)
