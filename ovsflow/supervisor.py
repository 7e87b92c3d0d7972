"""Keeps the agent's long-lived tasks alive: one mechanism for the exporter, the poll loop,
the deny path and the metrics server.

A task that raises something unexpected is a bug or a failure nobody foresaw; the agent's
promise is to keep exporting anyway. So the exception is logged once with its traceback,
counted per task (`ovsflow_task_restarts_total{task=...}`), and the task starts again after
an exponential, capped backoff. While a task keeps failing, `problems` says so for /healthz.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.5  # seconds
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # a run this long ends a streak of failures: backoff and health reset


class Supervisor:
    def __init__(self, stopping: asyncio.Event | None = None, *,
                 initial_backoff: float = INITIAL_BACKOFF, max_backoff: float = MAX_BACKOFF):
        self.stopping = stopping or asyncio.Event()
        self.initial_backoff, self.max_backoff = initial_backoff, max_backoff
        self.restarts: Counter[str] = Counter()  # task name -> restarts after a failure
        # task -> (since, failures in a row, last error), while in a streak of failures
        self._failing: dict[str, tuple[float, int, str]] = {}
        self._running_since: dict[str, float] = {}

    def spawn(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task:
        """`run()` in a task that is restarted whenever it raises; it ends when `run`
        returns, when cancelled, or when `stopping` is set during a backoff."""
        self.restarts.setdefault(name, 0)  # counted from 0: the first restart is an increase
        return asyncio.create_task(self._supervise(name, run), name=name)

    def problems(self) -> dict[str, tuple[float, int, str]]:
        """Tasks in a streak of failures: name -> (monotonic time it began, failures in a
        row, last error). A task that then ran for `STABLE_AFTER` seconds is out of it."""
        now = time.monotonic()
        for name in [n for n, started in self._running_since.items()
                     if n in self._failing and now - started >= STABLE_AFTER]:
            del self._failing[name]
        return dict(self._failing)

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        backoff = self.initial_backoff
        while True:
            started = self._running_since[name] = time.monotonic()
            try:
                await run()
                return
            except Exception as err:  # noqa: BLE001 - the point: nothing ends the task
                failed_at = time.monotonic()
                self._running_since.pop(name, None)
                if failed_at - started >= STABLE_AFTER:
                    backoff = self.initial_backoff
                    self._failing.pop(name, None)
                since, failures, _ = self._failing.get(name, (failed_at, 0, ""))
                self._failing[name] = (since, failures + 1, f"{type(err).__name__}: {err}")
                self.restarts[name] += 1
                log.error("task %s failed (restart %d, in %.1fs): %s", name,
                          self.restarts[name], backoff, err, exc_info=err)
            try:
                async with asyncio.timeout(backoff):
                    await self.stopping.wait()
                return  # stopping: no restart
            except TimeoutError:
                pass
            backoff = min(backoff * 2, self.max_backoff)
