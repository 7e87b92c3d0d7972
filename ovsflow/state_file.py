"""The export state's file (its format: state.py): read once at start, where a file that is
not this agent's is set aside, and written atomically, with each write's outcome kept for
/healthz and the metrics."""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import time
from collections import Counter
from dataclasses import asdict

from .state import SAVE_INTERVAL, Decoded, Origin, Parts, Section, StateError, decode_from, encode

log = logging.getLogger(__name__)

# A file older than this at start is said (a rolling restart takes seconds): an agent may
# have run since without being able to write it.
STALE_AFTER = 2 * SAVE_INTERVAL


class ExportState:
    """The agent's export state file, `<directory>/export-state-<netns>-<domain>`: one
    per network namespace and observation domain, so that two agents sharing a directory
    never read each other's. An agent holds a lock on `<file>.lock` while it runs: a file
    of this network namespace written for another observation domain, whose lock no agent
    holds, is set aside at start (renamed `<file>.discarded`), as a changed domain's."""

    def __init__(self, directory: str, origin: Origin):
        self.origin = origin
        self.directory = directory
        self.path = os.path.join(directory, _file_name(origin.netns, origin.observation_domain))
        self.saves = 0
        self.save_errors = 0
        self.last_save_seconds = 0.0
        self.last_saved_at = 0.0  # time.time() of the last file written; 0: none yet
        self.failing_since: float | None = None  # time.monotonic() of the first failed
        # write since the last good one
        self.last_error = ""
        self.started = time.monotonic()
        # outcome (restored | none | discarded) and reason -> times, for the metrics
        self.restores: Counter[tuple[str, str]] = Counter()
        self.stale_restores = 0  # files continued from that were not written at shutdown
        self.restored_age: float | None = None  # how old the file continued from was
        self._loaded: Decoded | None = None
        self._lock: int | None = None

    def load(self) -> None:
        """Check the file, once, at start (its checksum and the sizes of its parts); each
        store takes its section with `take`, and its parts are read as it restores them."""
        self._lock = _lock(self.path + ".lock")  # held while this agent runs
        try:
            file = _OpenFile(self.path)
        except FileNotFoundError:
            if not self._set_aside_other_domains():
                self.restores["none", ""] += 1
                log.info("export state: none in %s; every connection starts anew", self.path)
            return
        except OSError as err:
            self._discard("unreadable", err.strerror or str(err))
            return
        try:
            decoded = decode_from(file.read_at, file.size)
        except OSError as err:
            self._discard("unreadable", err.strerror or str(err))
            return
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
        self.restored_age = age = time.time() - decoded.written_at
        if not decoded.final:
            self.stale_restores += 1
            log.warning("export state %s was written %.1fs ago by a periodic save, not at "
                        "shutdown (the agent before was killed, or could not write at its "
                        "end): what it delivered after that save is counted again",
                        self.path, age)
        elif age > STALE_AFTER:
            self.stale_restores += 1
            log.warning("export state %s was written %.1fs ago, more than %.0fs: if an agent "
                        "ran since and could not write it (its /healthz said so), what that "
                        "agent delivered is counted again", self.path, age, STALE_AFTER)

    def _set_aside_other_domains(self) -> bool:
        """Files of this network namespace for another observation domain that no running
        agent holds: set aside, each with a line and a count. True when there was one."""
        prefix = _file_name(self.origin.netns, "")
        found = False
        for path in sorted(glob.glob(os.path.join(glob.escape(self.directory), prefix + "*"))):
            domain = os.path.basename(path)[len(prefix):]
            if not domain.isdigit():
                continue  # a lock, a temporary file, one set aside already
            lock = _lock(path + ".lock")
            if lock is None:
                continue  # an agent of that domain runs: its file
            try:
                os.replace(path, path + ".discarded")
                os.unlink(path + ".lock")
            except OSError as err:
                log.debug("export state: %s not set aside: %s", path, err)
            finally:
                os.close(lock)
            self._discard("domain", f"{path} was written for observation domain {domain}, "
                          f"this agent's is {self.origin.observation_domain} (set aside as "
                          f"{os.path.basename(path)}.discarded)")
            found = True
        return found

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

    def take_all(self, prefix: str) -> dict[str, Parts]:
        """Every loaded section whose name starts with `prefix`, handed over, in the file's
        order (the name's rest -> the section)."""
        if self._loaded is None:
            return {}
        sections = self._loaded.sections
        return {name[len(prefix):]: sections.pop(name) for name in list(sections)
                if name.startswith(prefix)}

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

    def save(self, sections: dict[str, Section | Parts], now: float, final: bool = False
             ) -> bool:
        """Write the state atomically (blocking: the agent calls it in the poll's worker
        thread); `final`: at shutdown. A failure is logged and counted, and kept as a
        problem (`problem`) until a write succeeds; the previous file stays."""
        started = time.perf_counter()
        temporary = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            with open(temporary, "wb") as file:
                for piece in encode(self.origin, now, sections, final):
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
            self.last_error = str(err)
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                log.error("export state: cannot write %s: %s", self.path, err)
            else:  # said once per spell; /healthz and the metrics say it goes on
                log.debug("export state: cannot write %s: %s", self.path, err)
            try:
                os.unlink(temporary)
            except OSError:
                pass
            return False
        if self.failing_since is not None:
            log.info("export state: written again to %s after %.0fs of failed writes",
                     self.path, time.monotonic() - self.failing_since)
        self.failing_since, self.last_error = None, ""
        self.saves += 1
        self.last_saved_at = time.time()
        self.last_save_seconds = time.perf_counter() - started
        return True

    def problem(self) -> str | None:
        """Why the state is not being kept, when its last write failed."""
        if self.failing_since is None:
            return None
        now = time.monotonic()
        written = (f"last written {time.time() - self.last_saved_at:.0f}s ago"
                   if self.last_saved_at else
                   f"not written since the agent started {now - self.started:.0f}s ago")
        return (f"cannot write {self.path} for {now - self.failing_since:.0f}s "
                f"({written}): {self.last_error}")


def _file_name(netns: int, domain: int | str) -> str:
    return f"export-state-{netns}-{domain}"


def _lock(path: str) -> int | None:
    """An exclusive lock on `path`, held until the descriptor is closed (or the process
    ends); None when another process holds it, or the lock file cannot be made (a
    read-only directory)."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


class _OpenFile:
    """The file read at start, open while a section not yet restored may be read from it:
    closed once the last one is dropped (a file on tmpfs, as /var/run often is, is memory
    until then). os.pread: the poll's worker thread reads its section while the loop may
    read another."""

    _fd = -1

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def __del__(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
