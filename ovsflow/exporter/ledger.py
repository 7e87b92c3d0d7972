"""The completeness ledger: what each collector is told of what it did not get.

A flow database sums records; without more it cannot tell "no traffic" from "records
lost". RFC 7011 §4 gives exporters options records for that, and ovsflow sends them to
every collector (docs/ipfix.md, "The completeness ledger"): one record for the collector's
own exporting process (what was exported to it, what was made for it and not sent), one
per metering process of the agent (the connections the conntrack poller did not track,
the denied packets the deny path's meter kept from it). Counters are totals since the
start of their process (`systemInitTimeMilliseconds`), read when the record is made
(`observationTimeMilliseconds`): the same numbers as the agent's metrics at that moment.

They go right after the templates of every new session (and when a UDP collector takes
records again), every `LEDGER_INTERVAL` seconds, and at shutdown (session.py says when).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import CollectorAddress
from ..ipfix.codec import Template
from ..ipfix.templates import (
    CONNTRACK_LEDGER, CONNTRACK_METERING_PROCESS, DENY_LEDGER, DENY_METERING_PROCESS,
    EXPORTING_LEDGER,
)

if TYPE_CHECKING:
    from .stats import ExporterStats

# Twice a minute: a flow database that keeps minutes (pmacct's `sql_history: 1m`) has a
# ledger in each, even with one datagram of the two lost; ~150 bytes each time.
LEDGER_INTERVAL = 30.0

LedgerRecords = list[tuple[Template, list[bytes]]]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def exporting_process_id(collector: CollectorAddress) -> int:
    """The `exportingProcessId` of the exporter of `collector`: CRC-32 of HOST:PORT:PROTO,
    the `collector` label of its metrics."""
    return zlib.crc32(str(collector).encode())


class Metering:
    """The agent's metering processes, as every ledger reports them: what each left out,
    read when a ledger is made. The agent points it at its store and deny path (`watch`);
    an exporter on its own reports its exporting process only."""

    def __init__(self) -> None:
        self.started_ms = _now_ms()
        self._counts: list[tuple[Template, int, Callable[[], int]]] = []

    def watch(self, store, deny) -> None:
        """`store`: connections not tracked, the store full (`conntrack.maxConnections`) or
        a value out of range; `deny` (None: no deny path): packet-ins its meter dropped."""
        self._counts = [(CONNTRACK_LEDGER, CONNTRACK_METERING_PROCESS,
                         lambda: store.rejected + store.malformed)]
        if deny is not None:
            self._counts.append((DENY_LEDGER, DENY_METERING_PROCESS,
                                 lambda: deny.meter_drops))

    def records(self, domain: int, observed_ms: int) -> LedgerRecords:
        return [(template, [template.encode_record(
            (domain, process, count(), self.started_ms, observed_ms))])
            for template, process, count in self._counts]


class Ledger:
    """One exporter's ledger records: its counts (the queue's), and the agent's `Metering`. All
    count since the agent's start (`systemInitTimeMilliseconds`, the IPFIX device's
    initialisation); a collector a reload adds counts from 0 then."""

    def __init__(self, stats: ExporterStats, metering: Metering):
        self.stats, self.metering = stats, metering
        self.started_ms = metering.started_ms

    def records(self, collector: CollectorAddress, domain: int) -> LedgerRecords:
        stats, observed = self.stats, _now_ms()
        exporting = EXPORTING_LEDGER.encode_record((
            domain, exporting_process_id(collector), stats.messages_sent, stats.octets_sent,
            stats.records_exported, stats.records_dropped + stats.records_rejected,
            self.started_ms, observed))
        return [(EXPORTING_LEDGER, [exporting]), *self.metering.records(domain, observed)]
