"""Export state: what the collector has been told of each connection, kept across restarts.

Collectors sum deltas. An agent that starts with nothing would send each live connection's
whole total again as its first delta, so every rolling update would count the node's traffic
twice. The agent writes, per tracked connection and deny entry, the counters last exported
and whether its end was exported; the next agent reads them back and continues:

- at shutdown, after the final records are made (then nothing is counted twice: the final
  records bring the collector up to date, the next agent's deltas start from there);
- every `SAVE_INTERVAL` while running, so that after a SIGKILL the next agent counts again
  at most what was exported in that interval (docs/ipfix.md);
- read once at start. Conntrack entries do not outlive a boot or their network namespace,
  and what was exported is the exporter's (node, observation domain) own: state that does
  not match in each of those, in its source, or in format, or that is cut short or corrupt,
  is set aside with one log line and a count (`restores`), and the agent starts as before.

The codec (`encode`, `decode`) is sans-IO; `ExportState` does the file's I/O: written whole
to a temporary file, fsynced, renamed over the old one.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import accumulate

import numpy as np

from .host import boot_id, network_namespace

log = logging.getLogger(__name__)

MAGIC = b"ovsflow export state\n"
VERSION = 1
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
class Section:
    """One store's state: `source` names what its keys mean (a conntrack source, the deny
    path), `keys` are the entries' identities and `rows` a structured numpy array of one
    row each. `written_at`: when its store last saw them, if not at the file's time (a
    section carried over from the previous file, its store not yet running)."""

    source: str
    keys: Sequence[bytes]
    rows: np.ndarray
    written_at: float | None = None


@dataclass
class Parts:
    """A section in parts (`count` entries, rows of `row_type`): written part by part as a
    large store makes them, so that the write costs memory for one part, not the whole
    table; read back as the list of the file's parts, which the store taking it empties
    as it restores them, so that the whole table is never held beside the store."""

    source: str
    count: int
    row_type: np.dtype
    parts: Iterable[tuple[Sequence[bytes], np.ndarray]]
    written_at: float | None = None


def encode(origin: Origin, written_at: float, sections: dict[str, Section | Parts]
           ) -> Iterator[bytes | memoryview]:
    """The file's bytes, in pieces: magic, a JSON header (origin, time, each section's
    source, count and row type), per section its parts (each: how many entries, their key
    lengths, keys and rows), then an Adler-32 of everything before it (enough to tell a cut
    or damaged file, and cheaper than CRC-32 at tens of MB)."""
    sections = {name: section if isinstance(section, Parts) else Parts(
        section.source, len(section.keys), section.rows.dtype, [(section.keys, section.rows)],
        section.written_at) for name, section in sections.items()}
    header = json.dumps({
        "version": VERSION, "origin": asdict(origin), "written_at": written_at,
        "sections": {name: {"source": section.source, "count": section.count,
                            "row": section.row_type.descr,
                            "written_at": section.written_at or written_at}
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
        for keys, rows in section.parts:
            if len(keys) != len(rows) or rows.dtype != section.row_type:
                raise ValueError(f"state section {name}: a part of {len(keys)} keys and "
                                 f"{len(rows)} rows of {rows.dtype}")
            count += len(keys)
            joined = b"".join(keys)
            if keys and len(joined) == len(keys) * len(keys[0]):  # one family, as usual
                lengths = np.full(len(keys), len(keys[0]), np.uint8)
            else:
                lengths = np.fromiter(map(len, keys), np.uint8, len(keys))
            yield _LENGTH.pack(len(keys)) + lengths.tobytes()
            yield joined
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


def decode(data: bytes) -> Decoded:
    """The state in `data`; StateError says what is wrong with it."""
    if not data.startswith(MAGIC):
        raise StateError("not an ovsflow export state file")
    if len(data) < len(MAGIC) + 2 * _LENGTH.size:
        raise StateError("cut short")
    (check,) = _LENGTH.unpack_from(data, len(data) - _LENGTH.size)
    body = memoryview(data)[:len(data) - _LENGTH.size]
    if zlib.adler32(body) != check:
        raise StateError("cut short or corrupt (checksum)")
    (header_length,) = _LENGTH.unpack_from(data, len(MAGIC))
    pos = len(MAGIC) + _LENGTH.size
    try:
        header = json.loads(bytes(body[pos:pos + header_length]))
        if header["version"] != VERSION:
            raise StateError(f"format version {header['version']}, this agent reads {VERSION}",
                             "version")
        origin = Origin(**header["origin"])
        written_at = float(header["written_at"])
        pos += header_length
        sections = {}
        for name, description in header["sections"].items():
            count = int(description["count"])
            dtype = np.dtype([tuple(field) for field in description["row"]])
            parts: list[tuple[list[bytes], np.ndarray]] = []
            entries = 0
            while entries < count or not parts:
                (part,) = _LENGTH.unpack_from(body, pos)
                pos += _LENGTH.size
                lengths = np.frombuffer(body, np.uint8, part, pos).tolist()
                ends = list(accumulate(lengths, initial=pos + part))
                keys = [bytes(body[start:end]) for start, end in zip(ends, ends[1:])]
                pos = ends[-1]
                # a copy: the file's bytes are freed once read
                parts.append((keys, np.frombuffer(body, dtype, part, pos).copy()))
                entries += part
                pos += part * dtype.itemsize
            if entries != count:
                raise StateError(f"unreadable ({name}: {entries} entries of {count})")
            sections[name] = Parts(description["source"], count, dtype, parts,
                                   float(description.get("written_at", written_at)))
    except StateError:
        raise
    except (ValueError, KeyError, TypeError, struct.error) as err:  # json, numpy, a missing
        # field, parts that do not add up
        raise StateError(f"unreadable ({type(err).__name__}: {err})") from None
    if pos != len(body):
        raise StateError("unreadable (sizes do not add up)")
    return Decoded(origin, sections)


class ExportState:
    """The agent's export state file, `<directory>/export-state-<netns>-<domain>`: one
    per network namespace and observation domain, so that two agents sharing a directory
    never read each other's."""

    def __init__(self, directory: str, origin: Origin):
        self.origin = origin
        self.path = os.path.join(
            directory, f"export-state-{origin.netns}-{origin.observation_domain}")
        self.saves = 0
        self.save_errors = 0
        self.last_save_seconds = 0.0
        self.last_saved = time.monotonic()
        # outcome (restored | none | discarded) and reason -> times, for the metrics
        self.restores: Counter[tuple[str, str]] = Counter()
        self._loaded: Decoded | None = None

    def load(self) -> None:
        """Read the file, once, at start; each store takes its section with `take`."""
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            self.restores["none", ""] += 1
            log.info("export state: none in %s; every connection starts anew", self.path)
            return
        except OSError as err:
            self._discard("unreadable", err.strerror or str(err))
            return
        try:
            decoded = decode(data)
        except StateError as err:
            self._discard(err.reason, str(err))
            return
        mismatch = [(reason, f"{reason} {theirs!r} is not this agent's {ours!r}")
                    for reason, ours, theirs in zip(
                        ("boot", "netns", "node", "domain"),
                        asdict(self.origin).values(), asdict(decoded.origin).values())
                    if ours != theirs]
        if mismatch:
            self._discard(mismatch[0][0], "; ".join(message for _, message in mismatch))
            return
        self._loaded = decoded

    def take(self, name: str, source: str) -> Parts | None:
        """The section `name` written for `source` (its `written_at` set), handed over: not
        kept here once its store has it (33 MB of rows at 500k); None when there is none to
        continue from (said once in the log and counted)."""
        if self._loaded is None:
            return None
        section = self._loaded.sections.pop(name, None)
        if section is None:
            return None
        if section.source != source:
            self._discard("source", f"{name}: written for {section.source!r}, this agent's "
                          f"source is {source!r}")
            return None
        self.restores["restored", name] += 1
        log.info("export state: continuing %d %s entries from %s (written %.1fs ago)",
                 section.count, name, self.path, time.time() - section.written_at)
        return section

    def untaken(self, name: str) -> Parts | None:
        """The loaded section `name` that no store has taken yet: a save before its store
        runs (a source that cannot open yet) writes it again as it was, so the next agent
        still continues those connections."""
        if self._loaded is None:
            return None
        return self._loaded.sections.get(name)

    def _discard(self, reason: str, message: str) -> None:
        """reason: one word for the metric (corrupt, version, unreadable, boot, netns,
        node, domain, source)."""
        self.restores["discarded", reason] += 1
        log.warning("export state %s not used, starting anew: %s", self.path, message)

    def due(self) -> bool:
        return time.monotonic() - self.last_saved >= SAVE_INTERVAL

    def save(self, sections: dict[str, Section | Parts], now: float) -> bool:
        """Write the state atomically (blocking: the agent calls it in the poll's worker
        thread). A failure is logged and counted; the previous file stays."""
        started = time.perf_counter()
        self.last_saved = time.monotonic()
        temporary = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            with open(temporary, "wb") as file:
                for piece in encode(self.origin, now, sections):
                    file.write(piece)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
            directory = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as err:
            self.save_errors += 1
            log.error("export state: cannot write %s: %s", self.path, err)
            try:
                os.unlink(temporary)
            except OSError:
                pass
            return False
        self.saves += 1
        self.last_save_seconds = time.perf_counter() - started
        return True
