"""IPFIX (RFC 7011) messages as bytes, without I/O.

`MessageEncoder` packs encoded records (codec.py's `Template`) into size-limited messages
with per-domain sequence numbers, `MessageDecoder` keeps the templates of each (exporter,
observation domain) and turns messages back into records, and `MessageStream` cuts a TCP
byte stream into messages.
"""

from __future__ import annotations

import struct
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from .codec import MIN_DATA_SET_ID, DecodeError, Template, TemplateField
from .elements import IANA, lookup

VERSION = 10
HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence, domain id
SET_HEADER = struct.Struct("!HH")  # set id, length
TEMPLATE_SET_ID, OPTIONS_TEMPLATE_SET_ID = 2, 3
MAX_MESSAGE_SIZE = 65535


def _joined(records: list[bytes]) -> tuple[bytes, list[int]]:
    return b"".join(records), list(accumulate(map(len, records), initial=0))


class MessageEncoder:
    """Packs records into messages for one observation domain.

    The sequence number in each header counts the data records this encoder produced before
    that message (RFC 7011 §3.1), modulo 2**32.
    """

    def __init__(self, observation_domain_id: int, max_message_size: int = MAX_MESSAGE_SIZE):
        if not HEADER.size + SET_HEADER.size < max_message_size <= MAX_MESSAGE_SIZE:
            raise ValueError(f"message size limit {max_message_size} is not in 21-65535")
        self.observation_domain_id = observation_domain_id
        self.max_message_size = max_message_size
        self.sequence = 0

    def template_messages(self, templates: Iterable[Template], export_time: int) -> list[bytes]:
        """A template set for all `templates`, and an options template set for each options
        template, in as few messages as fit. (pmacct up to 1.7.8 reads only the first
        options template of a set: its issue #764.)"""
        templates = list(templates)
        plain = [t.definition() for t in templates if not t.scope_count]
        groups = [(TEMPLATE_SET_ID, *_joined(plain), False)] + [
            (OPTIONS_TEMPLATE_SET_ID, *_joined([t.definition()]), False)
            for t in templates if t.scope_count]
        return self._pack([g for g in groups if g[1]], export_time, counts_records=False)

    def withdrawal_message(self, export_time: int) -> bytes:
        """A message withdrawing every template of the domain (RFC 7011 §8.1: template id 2,
        field count 0), sent before a TCP/TLS session is closed."""
        body = SET_HEADER.pack(TEMPLATE_SET_ID, SET_HEADER.size + 4) + struct.pack(
            "!HH", TEMPLATE_SET_ID, 0)
        return HEADER.pack(VERSION, HEADER.size + len(body), export_time & 0xFFFFFFFF,
                           self.sequence, self.observation_domain_id) + body

    def data_messages(self, batches: Iterable[tuple[Template, list[bytes]]],
                      export_time: int) -> list[bytes]:
        """Messages holding each batch's encoded records in a data set of its template."""
        return self.joined_data_messages(
            [(t, *_joined(records)) for t, records in batches], export_time)

    def joined_data_messages(self, batches: Iterable[tuple[Template, bytes, Sequence[int]]],
                             export_time: int) -> list[bytes]:
        """The same for each batch's records given joined, with where each starts (one more
        offset than records): records are cut out in runs, never one by one."""
        groups = [(t.template_id, data, starts, t.min_record_length > 3)
                  for t, data, starts in batches if len(starts) > 1]
        return self._pack(groups, export_time, counts_records=True)

    def _pack(self, groups: list[tuple[int, bytes, Sequence[int], bool]], export_time: int,
              counts_records: bool) -> list[bytes]:
        """Fills each message with as many whole records as fit, in order. The cut points come
        from bisecting the records' start offsets, so that the Python-level work is per
        message and per set, not per record. A padded set reserves 3 bytes for padding."""
        limit = self.max_message_size
        messages: list[bytes] = []
        # the message being filled: its header's place, then per set its header, its records
        # (a view of the group's bytes: copied once, by the join) and its padding
        parts: list = [b""]
        size, records_in_message = HEADER.size, 0
        for set_id, data, starts, pad in groups:
            # starts[i]: where record i begins in the set's run of records; starts[-1]: its end
            starts, view = list(starts), memoryview(data)
            room_for_records = limit - SET_HEADER.size - (3 if pad else 0)
            first, count = 0, len(starts) - 1
            while first < count:
                # records[first:last] are those that fit in what is left of the message
                last = bisect_right(starts, starts[first] + room_for_records - size, first) - 1
                if last > first:
                    length = SET_HEADER.size + starts[last] - starts[first]
                    padding = (-length) % 4 if pad else 0
                    parts += (SET_HEADER.pack(set_id, length + padding),
                              view[starts[first]:starts[last]], _PADDING[padding])
                    size += length + padding
                    records_in_message += last - first
                    first = last
                    if first == count:
                        break  # the message stays open for the next group's records
                elif len(parts) == 1:
                    raise ValueError(f"a record of {starts[first + 1] - starts[first]} bytes "
                                     f"does not fit in a message of at most {limit} bytes")
                messages.append(self._message(parts, size, export_time))
                if counts_records:
                    self.sequence = (self.sequence + records_in_message) & 0xFFFFFFFF
                parts, size, records_in_message = [b""], HEADER.size, 0
        if len(parts) > 1:
            messages.append(self._message(parts, size, export_time))
            if counts_records:
                self.sequence = (self.sequence + records_in_message) & 0xFFFFFFFF
        return messages

    def _message(self, parts: list, size: int, export_time: int) -> bytes:
        parts[0] = HEADER.pack(VERSION, size, export_time & 0xFFFFFFFF, self.sequence,
                               self.observation_domain_id)
        return b"".join(parts)


