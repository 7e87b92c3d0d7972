"""A batch in flight: the in-flight accounting of one batch on its way to the collector.

Over TCP/TLS no record goes twice on one session, and `records_exported` counts exactly the
records whose messages reached the kernel whole: a batch is taken off the queue as a
`Flight` whose messages carry the session's sequence numbers (`ExportQueue.take_off`),
sent one message at a time (the transport says when each is in the kernel: `deliver_next`).
A flight cut short (close() cancels the task, a send fails) resumes where it stopped on the
same session; when the session ends first, what it did not take is encoded again for the
next one (`ExportQueue.put_back`), and what close() gives up on is counted as dropped,
never as exported. A collector that stops reading for good leaves records in the kernel's
send queue: they are counted as exported (a collector that reads again, even after the
agent has exited, gets them), and the abort logs how many bytes it had not acknowledged.
IPFIX has no acknowledgements: no TCP sender can know more.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise

from ..ipfix.messages import HEADER
from ..record import EncodedRecords


@dataclass
class Flight:
    """A batch on its way out on one transport session. Its messages are numbered in that
    session's sequence: each goes out on it once, or not at all."""
    batch: EncodedRecords
    messages: list[bytes]
    counts: list[int]  # data records in each message
    rejected: Counter  # element -> its records rejected as longer than a message
    written: int = 0  # messages handed to the transport
    delivered: int = 0  # of them, those in the kernel (counted as exported); at most one less

    @property
    def undelivered(self) -> int:
        return sum(self.counts[self.delivered:])

    @property
    def cut_short(self) -> bool:
        """A message was written whose arrival in the kernel is not known yet."""
        return self.written > self.delivered

    def deliver_next(self) -> int:
        """The next message written is in the kernel: how many records it holds."""
        count = self.counts[self.delivered]
        self.delivered += 1
        return count

    def undelivered_records(self) -> EncodedRecords:
        """A copy of the batch without the records already delivered (for a snapshot of
        the queue: the flight goes on meanwhile)."""
        copy = dataclasses.replace(self.batch, groups=list(self.batch.groups),
                                   identities=list(self.batch.identities))
        delivered = sum(self.counts[:self.delivered])
        if delivered:
            copy.drop_oldest(delivered)
        return copy


def records_per_message(messages: list[bytes], next_sequence: int) -> list[int]:
    """From the messages' sequence numbers, which count data records (RFC 7011 §3.1)."""
    sequences = [HEADER.unpack_from(message)[3] for message in messages] + [next_sequence]
    return [(after - before) & 0xFFFFFFFF for before, after in pairwise(sequences)]
