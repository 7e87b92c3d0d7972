"""The IPFIX side of a transport session with the collector (sans-IO): its messages, their
sequence numbers, and when templates and the ledger are due.

Templates (the flow templates and the ledger's options templates) go first on every new
session, over UDP again every `template_refresh` seconds (RFC 7011 §8.4), and again before
the next data once the kernel refused a datagram (the collector that refused it may come
back without them: `forget_templates`); a TCP/TLS session keeps its templates until it
ends, and a clean end withdraws them (§8.1). The ledger's options records (ledger.py) go
after the templates of every session and every `LEDGER_INTERVAL` seconds. Over TCP/TLS
each session numbers its messages from 0 (§3.1); over UDP the numbering goes on across
sockets, from the first message the kernel refused (`rewind`). Sequence numbers count data
records, the ledger's included.
"""

from __future__ import annotations

from collections.abc import Callable

from ..ipfix.codec import Template
from ..ipfix.messages import HEADER, SET_HEADER, MessageEncoder
from ..ipfix.templates import ALL_TEMPLATES, OPTIONS_TEMPLATES
from ..record import EncodedRecords
from .ledger import LEDGER_INTERVAL, LedgerRecords

NEVER = float("-inf")


class Session:
    def __init__(self, observation_domain_id: int, max_message_size: int):
        self.observation_domain_id = observation_domain_id
        self.encoder = MessageEncoder(observation_domain_id, max_message_size)
        self.templates_sent_at = NEVER  # time.monotonic(); NEVER: due now
        self.ledger_sent_at = NEVER

    @property
    def sequence(self) -> int:
        """The sequence number of the next data message."""
        return self.encoder.sequence

    def begin(self, transport) -> None:
        """A transport session begins: over TCP/TLS its sequence numbers start again; over
        UDP the message size follows the family the collector's name resolved to."""
        if transport.reliable:
            self.encoder = MessageEncoder(self.observation_domain_id,
                                          transport.max_message_size)
        else:
            self.encoder.max_message_size = transport.max_message_size
        self.templates_sent_at = self.ledger_sent_at = NEVER

    def forget_templates(self) -> None:
        """The collector may not have them (UDP: a datagram was refused): they go again
        before the next data, and the ledger after them."""
        self.templates_sent_at = self.ledger_sent_at = NEVER

    def templates_due(self, now: float, reliable: bool, template_refresh: float) -> bool:
        return self.templates_sent_at == NEVER or (
            not reliable and now - self.templates_sent_at >= template_refresh)

    def ledger_due(self, now: float) -> bool:
        return now - self.ledger_sent_at >= LEDGER_INTERVAL

    def next_due(self, now: float, reliable: bool, template_refresh: float) -> float:
        """Seconds until the templates (UDP) or the ledger are due again."""
        due = self.ledger_sent_at + LEDGER_INTERVAL
        if not reliable:
            due = min(due, self.templates_sent_at + template_refresh)
        return max(0.0, due - now)

    def template_messages(self, now: float, export_time: int) -> list[bytes]:
        """Every template, counted as sent from `now` (once written, they go out on this
        session even if cut short while they drain)."""
        messages = self.encoder.template_messages(ALL_TEMPLATES + OPTIONS_TEMPLATES,
                                                  export_time)
        self.templates_sent_at = now
        return messages

    def ledger_messages(self, records: LedgerRecords, now: float,
                        export_time: int) -> list[bytes]:
        """The ledger's options records, numbered in this session's sequence."""
        self.ledger_sent_at = now
        return self.encoder.data_messages(records, export_time)

    def rewind(self, refused: bytes) -> None:
        """UDP: `refused`, a message of this session, never reached the collector, nor did
        any numbered after it: the numbering goes on from it."""
        self.encoder.sequence = HEADER.unpack_from(refused)[3]

    def withdrawal(self, export_time: int) -> bytes:
        return self.encoder.withdrawal_message(export_time)

    def data_messages(self, batch: EncodedRecords, export_time: int,
                      reject: Callable[[str, object], None]) -> list[bytes]:
        """Data messages for `batch`, numbered in this session's sequence. A record longer
        than a message can hold (long strings, UDP) is left out and given to `reject`."""
        sequence = self.encoder.sequence
        try:
            return self.encoder.joined_data_messages(batch.groups, export_time)
        except ValueError:
            self.encoder.sequence = sequence  # messages made before it are not sent
            encoded = [(template, self._fitting(template, records, reject))
                       for template, records in batch.data_records()]
            return self.encoder.data_messages(encoded, export_time)

    def _fitting(self, template: Template, records: list[bytes],
                 reject: Callable[[str, object], None]) -> list[bytes]:
        limit = self.encoder.max_message_size - HEADER.size - SET_HEADER.size - 3
        kept = []
        for data in records:
            if len(data) > limit:
                reject("record length", f"{len(data)} bytes (template "
                       f"{template.template_id}; a message holds {limit})")
            else:
                kept.append(data)
        return kept
