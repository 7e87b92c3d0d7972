"""The sans-IO IPFIX codec: round trips, framing, sequence numbers, malformed input."""

import ipaddress
import struct

import pytest
from hypothesis import given, settings, strategies as st

from ovsflow.ipfix import codec
from ovsflow.ipfix.codec import NTP_EPOCH_OFFSET, DecodeError, Template, TemplateField
from ovsflow.ipfix.messages import HEADER, MessageDecoder, MessageEncoder, MessageStream
from ovsflow.ipfix.elements import (
    ANTREA_PEN, DATA_TYPES, REVERSE_PEN, VARIABLE_LENGTH, InformationElement, element,
)
from ovsflow.ipfix.templates import ALL_TEMPLATES, RECORD_TEMPLATES
from ovsflow.record import CONNTRACK, DENY, FlowRecord


def encoded(kind, ipv6=False, **fields):
    """A record of `kind` encoded with its template: (template, bytes)."""
    address = bytes(16 if ipv6 else 4)
    record_template = RECORD_TEMPLATES[kind, ipv6]
    record = FlowRecord(kind, address, address, 6, **fields)
    return record_template.template, record_template.encode(record)

# A value strategy and the decoder's expected JSON-friendly form, per data type.
_U = {t: st.integers(0, 2 ** (8 * n) - 1) for t, n in
      [("unsigned8", 1), ("unsigned16", 2), ("unsigned32", 4), ("unsigned64", 8),
       ("dateTimeSeconds", 4), ("dateTimeMilliseconds", 8)]}
_S = {t: st.integers(-(2 ** (8 * n - 1)), 2 ** (8 * n - 1) - 1) for t, n in
      [("signed8", 1), ("signed16", 2), ("signed32", 4), ("signed64", 8)]}


def value_strategy(data_type, length):
    if data_type in _U:
        return st.integers(0, 2 ** (8 * length) - 1).map(lambda v: (v, v))
    if data_type in _S:
        return st.integers(-(2 ** (8 * length - 1)), 2 ** (8 * length - 1) - 1).map(
            lambda v: (v, v))
    if data_type == "float64":
        return st.floats(allow_nan=False).map(lambda v: (v, v))
    if data_type == "float32":
        return st.floats(width=32, allow_nan=False).map(lambda v: (v, v))
    if data_type == "boolean":
        return st.booleans().map(lambda v: (v, v))
    if data_type == "ipv4Address":
        return st.ip_addresses(v=4).map(lambda a: (a.packed, str(a)))
    if data_type == "ipv6Address":
        return st.ip_addresses(v=6).map(lambda a: (a.packed, a))
    if data_type == "macAddress":
        return st.binary(min_size=6, max_size=6).map(lambda b: (b, b.hex(":")))
    if data_type == "string":
        return st.text(max_size=400).map(lambda s: (s, s))
    if data_type == "octetArray":
        return st.binary(max_size=400).map(lambda b: (b, b.hex()))
    if data_type == "dateTimeMicroseconds":
        return st.integers(0, (2**32 - 1 - NTP_EPOCH_OFFSET) * 10**6).map(lambda v: (v, v))
    if data_type == "dateTimeNanoseconds":
        return st.integers(0, (2**32 - 1 - NTP_EPOCH_OFFSET) * 10**9).map(lambda v: (v, v))
    raise AssertionError(data_type)


@st.composite
def field_and_value(draw):
    data_type = draw(st.sampled_from(sorted(DATA_TYPES)))
    length = DATA_TYPES[data_type]
    if data_type.startswith(("unsigned", "signed")):
        length = draw(st.integers(1, length))  # reduced-size encoding, RFC 7011 §6.2
    enterprise = draw(st.sampled_from([0, REVERSE_PEN, ANTREA_PEN, 4242]))
    ie = InformationElement(f"e{draw(st.integers(1, 10**6))}", draw(st.integers(1, 0x7FFF)),
                            data_type, 0 if enterprise == 0 else enterprise)
    value, expected = draw(value_strategy(data_type, length))
    return TemplateField(ie, length), value, expected


def field_lists():
    return st.lists(field_and_value(), min_size=1, max_size=12,
                    unique_by=lambda f: f[0].element.name)


@settings(max_examples=300, deadline=None)
@given(field_lists(), st.integers(1, 5))
def test_values_of_every_type_and_length_round_trip(fields, copies):
    template = Template(256, [f for f, _, _ in fields])
    record = template.encode_record([v for _, v, _ in fields])
    decoded = template.decode_records(record * copies)
    assert len(decoded) == copies
    for values in decoded:
        for f, _, expected in fields:
            got = values[f.element.name]
            if f.element.data_type == "float32":
                assert got == pytest.approx(expected, rel=1e-6)
            elif f.element.data_type == "ipv6Address":
                assert ipaddress.ip_address(got) == expected
            else:
                assert got == expected, f


