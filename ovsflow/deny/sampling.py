"""The packet-in meter's statistics over time: what share of denied packets reached the
controller in a stretch of time (IPFIX `samplingProbability`, IANA 311); no I/O.

A meter's drop band drops the packets over its rate whatever flow sent them, so while it
drops, every denied connection reaches the controller at about the same ratio: the one of
the whole meter over the same seconds. A deny record's counts cover its packets since its
previous record, and its `samplingProbability` is that ratio between the two: 1.0 when the
meter dropped nothing then (the record's counts are whole), less when it dropped some (its
counts are a sample; template 270's totals, read from the flows' own counters, are not).
"""

from __future__ import annotations

from bisect import bisect_right

HISTORY_SECONDS = 3600.0  # readings kept: windows reach back this far at most


class MeterHistory:
    """The meter's cumulative (time, packets in, packets dropped), one reading per check,
    across the meter's lifetimes (`Lifetimes`)."""

    def __init__(self, keep: float = HISTORY_SECONDS):
        self.keep = keep
        self._times: list[float] = []
        self._counts: list[tuple[int, int]] = []

    def add(self, now: float, packets_in: int, dropped: int) -> None:
        times, counts = self._times, self._counts
        if times and now < times[-1]:  # the wall clock went back: start again
            times.clear()
            counts.clear()
        times.append(now)
        counts.append((packets_in, dropped))
        if now - times[0] > 2 * self.keep:  # trimmed now and then, not at every reading
            old = bisect_right(times, now - self.keep)
            del times[:old], counts[:old]

    def probability(self, start: float, end: float) -> float:
        """The share of packets the meter let through between `start` and `end` (wall
        clock): from the last reading at or before `start` to the last at or before `end`.
        Before the first reading the meter's counts are taken as 0: they count its whole
        life (a window that began before it was first read is measured from the meter's
        creation). 1.0 when no packet reached the meter then, or it dropped none."""
        first, last = self._at(start), self._at(end)
        packets_in, dropped = last[0] - first[0], last[1] - first[1]
        if packets_in <= 0 or dropped <= 0:
            return 1.0
        return max(0.0, (packets_in - dropped) / packets_in)

    def _at(self, when: float) -> tuple[int, int]:
        index = bisect_right(self._times, when) - 1
        return self._counts[index] if index >= 0 else (0, 0)
