"""Counters of one object of the switch (a flow, a meter) read again and again, summed across
the object's lifetimes; no I/O.

A switch counts from 0 again whenever the object is created anew: a meter deleted and added
back (Antrea's `DeleteMeterAll` at each of its connects), a flow deleted and added back (an
operator's `del-flows`, ovsflow healing its deny table), everything after an ovs-vswitchd
restart. A flow *replaced* by an ADD of the same match and priority is not one of those: OVS
carries its counters over to the new flow (without OFPFF_RESET_COUNTS, which neither Antrea
nor ovsflow sets) and only its duration starts again, so a duration that went back alone
does not end a flow's life; the caller says when it does (`new_life`).
"""

from __future__ import annotations

from collections.abc import Sequence


class Lifetimes:
    """What one object's counters moved while watched: `total` after each `observe`.

    A life's counts start at its `origin`: 0 for a life that began while watched (every
    packet it counted is new), or its first reading for one already under way when first
    seen (what it counted before is nobody's to claim here). A life ends when a counter
    went back, or when the caller says so; the next reading starts a new one from 0."""

    __slots__ = ("_done", "_origin", "_seen")

    def __init__(self, size: int = 2):
        self._done = (0,) * size  # what the ended lives moved
        self._origin: tuple[int, ...] | None = None  # the current life's start
        self._seen: tuple[int, ...] | None = None  # its last reading

    def observe(self, values: Sequence[int], new_life: bool = False,
                from_zero: bool = True) -> tuple[int, ...]:
        """The counters as the switch gives them now. `new_life`: the object was created
        anew since the last reading even if its counters did not go back; `from_zero`, for
        a first reading: whether its life began while watched."""
        values = tuple(values)
        seen = self._seen
        if seen is None:
            self._origin = (0,) * len(values) if from_zero else values
        elif new_life or any(v < s for v, s in zip(values, seen)):
            self._done = self.total
            self._origin = (0,) * len(values)
        self._seen = values
        return self.total

    @property
    def total(self) -> tuple[int, ...]:
        if self._seen is None:
            return self._done
        return tuple(d + s - o for d, s, o in zip(self._done, self._seen, self._origin))
