"""The agent's health: its record of the polls, and what it says of each layer.

The agent tells `Health` how each poll went; `problems` names each layer (poll, exporter
of a collector, deny path, a supervised task) that has been unable to do its job for a few
poll intervals, and why; and the export state as soon as a write of it has failed (until
one succeeds): the next agent would then continue from an older file and count again what
was delivered since. The probes answer from it (metrics.py serves them, and shows the
same record as metrics): `/healthz` (503 while a layer has a problem: for people and
alerts, not for restarts), `/livez` (503 only when the process is stuck: the liveness
probe, which a collector outage must not fail, or the kubelet would restart every agent
and drop their queues), `/readyz` (a poll has completed and something reached the
collector: over UDP, a datagram went out).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .exporter import IN_FLIGHT, Exporters
from .record import EncodedRecords
from .supervisor import Supervisor

if TYPE_CHECKING:
    from .deny.session import BridgeSession
    from .state_file import ExportState

HEALTH_POLLS = 3  # a layer failing for this many poll intervals makes /healthz answer 503
HEALTH_MIN_SECONDS = 5.0  # ... and at least this long
# /livez: the poll loop counts as stuck when no poll has ended for this many intervals, and
# at least this long (a 500k-entry table takes seconds; backpressure up to the stall timeout)
LIVENESS_POLLS = 10
LIVENESS_MIN_SECONDS = 120.0
POLL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds, cumulative


class Health:
    def __init__(self, poll_interval: float, exporters: Exporters, supervisor: Supervisor,
                 deny: BridgeSession | None, state: ExportState | None = None):
        self.poll_interval = poll_interval  # the configured one (a reload changes it)
        self.exporters = exporters
        self.supervisor = supervisor
        self.deny = deny  # None: no deny path
        self.state = state  # None: no export state kept
        self.started_at = time.monotonic()
        self.polls = 0
        self.poll_errors = 0
        self.last_poll_seconds = 0.0
        self.last_poll_at = 0.0  # time.monotonic() of the last completed poll
        self.last_poll_ended_at = 0.0  # ... of the last poll that ended, failed or not
        self.poll_failing_since: float | None = None
        self.poll_error = ""
        self.poll_buckets = [0] * len(POLL_BUCKETS)  # polls at or under each bound
        self.poll_seconds_sum = 0.0
        self.records_by_protocol: dict[tuple[str, int], int] = {}  # (layer, protocol)

    def count_records(self, layer: str, batches: Iterable[EncodedRecords]) -> int:
        """Counts the records made (rejected or not) per protocol; returns how many."""
        counts, made = self.records_by_protocol, 0
        for batch in batches:
            for protocol, count in batch.protocols.items():
                counts[layer, protocol] = counts.get((layer, protocol), 0) + count
                made += count
        return made

    def poll_failed(self, error: str) -> bool:
        """A poll's source failed. True when the error is new (a source that stays broken is
        shown by /healthz and the metrics, not by a log line every interval)."""
        self.poll_errors += 1
        if self.poll_failing_since is None:
            self.poll_failing_since = time.monotonic()
        new = error != self.poll_error
        self.poll_error = error
        return new

    def source_answered(self) -> None:
        self.poll_failing_since, self.poll_error = None, ""

    def poll_completed(self, seconds: float) -> None:
        self.polls += 1
        self.last_poll_seconds = seconds
        self.poll_seconds_sum += seconds
        for index, bound in enumerate(POLL_BUCKETS):
            if seconds <= bound:
                self.poll_buckets[index] += 1
        self.last_poll_at = time.monotonic()

    def poll_ended(self) -> None:
        """Whether it failed or not: /livez, the poll loop turns."""
        self.last_poll_ended_at = time.monotonic()

    def grace(self) -> float:
        return max(HEALTH_POLLS * self.poll_interval, HEALTH_MIN_SECONDS)

    def problems(self) -> dict[str, str]:
        """Layer -> why it has been unable to do its job for longer than `grace`."""
        grace, now = self.grace(), time.monotonic()
        problems = {}
        if self.poll_failing_since is not None and now - self.poll_failing_since > grace:
            problems["poll"] = (f"conntrack polls failing for "
                                f"{now - self.poll_failing_since:.0f}s: {self.poll_error}")
        elif now - (self.last_poll_at or self.started_at) > grace:
            problems["poll"] = (f"no conntrack poll completed for "
                                f"{now - (self.last_poll_at or self.started_at):.0f}s")
            if self.exporters.queued > IN_FLIGHT:
                problems["poll"] += (f" (held back: {self.exporters.queued} records wait for "
                                     "a collector)")
        for collector, problem in self.exporters.problems(grace).items():
            problems[f"exporter {collector}"] = problem
        deny = self.deny.problem() if self.deny is not None else None
        if deny is not None and now - deny[0] > grace:
            problems["deny"] = f"flows not in place for {now - deny[0]:.0f}s: {deny[1]}"
        state = self.state.problem() if self.state is not None else None
        if state is not None:
            problems["state"] = f"export state not kept: {state}"
        for task, (since, failures, error) in self.supervisor.problems().items():
            if failures > 1 and now - since > grace:
                problems[f"task {task}"] = (f"failed {failures} times in a row, restarting "
                                            f"with backoff: {error}")
        return problems


def healthz(health: Health) -> tuple[int, str]:
    problems = health.problems()
    if problems:
        return 503, "".join(f"{layer}: {why}\n" for layer, why in sorted(problems.items()))
    return 200, "ok\n"


def liveness(health: Health) -> tuple[int, str]:
    """Whether restarting the process could help: only when it is stuck. That this answer is
    served at all shows the event loop turns; the poll loop must have ended a poll (a failed
    one too: a failing source is a /healthz problem, not a stuck process) within a bound
    generous enough for the largest table and for backpressure, which ends within the
    exporter's stall timeout while the collector takes nothing. A collector outage never
    fails it."""
    bound = max(LIVENESS_POLLS * health.poll_interval, LIVENESS_MIN_SECONDS)
    idle = time.monotonic() - (health.last_poll_ended_at or health.started_at)
    if idle > bound:
        return 503, f"poll loop stuck: no poll ended for {idle:.0f}s (bound {bound:.0f}s)\n"
    return 200, "alive\n"


def readiness(health: Health) -> tuple[int, str]:
    if not health.polls:
        return 503, "no conntrack poll has completed yet\n"
    if not health.exporters.delivered:
        return 503, "nothing has reached the collector yet\n"
    return 200, "ready\n"


PROBES = {"/livez": liveness, "/readyz": readiness, "/healthz": healthz}