@settings(max_examples=200, deadline=None)
@given(field_lists(), st.integers(1, 5), st.integers(0, 2**32 - 1),
       st.sampled_from([256, 1000, 65535]))
def test_messages_round_trip_definitions_and_records(fields, copies, domain, template_id):
    template = Template(template_id, [f for f, _, _ in fields])
    record = template.encode_record([v for _, v, _ in fields])
    encoder = MessageEncoder(domain)
    messages = encoder.template_messages([template], 1234)
    messages += encoder.data_messages([(template, [record] * copies)], 1234)
    decoder = MessageDecoder()
    decoded = [decoder.decode(m, "exp") for m in messages]
    learned = decoder.templates["exp", domain][template_id]
    assert [(f.element.enterprise, f.element.element_id, f.length) for f in learned.fields] == \
        [(f.element.enterprise, f.element.element_id, f.length) for f, _, _ in fields]
    records = [r for d in decoded for r in d.records]
    assert len(records) == copies and all(t == template_id for t, _ in records)
    assert all(d.observation_domain_id == domain and d.export_time == 1234 for d in decoded)
    assert learned.decode_records(record) == [records[0][1]]


@given(st.lists(st.integers(1, 300), min_size=1, max_size=30), st.integers(240, 2000))
def test_messages_respect_the_size_limit_and_count_sequence_numbers(batch_sizes, limit):
    template, record = encoded(CONNTRACK)
    encoder = MessageEncoder(9, limit)
    decoder = MessageDecoder()
    for message in encoder.template_messages(ALL_TEMPLATES, 0):
        assert len(message) <= limit
        assert decoder.decode(message).records == []
    expected_sequence = 0
    for size in batch_sizes:
        for message in encoder.data_messages([(template, [record] * size)], 0):
            assert len(message) <= limit
            decoded = decoder.decode(message)
            assert decoded.sequence == expected_sequence
            expected_sequence += len(decoded.records)
    assert expected_sequence == sum(batch_sizes) == encoder.sequence


def test_sets_are_padded_to_four_bytes():
    for state in ["", "A", "AB", "ABC"]:
        template, record = encoded(CONNTRACK, tcp_state=state)
        [message] = MessageEncoder(1).data_messages([(template, [record])], 0)
        set_length = struct.unpack_from("!H", message, HEADER.size + 2)[0]
        assert set_length % 4 == 0 and len(message) == HEADER.size + set_length
        decoder = MessageDecoder()
        decoder.decode(MessageEncoder(1).template_messages([template], 0)[0])
        [(_, values)] = decoder.decode(message).records
        assert values["tcpState"] == state


def test_variable_length_forms():
    template = Template(300, [TemplateField(element("tcpState"), VARIABLE_LENGTH)])
    assert template.encode_record(["x" * 254])[:1] == b"\xfe"
    assert template.encode_record(["x" * 255])[:3] == b"\xff\x00\xff"
    assert template.encode_record(["é" * 300])[:3] == b"\xff\x02\x58"
    octets = Template(301, [TemplateField(element("octetDeltaCount"), 8),
                            TemplateField(InformationElement("blob", 999, "octetArray"),
                                          VARIABLE_LENGTH)])
    with pytest.raises(ValueError, match="exceeds 65535"):  # bytes are not cut
        octets.encode_record([1, b"x" * 70000])


