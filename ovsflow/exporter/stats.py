"""What one collector's exporter counts: every record from submitted until it is exported,
folded, dropped, rejected or carried over, and the messages and octets that carried them.
The queue keeps the counts; the metrics and the collector's ledger read them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExporterStats:
    records_submitted: int = 0
    records_exported: int = 0  # UDP: sent; TCP/TLS: in the kernel's socket buffer, whole
    records_folded: int = 0  # waiting, taken into a newer record of their connection
    records_dropped: int = 0  # ended connections' records over the bound while the
    # collector was away, or unsent at shutdown without an export state
    records_rejected: int = 0  # a value did not fit its IPFIX field (see ExportQueue.rejected)
    records_carried_over: int = 0  # left at shutdown in the export state for the next agent
    records_restored: int = 0  # the previous agent's, from the export state
    messages_sent: int = 0  # in the kernel whole (UDP: sent and not refused)
    octets_sent: int = 0  # of those messages
    connections: int = 0