_PADDING = (b"", b"\0", b"\0\0", b"\0\0\0")


@dataclass
class DecodedMessage:
    observation_domain_id: int
    export_time: int
    sequence: int
    records: list[tuple[int, dict[str, object]]] = field(default_factory=list)
    unknown_template_sets: list[int] = field(default_factory=list)
    options_sets: set[int] = field(default_factory=set)  # of records of options templates


class MessageDecoder:
    """Turns messages into records, keeping templates per source, (exporter, domain).

    Data sets whose template has not been seen are skipped and reported in
    `DecodedMessage.unknown_template_sets` (over UDP they arrive before the template resend).

    Over UDP nothing says that an exporter is gone, so its templates would be kept for ever:
    with `template_lifetime`, a source not heard from for that many seconds is forgotten
    (RFC 7011 §8.4: a template not refreshed within its lifetime is discarded), and with
    `max_sources` the source heard from least recently makes room for a new one. A TCP/TLS
    session needs neither: its templates end with it.
    """

    def __init__(self, template_lifetime: float | None = None, max_sources: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # Ordered by when each source was last heard from, least recent first.
        self.templates: OrderedDict[tuple[str, int], dict[int, Template]] = OrderedDict()
        self._heard_at: dict[tuple[str, int], float] = {}
        self.template_lifetime = template_lifetime
        self.max_sources = max_sources
        self.clock = clock

    def decode(self, message: bytes, exporter: str = "") -> DecodedMessage:
        if len(message) < HEADER.size:
            raise DecodeError(f"message of {len(message)} bytes is shorter than the "
                              f"{HEADER.size}-byte header")
        version, length, export_time, sequence, domain = HEADER.unpack_from(message)
        if version != VERSION:
            raise DecodeError(f"version {version} is not IPFIX (10)")
        if length != len(message):
            raise DecodeError(f"header says {length} bytes, message has {len(message)}")
        decoded = DecodedMessage(domain, export_time, sequence)
        source = (exporter, domain)
        self._heard_from(source)
        pos = HEADER.size
        while pos < length:
            if length - pos < SET_HEADER.size:
                raise DecodeError(f"{length - pos} bytes at offset {pos} are too short for a "
                                  "set header")
            set_id, set_length = SET_HEADER.unpack_from(message, pos)
            if set_length < SET_HEADER.size or pos + set_length > length:
                raise DecodeError(f"set {set_id} at offset {pos} has length {set_length}, "
                                  f"{length - pos} bytes left")
            body = message[pos + SET_HEADER.size:pos + set_length]
            if set_id in (TEMPLATE_SET_ID, OPTIONS_TEMPLATE_SET_ID):
                self._read_templates(body, set_id, source)
            elif set_id >= MIN_DATA_SET_ID:
                template = self.templates.get(source, {}).get(set_id)
                if template is None:
                    decoded.unknown_template_sets.append(set_id)
                else:
                    decoded.records.extend((set_id, r) for r in template.decode_records(body))
                    if template.scope_count:
                        decoded.options_sets.add(set_id)
            else:
                raise DecodeError(f"set id {set_id} at offset {pos} is reserved")
            pos += set_length
        return decoded

    def _heard_from(self, source: tuple[str, int]) -> None:
        """Forget the sources idle past the template lifetime, then mark `source` as heard
        from now. Idle sources are at the front of the order: this costs O(1) per message
        plus O(1) per source forgotten."""
        now = self.clock()
        if self.template_lifetime is not None:
            while self.templates:
                oldest = next(iter(self.templates))
                if now - self._heard_at[oldest] < self.template_lifetime:
                    break
                self._forget(oldest)
        if source in self.templates:
            self.templates.move_to_end(source)
            self._heard_at[source] = now

    def _forget(self, source: tuple[str, int]) -> None:
        """Drop the templates of one (exporter, domain)."""
        self.templates.pop(source, None)
        self._heard_at.pop(source, None)

    def _learn(self, source: tuple[str, int], template: Template) -> None:
        if source not in self.templates:
            if self.max_sources is not None and len(self.templates) >= self.max_sources:
                self._forget(next(iter(self.templates)))
            self.templates[source] = {}
            self._heard_at[source] = self.clock()
        self.templates[source][template.template_id] = template

    def _read_templates(self, body: bytes, set_id: int, source: tuple[str, int]) -> None:
        pos, end = 0, len(body)
        options = set_id == OPTIONS_TEMPLATE_SET_ID
        while end - pos >= 4:
            template_id, count = struct.unpack_from("!HH", body, pos)
            pos += 4
            if count == 0:  # withdrawal; the set id as template id withdraws them all
                if template_id == set_id:
                    self._forget(source)
                else:
                    self.templates.get(source, {}).pop(template_id, None)
                continue
            scope_count = 0
            if options:
                if pos + 2 > end:
                    raise DecodeError(f"options template {template_id} truncated")
                scope_count = struct.unpack_from("!H", body, pos)[0]
                pos += 2
            fields = []
            for _ in range(count):
                if pos + 4 > end:
                    raise DecodeError(f"template {template_id} truncated after "
                                      f"{len(fields)} of {count} fields")
                element_id, length = struct.unpack_from("!HH", body, pos)
                pos += 4
                enterprise = IANA
                if element_id & 0x8000:
                    if pos + 4 > end:
                        raise DecodeError(f"template {template_id} truncated in the "
                                          "enterprise number")
                    enterprise = struct.unpack_from("!I", body, pos)[0]
                    pos += 4
                    element_id &= 0x7FFF
                if length == 0:
                    raise DecodeError(f"template {template_id}: field {element_id} has "
                                      "length 0")
                fields.append(TemplateField(lookup(enterprise, element_id), length))
            if template_id < MIN_DATA_SET_ID:
                raise DecodeError(f"template id {template_id} is below 256")
            self._learn(source, Template(template_id, fields, scope_count))


class MessageStream:
    """Cuts a TCP/TLS byte stream into messages using the header's length field."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= 4:
            version, length = struct.unpack_from("!HH", self._buffer)
            if version != VERSION or length < HEADER.size:
                raise DecodeError(f"stream out of step: version {version}, length {length}")
            if len(self._buffer) < length:
                break
            messages.append(bytes(self._buffer[:length]))
            del self._buffer[:length]
        return messages