def test_a_string_over_65535_bytes_is_cut_at_a_character_boundary_and_counted():
    """A string never makes the encoder raise: an OVSDB value of 70,000 bytes once stopped a
    node's export. It is cut to what the field holds, never inside a character."""
    template = Template(300, [TemplateField(element("sourcePodName"), VARIABLE_LENGTH),
                              TemplateField(element("flowType"), 1)])
    before = codec.strings_cut
    ascii_record = template.encode_record(["a" * 69_999 + "!", 2])
    assert ascii_record[:3] == b"\xff\xff\xff" and len(ascii_record) == 3 + 65535 + 1
    # 2-byte characters: 65535 would split the 32768th, so 65534 bytes are kept
    wide = template.encode_record(["é" * 40_000, 3])
    assert wide[:3] == b"\xff\xff\xfe" and len(wide) == 3 + 65534 + 1
    # 4 ASCII bytes, then 4-byte characters: the 65531 bytes left hold 16382 and 3 bytes
    emoji = template.encode_record(["abcd" + "\N{GRINNING FACE}" * 20_000, 4])
    assert int.from_bytes(emoji[1:3], "big") == 4 + 4 * 16382
    assert codec.strings_cut == before + 3
    decoded = [values for values in template.decode_records(ascii_record + wide + emoji)]
    assert [d["sourcePodName"] for d in decoded] == [
        "a" * 65535, "é" * 32767, "abcd" + "\N{GRINNING FACE}" * 16382]
    assert [d["flowType"] for d in decoded] == [2, 3, 4]
    # at the limit, nothing is cut; a lone surrogate (JSON can escape one) becomes "?"
    assert len(template.encode_record(["b" * 65535, 1])) == 3 + 65535 + 1
    assert template.encode_record(["x\ud800y", 1]) == b"\x03x?y\x01"
    assert codec.strings_cut == before + 3


def test_enterprise_bit_and_reverse_elements_in_the_definition():
    template = RECORD_TEMPLATES["conntrack", False].template
    definition = template.definition()
    reverse = element("reverseOctetTotalCount")
    assert reverse.enterprise == REVERSE_PEN and reverse.element_id == 85
    assert struct.pack("!HHI", 0x8000 | 85, 8, REVERSE_PEN) in definition
    assert struct.pack("!HHI", 0x8000 | 136, VARIABLE_LENGTH, ANTREA_PEN) in definition


def test_template_withdrawal():
    template = RECORD_TEMPLATES["deny", False].template
    encoder, decoder = MessageEncoder(3), MessageDecoder()
    [defined] = encoder.template_messages([template], 0)
    decoder.decode(defined, "a")
    assert 260 in decoder.templates["a", 3]
    withdraw = HEADER.pack(10, 24, 0, 0, 3) + struct.pack("!HHHH", 2, 8, 260, 0)
    decoder.decode(withdraw, "a")
    assert 260 not in decoder.templates["a", 3]
    decoder.decode(defined, "a")
    withdraw_all = HEADER.pack(10, 24, 0, 0, 3) + struct.pack("!HHHH", 2, 8, 2, 0)
    decoder.decode(withdraw_all, "a")
    assert decoder.templates == {}


def test_data_before_template_is_reported_not_fatal():
    template, record = encoded(DENY)
    [message] = MessageEncoder(1).data_messages([(template, [record])], 0)
    decoded = MessageDecoder().decode(message)
    assert decoded.records == [] and decoded.unknown_template_sets == [260]


def test_templates_are_kept_per_exporter_and_domain():
    template, record = encoded(DENY)
    decoder = MessageDecoder()
    decoder.decode(MessageEncoder(1).template_messages([template], 0)[0], "a")
    assert decoder.decode(MessageEncoder(1).data_messages([(template, [record])], 0)[0],
                          "b").unknown_template_sets == [260]
    assert decoder.decode(MessageEncoder(2).data_messages([(template, [record])], 0)[0],
                          "a").unknown_template_sets == [260]


