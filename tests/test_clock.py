"""The time records carry (ovsflow/clock.py): after the wall clock steps back, records go
on from where they were at half the monotonic clock's pace, until the wall clock catches
up. Time is injected: a wall clock that steps back 30 s in the middle of a connection."""

import socket

from helpers import flow_records
from ovsflow.clock import RecordClock
from ovsflow.connection import Connection, identity
from ovsflow.record import ACTIVE_TIMEOUT, END_OF_FLOW
from ovsflow.store import ConnectionStore

A, B = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")


class Clocks:
    """A wall clock and a monotonic clock that tests move."""

    def __init__(self, wall: float):
        self.wall, self.monotonic = wall, 0.0

    def tick(self, seconds: float) -> None:
        self.wall += seconds
        self.monotonic += seconds


def test_a_step_back_is_bridged_at_half_pace_until_the_wall_clock_catches_up():
    clocks = Clocks(1000.0)
    clock = RecordClock(lambda: clocks.wall, lambda: clocks.monotonic)
    assert clock() == 1000.0
    clocks.tick(5)
    clocks.wall -= 30  # stepped back: the wall clock says 975
    assert clock() == 1005.0 and clock.steps_back == 1
    clocks.tick(10)
    assert clock() == 1010.0  # the wall clock says 985
    clocks.tick(40)
    assert clock() == 1030.0  # 1025
    clocks.tick(20)
    assert clock() == 1045.0  # caught up: the wall clock from here
    clocks.tick(1)
    clocks.wall += 0.5  # and it runs a little fast
    assert clock() == 1046.5 and clock.steps_back == 1


def test_a_slow_wall_clock_is_followed_as_it_is():
    clocks = Clocks(1000.0)
    clock = RecordClock(lambda: clocks.wall, lambda: clocks.monotonic)
    for _ in range(100):
        clocks.wall += 0.999  # slewed
        clocks.monotonic += 1.0
        assert clock() == clocks.wall
    assert clock.steps_back == 0


def connection(packets: int, ended: bool = False) -> Connection:
    return Connection(6, A, B, 1000, 80, B, A, 80, 1000, zone=0,
                      state="TIME_WAIT" if ended else "ESTABLISHED", ended=ended,
                      packets=packets, octets=100 * packets, reply_packets=packets,
                      reply_octets=100 * packets, counted=True, id=1,
                      start_ns=990 * 10**9, key=identity(6, A, B, 1000, 80, 0, 0, 0, 0,
                                                          990 * 10**9))


def test_records_across_a_step_back_keep_coming_and_never_end_earlier():
    """Polls every second, active timeout 5 s, the wall clock stepping back 30 s at second
    22 and the connection ending at second 40. Without the clock no active record came for
    33 s, and the end record ended 10 s before the record before it."""
    clocks = Clocks(1000.0)
    clock = RecordClock(lambda: clocks.wall, lambda: clocks.monotonic)
    store = ConnectionStore(5.0, 60.0)
    made, at = [], []
    for second in range(41):
        if second == 22:
            clocks.wall -= 30
        for record in flow_records(store.update([connection(second + 1, second == 40)],
                                                clock())):
            made.append(record)
            at.append(second)
        clocks.tick(1)
    ends = [r.end_ms for r in made]
    assert ends == sorted(ends) and len(set(ends)) == len(ends), ends
    assert [r.end_reason for r in made] == [ACTIVE_TIMEOUT] * (len(made) - 1) + [END_OF_FLOW]
    assert max(b - a for a, b in zip(at, at[1:])) <= 10, at  # twice the pace at most
    assert sum(r.packet_delta for r in made) == made[-1].packets == 41
