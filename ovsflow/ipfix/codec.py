"""IPFIX (RFC 7011) templates and their data records as bytes, without I/O.

`Template` encodes and decodes one template's records (messages.py packs them into
messages). Encoding is compiled per template into `struct.Struct` runs, since the exporter
encodes every record of every poll; `bulk_encoder` encodes a whole batch without a Python
loop over its records.
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import starmap
from operator import attrgetter

from .elements import IANA, VARIABLE_LENGTH, InformationElement

MIN_DATA_SET_ID = 256  # set ids below are template sets (2, 3) or reserved
MAX_VARIABLE_LENGTH = 0xFFFF  # RFC 7011 §7: a variable-length value's length has two bytes
# Distinct variable spans (tuples of Pod, rule and TCP state values) kept encoded per template;
# a few hundred bytes each. Past this the cache starts again empty.
MAX_CACHED_SPANS = 8192
NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900-01-01 to 1970-01-01


class DecodeError(ValueError):
    """Malformed IPFIX; the message says where."""


@dataclass(frozen=True)
class TemplateField:
    element: InformationElement
    length: int

    @property
    def variable(self) -> bool:
        return self.length == VARIABLE_LENGTH


_INT_FORMATS = {"unsigned": {1: "B", 2: "H", 4: "I", 8: "Q"},
                "signed": {1: "b", 2: "h", 4: "i", 8: "q"}}


def _struct_format(f: TemplateField) -> str | None:
    """The struct code for a fixed-length field whose value struct can pack as given
    (ints, floats, bytes), or None when the value needs converting first."""
    data_type, length = f.element.data_type, f.length
    for prefix, formats in _INT_FORMATS.items():
        if data_type.startswith(prefix):
            return formats.get(length)
    if data_type in ("dateTimeSeconds", "dateTimeMilliseconds"):
        return _INT_FORMATS["unsigned"].get(length)
    if data_type in ("float32", "float64"):
        return {4: "f", 8: "d"}.get(length)
    if data_type in ("ipv4Address", "ipv6Address", "macAddress", "octetArray"):
        return None if f.variable else f"{length}s"
    return None


def numpy_type(f: TemplateField) -> str | None:
    """The numpy type of a fixed-length field as it is on the wire (big-endian integers,
    addresses as raw bytes), or None for a field that has none."""
    code = _struct_format(f)
    if code is None or code in "fd":
        return None
    if code.endswith("s"):
        return f"V{f.length}"
    return (">u" if code.isupper() else ">i") + str(f.length)  # B H I Q, or b h i q


def _encode_variable(data: bytes) -> bytes:
    """RFC 7011 §7: one length byte, or 255 and a two-byte length."""
    if len(data) < 255:
        return bytes((len(data),)) + data
    if len(data) > MAX_VARIABLE_LENGTH:
        raise ValueError(f"a variable-length value of {len(data)} bytes exceeds "
                         f"{MAX_VARIABLE_LENGTH}")
    return b"\xff" + len(data).to_bytes(2, "big") + data


# Strings cut to fit their field, counted as they are encoded: each distinct string once
# while `_encode_string` keeps it cached (and the connection store keeps the records' strings
# encoded), not once per record.
strings_cut = 0


@functools.lru_cache(maxsize=4096)
def _encode_string(value: str) -> bytes:
    """Cached: exported strings (TCP states, rule and pod names) come from a small set.

    Never raises: a string over the field's 65535 bytes is cut at a character boundary (and
    counted in `strings_cut`), a lone surrogate becomes "?". One bad value from outside (an
    OVSDB external_id, say) must not stop the records of a whole poll; a record that no
    longer fits a message is then the exporter's to reject, alone."""
    global strings_cut
    data = value.encode(errors="replace")
    if len(data) > MAX_VARIABLE_LENGTH:
        strings_cut += 1
        data = data[:MAX_VARIABLE_LENGTH].decode(errors="ignore").encode()
    return _encode_variable(data)


