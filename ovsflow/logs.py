"""Log lines that repeat, at most once a minute each.

A warning or error that comes back again and again says nothing new after the first time:
a collector's drops at every poll of an outage (720 lines an hour at the default poll), a
retry at every attempt. The same line, for the same subject, is shown at most once per
`interval`; the next one shown says how many like it were not, and the lines themselves
carry their running totals ("N dropped so far", "N records queued"). The metrics count
every occurrence.

"The same line" is the same logger, message template and words: its arguments but the
numbers (a count, a delay) are the same — the collector, the error, the file. A line that
says anything else passes, and so does every line below WARNING.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

INTERVAL = 60.0  # seconds between two lines of one kind and subject
MAX_KINDS = 1000  # kinds remembered; older ones are forgotten past it


class RepeatFilter(logging.Filter):
    def __init__(self, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval, self.clock = interval, clock
        self._kinds: dict[tuple, tuple[float, int]] = {}  # kind -> (shown at, held since)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not isinstance(record.msg, str):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        kind = (record.name, record.msg,
                tuple(str(arg) for arg in args if not isinstance(arg, (int, float))))
        now = self.clock()
        shown, held = self._kinds.get(kind, (None, 0))
        if shown is not None and now - shown < self.interval:
            self._kinds[kind] = (shown, held + 1)
            return False
        if len(self._kinds) >= MAX_KINDS:
            self._kinds = {k: v for k, v in self._kinds.items()
                           if now - v[0] < self.interval}
        self._kinds[kind] = (now, 0)
        if held:
            record.msg += (f" [{held} more like this in the last {now - shown:.0f}s not "
                           "shown]")
        return True
