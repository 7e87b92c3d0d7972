"""The IPFIX side of a transport session with the collector (sans-IO): its messages, their
sequence numbers, and when templates are due.

Templates go first on every new session, and over UDP again every `template_refresh`
seconds (RFC 7011 §8.4); a TCP/TLS session keeps its templates until it ends, and a clean
end withdraws them (§8.1). Over TCP/TLS each session numbers its messages from 0 (§3.1);
over UDP the numbering goes on across sockets. Sequence numbers count data records.
"""

from __future__ import annotations

from collections.abc import Callable

from ..ipfix.codec import Template
from ..ipfix.messages import HEADER, SET_HEADER, MessageEncoder
from ..ipfix.templates import ALL_TEMPLATES
from ..record import EncodedRecords


class Session:
    def __init__(self, observation_domain_id: int, max_message_size: int):
        self.observation_domain_id = observation_domain_id
        self.encoder = MessageEncoder(observation_domain_id, max_message_size)
        self.templates_sent_at = float("-inf")  # time.monotonic(); -inf: due now

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
        self.templates_sent_at = float("-inf")

    def templates_due(self, now: float, reliable: bool, template_refresh: float) -> bool:
        return self.templates_sent_at == float("-inf") or (
            not reliable and now - self.templates_sent_at >= template_refresh)

    def template_messages(self, now: float, export_time: int) -> list[bytes]:
        """Every template, counted as sent from `now` (once written, they go out on this
        session even if cut short while they drain)."""
        messages = self.encoder.template_messages(ALL_TEMPLATES, export_time)
        self.templates_sent_at = now
        return messages

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