def _field_encoder(f: TemplateField) -> Callable[[object], bytes]:
    """Encoder for a field that struct cannot pack directly."""
    data_type, length = f.element.data_type, f.length
    if data_type == "string":
        if f.variable:
            return _encode_string
        return lambda value: value.encode()[:length].ljust(length, b"\0")  # type: ignore
    if data_type == "octetArray":
        return lambda value: _encode_variable(bytes(value))  # type: ignore[arg-type]
    if data_type == "boolean":
        return lambda value: b"\x01" if value else b"\x02"
    if data_type in ("dateTimeMicroseconds", "dateTimeNanoseconds"):
        scale = 10**6 if data_type == "dateTimeMicroseconds" else 10**9

        def ntp(value: object) -> bytes:
            seconds, fraction = divmod(int(value), scale)  # type: ignore[call-overload]
            # rounded up, so that the decoder's rounding down gives the same value back
            return struct.pack("!II", seconds + NTP_EPOCH_OFFSET, -(-(fraction << 32) // scale))
        return ntp
    if data_type.startswith(("unsigned", "signed")) and 1 <= length <= 8:
        signed = data_type.startswith("signed")
        return lambda value: int(value).to_bytes(length, "big", signed=signed)  # type: ignore
    raise ValueError(f"cannot encode {f.element.name} ({data_type}) in {length} bytes")


def _field_decoder(f: TemplateField) -> Callable[[bytes], object]:
    """Bytes of one field to a JSON-friendly value. A length the data type does not allow is
    shown as hex rather than rejected, so one odd field does not hide a whole record."""
    data_type, length = f.element.data_type, f.length
    if data_type.startswith(("unsigned", "dateTimeSeconds", "dateTimeMilliseconds")) \
            and length <= 8:
        return lambda data: int.from_bytes(data, "big")
    if data_type.startswith("signed") and length <= 8:
        return lambda data: int.from_bytes(data, "big", signed=True)
    if data_type == "float32" and length == 4 or data_type == "float64" and length in (4, 8):
        code = "!f" if length == 4 else "!d"
        return lambda data: struct.unpack(code, data)[0]
    if data_type == "ipv4Address" and length == 4:
        return lambda data: socket.inet_ntop(socket.AF_INET, data)
    if data_type == "ipv6Address" and length == 16:
        return lambda data: socket.inet_ntop(socket.AF_INET6, data)
    if data_type == "macAddress" and length == 6:
        return lambda data: data.hex(":")
    if data_type == "string":
        return lambda data: data.decode("utf-8", "replace")
    if data_type == "boolean" and length == 1:
        return lambda data: {1: True, 2: False}.get(data[0], data[0])
    if data_type in ("dateTimeMicroseconds", "dateTimeNanoseconds") and length == 8:
        scale = 10**6 if data_type == "dateTimeMicroseconds" else 10**9

        def from_ntp(data: bytes) -> int:
            seconds, fraction = struct.unpack("!II", data)
            return (seconds - NTP_EPOCH_OFFSET) * scale + (fraction * scale >> 32)
        return from_ntp
    return lambda data: data.hex()


def _packer(codes: str, attributes: Sequence[str]) -> Callable[[Iterable], Iterable[bytes]]:
    """Records -> the bytes of fields that one Struct packs, read as `attributes`."""
    pack, values = struct.Struct("!" + codes).pack, attrgetter(*attributes)
    if len(attributes) == 1:  # attrgetter of one name gives the bare value
        return lambda records: map(pack, map(values, records))
    return lambda records: starmap(pack, map(values, records))


class _SpanCache(dict):
    """Encoded spans by their tuple of values. A dict, so that a hit is a C-level lookup;
    `__missing__` encodes the ones not seen yet (and raises for a value that does not fit)."""
    __slots__ = ("encode",)

    def __init__(self, encode: Callable[[object], bytes]) -> None:
        super().__init__()
        self.encode = encode

    def __missing__(self, values: object) -> bytes:
        if len(self) >= MAX_CACHED_SPANS:
            self.clear()
        encoded = self[values] = self.encode(values)
        return encoded


def _cached_encoder(span: Template, attributes: Sequence[str]
                    ) -> Callable[[Iterable], Iterable[bytes]]:
    """Records -> the bytes of `span`'s fields, read as `attributes`, encoded through a cache
    keyed by their values: the values must be hashable (strings and numbers are)."""
    values = attrgetter(*attributes)
    if len(attributes) == 1:
        cache = _SpanCache(lambda value: span.encode_record((value,)))
    else:
        cache = _SpanCache(span.encode_record)
    return lambda records: map(cache.__getitem__, map(values, records))


class Template:
    """One (options) template: its definition bytes, and encoding and decoding of its data
    records. `scope_count` > 0 makes it an options template."""

    def __init__(self, template_id: int, fields: Sequence[TemplateField], scope_count: int = 0):
        if not MIN_DATA_SET_ID <= template_id <= 0xFFFF:
            raise ValueError(f"template id {template_id} is outside 256-65535")
        self.template_id = template_id
        self.fields = tuple(fields)
        self.scope_count = scope_count
        self.names = tuple(f.element.name for f in self.fields)
        self.min_record_length = sum(1 if f.variable else f.length for f in self.fields)
        self._decoders = [_field_decoder(f) for f in self.fields]

    @functools.cached_property
    def _encoder(self) -> tuple[struct.Struct | None, int, Callable | None, list]:
        """Compiled on first use, so that a decoded template with a field ovsflow cannot
        encode still decodes. The usual shape of ovsflow's templates, fixed fields then at most
        one variable-length field, gets a fast path: (head struct, its end, tail encoder)."""
        plan = self._compile_encoder()
        fast = plan[0][0] is not None and len(plan) <= 2
        tail = plan[1][1] if fast and len(plan) == 2 else None
        return (plan[0][0] if fast else None), plan[0][3], tail, plan

    def _compile_encoder(self) -> list[tuple[struct.Struct | None, Callable | None, int, int]]:
        """Runs of struct-packable fields become one Struct each; other fields get their
        own encoder. Each step: (struct, encoder, first index, end index)."""
        plan: list[tuple[struct.Struct | None, Callable | None, int, int]] = []
        run_start, codes = 0, ""
        for index, f in enumerate(self.fields):
            code = _struct_format(f)
            if code is not None:
                if not codes:
                    run_start = index
                codes += code
                continue
            if codes:
                plan.append((struct.Struct("!" + codes), None, run_start, index))
                codes = ""
            plan.append((None, _field_encoder(f), index, index + 1))
        if codes:
            plan.append((struct.Struct("!" + codes), None, run_start, len(self.fields)))
        return plan

    def encode_record(self, values: Sequence) -> bytes:
        """The data record for `values`, given in the order of the template's fields."""
        head, head_end, tail, plan = self._encoder
        if head is not None:
            if tail is None:
                return head.pack(*values)
            return head.pack(*values[:head_end]) + tail(values[-1])
        parts = []
        for packer, encoder, start, end in plan:
            if packer is not None:
                parts.append(packer.pack(*values[start:end]))
            else:
                parts.append(encoder(values[start]))  # type: ignore[misc]
        return b"".join(parts)

    def bulk_encoder(self, attributes: Sequence[str]) -> Callable[[Sequence], list[bytes]]:
        """An encoder of many records at once: objects that hold the value of each field in
        the attribute named at the field's position; it returns their data records, in order.

        No Python loop runs over the records, only C calls chained by map and zip: the
        fixed-length fields before the first and after the last variable-length one are
        packed by one `Struct` each, and the span between them (strings and the odd small
        integer) is encoded once per distinct tuple of values, which repeat (TCP states, Pod
        and rule names), then found in a dict. Reading the attributes is most of the cost.
        A value that does not fit its field raises as in `encode_record`: struct.error,
        OverflowError or ValueError."""
        if len(attributes) != len(self.fields):
            raise ValueError(f"template {self.template_id} has {len(self.fields)} fields, "
                             f"{len(attributes)} attributes given")
        codes = [_struct_format(f) for f in self.fields]
        variable = [index for index, code in enumerate(codes) if code is None]
        head_end = variable[0] if variable else len(codes)
        tail_start = variable[-1] + 1 if variable else len(codes)
        spans = []  # record -> bytes of each span, in field order
        if head_end:
            spans.append(_packer("".join(codes[:head_end]), attributes[:head_end]))
        if variable:
            span = Template(self.template_id, self.fields[head_end:tail_start])
            if any(f.element.data_type.startswith("float") for f in span.fields):
                # 0.0 == -0.0: a cache keyed by value would give one the other's bytes
                raise ValueError(f"template {self.template_id}: a float between "
                                 "variable-length fields cannot be encoded in bulk")
            spans.append(_cached_encoder(span, attributes[head_end:tail_start]))
        if tail_start < len(codes):
            spans.append(_packer("".join(codes[tail_start:]), attributes[tail_start:]))

        def encode(records: Sequence) -> list[bytes]:
            if len(spans) == 1:
                return list(spans[0](records))
            return list(map(b"".join, zip(*[span(records) for span in spans])))
        return encode

    def definition(self) -> bytes:
        """The template record (RFC 7011 §3.4.1, §3.4.2.2) for a (options) template set."""
        if self.scope_count:
            parts = [struct.pack("!HHH", self.template_id, len(self.fields), self.scope_count)]
        else:
            parts = [struct.pack("!HH", self.template_id, len(self.fields))]
        for f in self.fields:
            if f.element.enterprise == IANA:
                parts.append(struct.pack("!HH", f.element.element_id, f.length))
            else:
                parts.append(struct.pack("!HHI", f.element.element_id | 0x8000, f.length,
                                         f.element.enterprise))
        return b"".join(parts)

    def decode_records(self, data: bytes) -> list[dict[str, object]]:
        """All data records of a data set body; trailing bytes shorter than a record are
        padding (RFC 7011 §3.3.1)."""
        records = []
        pos, end = 0, len(data)
        while end - pos >= max(self.min_record_length, 1):
            record: dict[str, object] = {}
            for f, decode in zip(self.fields, self._decoders):
                length = f.length
                if length == VARIABLE_LENGTH:
                    if pos >= end:
                        raise DecodeError(f"template {self.template_id}: record truncated "
                                          f"before {f.element.name}")
                    length, pos = data[pos], pos + 1
                    if length == 255:
                        if pos + 2 > end:
                            raise DecodeError(f"template {self.template_id}: truncated "
                                              f"length of {f.element.name}")
                        length, pos = int.from_bytes(data[pos:pos + 2], "big"), pos + 2
                if pos + length > end:
                    raise DecodeError(f"template {self.template_id}: {f.element.name} needs "
                                      f"{length} bytes, {end - pos} left in the set")
                record[f.element.name] = decode(data[pos:pos + length])
                pos += length
            records.append(record)
        if pos != end and any(data[pos:end]):
            raise DecodeError(f"template {self.template_id}: {end - pos} bytes left over "
                              "that are not zero padding")
        return records