class FakeClock:
    """Seconds set by the test: template lifetimes are tested without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def deny_template_and_data(domain: int = 1) -> tuple[bytes, bytes]:
    template, record = encoded(DENY)
    encoder = MessageEncoder(domain)
    [defined] = encoder.template_messages([template], 0)
    [data] = encoder.data_messages([(template, [record])], 0)
    return defined, data


def test_sources_not_heard_from_for_the_template_lifetime_are_forgotten():
    clock = FakeClock()
    decoder = MessageDecoder(template_lifetime=1800, clock=clock)
    defined, data = deny_template_and_data()
    decoder.decode(defined, "a")
    decoder.decode(defined, "b")
    clock.now = 1000.0
    assert len(decoder.decode(data, "a").records) == 1  # heard from: "a" lives on
    clock.now = 2500.0  # "b" silent for 2500 s, "a" for 1500 s
    assert len(decoder.decode(data, "a").records) == 1
    assert list(decoder.templates) == [("a", 1)]
    assert decoder.decode(data, "b").unknown_template_sets == [260]
    clock.now = 4300.0  # "a" silent for 1800 s: its templates are gone too
    assert decoder.decode(data, "a").unknown_template_sets == [260]
    assert decoder.templates == {}


def test_many_short_lived_udp_exporters_keep_memory_bounded():
    clock = FakeClock()
    decoder = MessageDecoder(template_lifetime=60, clock=clock)
    defined, data = deny_template_and_data()
    for i in range(20_000):  # a new exporter every second, each heard from once
        clock.now = float(i)
        decoder.decode(defined, f"10.0.{i // 256}.{i % 256}:4739")
    assert len(decoder.templates) == 60  # those of the last 60 s
    assert len(decoder.decode(data, "10.0.78.31:4739").records) == 1  # the newest, i = 19999


def test_at_most_max_sources_keep_templates_the_least_recently_heard_goes():
    clock = FakeClock()
    decoder = MessageDecoder(max_sources=2, clock=clock)
    defined, data = deny_template_and_data()
    decoder.decode(defined, "a")
    decoder.decode(defined, "b")
    decoder.decode(data, "a")  # "b" is now the least recently heard from
    decoder.decode(defined, "c")
    assert list(decoder.templates) == [("a", 1), ("c", 1)]
    assert decoder.decode(data, "b").unknown_template_sets == [260]


def test_without_a_lifetime_templates_stay():
    clock = FakeClock()
    decoder = MessageDecoder(clock=clock)
    defined, data = deny_template_and_data()
    decoder.decode(defined, "a")
    clock.now = 10.0**9
    assert len(decoder.decode(data, "a").records) == 1


@pytest.mark.parametrize("message, fragment", [
    (b"\x00\x0a", "shorter than the 16-byte header"),
    (HEADER.pack(9, 16, 0, 0, 0), "version 9"),
    (HEADER.pack(10, 40, 0, 0, 0), "header says 40 bytes"),
    (HEADER.pack(10, 18, 0, 0, 0) + b"\x00\x02", "too short for a set header"),
    (HEADER.pack(10, 20, 0, 0, 0) + struct.pack("!HH", 256, 30), "has length 30"),
    (HEADER.pack(10, 20, 0, 0, 0) + struct.pack("!HH", 1, 4), "reserved"),
    (HEADER.pack(10, 28, 0, 0, 0) + struct.pack("!HHHHHH", 2, 12, 256, 2, 8, 4),
     "truncated after 1 of 2 fields"),
    (HEADER.pack(10, 28, 0, 0, 0) + struct.pack("!HHHHHH", 2, 12, 7, 1, 8, 4), "below 256"),
])
def test_malformed_messages_raise_a_clear_error(message, fragment):
    with pytest.raises(DecodeError, match=fragment):
        MessageDecoder().decode(message)


def test_truncated_variable_length_field():
    template = Template(256, [TemplateField(element("tcpState"), VARIABLE_LENGTH)])
    with pytest.raises(DecodeError, match="tcpState needs 10 bytes"):
        template.decode_records(b"\x0aabc")


@pytest.mark.fuzz
@given(st.binary(max_size=300))
def test_fuzzed_bytes_decode_or_raise_decode_error(data):
    decoder = MessageDecoder()
    decoder.decode(MessageEncoder(0).template_messages(ALL_TEMPLATES, 0)[0])
    try:
        decoder.decode(data)
    except DecodeError:
        pass


@pytest.mark.fuzz
@given(st.lists(st.integers(0, 255), min_size=1, max_size=400).map(bytes), st.data())
def test_fuzzed_message_bodies_after_a_valid_header(body, data):
    """Bodies that claim to be well framed: the decoder must reject or decode, never crash."""
    decoder = MessageDecoder()
    for message in MessageEncoder(0).template_messages(ALL_TEMPLATES, 0):
        decoder.decode(message)
    message = HEADER.pack(10, HEADER.size + len(body), 0, 0, 0) + body
    try:
        decoder.decode(message)
    except DecodeError:
        pass


@given(st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_stream_framing_in_any_chunking(chunk_sizes):
    template, record = encoded(CONNTRACK, ipv6=True, tcp_state="SYN_SENT")
    encoder = MessageEncoder(5, 300)
    messages = encoder.template_messages([template], 0) + encoder.data_messages(
        [(template, [record] * 7)], 0)
    stream_bytes = b"".join(messages)
    stream, received, pos, i = MessageStream(), [], 0, 0
    while pos < len(stream_bytes):
        size = chunk_sizes[i % len(chunk_sizes)]
        received += stream.feed(stream_bytes[pos:pos + size])
        pos, i = pos + size, i + 1
    assert received == messages


def test_stream_out_of_step_is_an_error():
    with pytest.raises(DecodeError, match="out of step"):
        MessageStream().feed(b"HTTP/1.1 200 OK\r\n")


def test_template_ids_are_fixed_and_distinct():
    ids = [t.template_id for t in ALL_TEMPLATES]
    assert ids == [*range(256, 262), 270]  # 270: the deny totals
