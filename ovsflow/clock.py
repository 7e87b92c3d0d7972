"""The time the agent's records carry: the wall clock, except that it never goes back.

Records say when a flow started and ended in wall-clock time, and the stores decide active
and idle timeouts from the same times. When the wall clock steps back (a correction, a VM
restored), a connection's next record would end before its previous one, and its active
timeout would wait, for as long as the step, for the clock to come back to where it was.
After a step back this clock goes on from where it was at half the monotonic clock's pace
(`SLEW`), and follows the wall clock again once that has caught up (after twice the
step): flowEnd never goes back, records keep coming (at half their pace for that while),
and the records' time is the wall clock's again afterwards. (A slow wall clock — NTP
slewing it — is followed as it is: only a step back leaves it.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

SLEW = 0.5  # after a step back: the records' time per second, until the wall clock is back


class RecordClock:
    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self._wall, self._monotonic = wall, monotonic
        self._last: tuple[float, float] | None = None  # (time given, monotonic then)
        self._held: tuple[float, float] | None = None  # since a step back: (from, monotonic)
        self.steps_back = 0

    def __call__(self) -> float:
        wall, monotonic = self._wall(), self._monotonic()
        if self._held is not None:
            held = self._held[0] + (monotonic - self._held[1]) * SLEW
            if wall < held:
                self._last = (held, monotonic)
                return held
            log.info("the wall clock has caught up: records follow it again")
            self._held = None
        if self._last is not None and wall < self._last[0]:
            held = self._last[0] + (monotonic - self._last[1])
            self._held = self._last = (held, monotonic)
            self.steps_back += 1
            log.warning("the wall clock went back %.3fs: records go on from where they were, "
                        "at half pace until it catches up", held - wall)
            return held
        self._last = (wall, monotonic)
        return wall
