"""Bulk encoding (`RecordTemplate.encode_many`, `Template.bulk_encoder`) and the cutting of
records into size-limited messages: the bytes decode to the records given, a value that does
not fit its field raises (a string too long for it is cut), messages are filled, and the span
cache stays bounded."""

import ipaddress
import struct
import tracemalloc
from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st

from ovsflow.ipfix import codec
from ovsflow.ipfix.codec import Template, TemplateField
from ovsflow.ipfix.messages import HEADER, SET_HEADER, MessageDecoder, MessageEncoder
from ovsflow.ipfix.elements import VARIABLE_LENGTH, element
from ovsflow.ipfix.templates import ALL_TEMPLATES, RECORD_TEMPLATES, template_fields
from ovsflow.record import CONNTRACK, CONNTRACK_UNCOUNTED, DENY, FlowRecord
from test_collectors import _ipfixdump_records as ipfixdump_records
from test_ipfix_codec import field_lists

ENCODE_ERRORS = (struct.error, OverflowError, ValueError)
U8, U16, U32, U64 = (st.integers(0, 2**bits - 1) for bits in (8, 16, 32, 64))
STRINGS = st.one_of(
    st.sampled_from(["", "ESTABLISHED", "TIME_WAIT", "web-7d9c5b6f4-x2x9q", "default"]),
    st.text(max_size=30),
    st.text(alphabet="ab", min_size=250, max_size=300),  # the 3-byte length form from 255
)


@st.composite
def flow_records(draw, kind=None, ipv6=None):
    kind = kind or draw(st.sampled_from([CONNTRACK, CONNTRACK_UNCOUNTED, DENY]))
    length = 16 if (draw(st.booleans()) if ipv6 is None else ipv6) else 4
    addresses = st.binary(min_size=length, max_size=length)
    return FlowRecord(
        kind, draw(addresses), draw(addresses), draw(U8), draw(U16), draw(U16), draw(U8),
        draw(U8), start_ms=draw(U64), end_ms=draw(U64), start_seconds=draw(U32),
        end_seconds=draw(U32), end_reason=draw(U8), packets=draw(U64), octets=draw(U64),
        packet_delta=draw(U64), octet_delta=draw(U64), reverse_packets=draw(U64),
        reverse_octets=draw(U64), reverse_packet_delta=draw(U64),
        reverse_octet_delta=draw(U64), flow_id=draw(U64), flow_type=draw(U8),
        tcp_state=draw(STRINGS), ingress_rule_action=draw(U8), egress_rule_action=draw(U8),
        **{name: draw(STRINGS) for name in [
            "ingress_rule_name", "egress_rule_name", "source_pod_name", "source_pod_namespace",
            "source_node_name", "destination_pod_name", "destination_pod_namespace",
            "destination_node_name"]})


def expected_values(record: FlowRecord) -> dict[str, object]:
    """What MessageDecoder shows for `record`: element name -> value."""
    record_template = RECORD_TEMPLATES[record.kind, record.ipv6]
    expected = dict(zip(record_template.template.names, record_template.values(record)))
    for name, value in expected.items():
        if isinstance(value, bytes):  # addresses
            expected[name] = str(ipaddress.ip_address(value))
    return expected


def decoded_values(values: dict[str, object]) -> dict[str, object]:
    return {name: str(ipaddress.ip_address(value)) if "IPv" in name and "Address" in name
            else value for name, value in values.items()}


def by_template(records: list[FlowRecord]) -> dict:
    """Grouped per template, as the exporter does, in order within each group."""
    groups: dict = {}
    for record in records:
        groups.setdefault(RECORD_TEMPLATES[record.kind, record.ipv6], []).append(record)
    return groups


def encode_batch(records: list[FlowRecord]) -> list[tuple[Template, list[bytes]]]:
    return [(t.template, t.encode_many(group)) for t, group in by_template(records).items()]


@settings(max_examples=200)
@given(st.lists(flow_records(), min_size=1, max_size=30),
       st.one_of(st.sampled_from([1472, 65535]), st.integers(300, 4000)),
       st.integers(0, 2**32 - 1))
def test_bulk_encoded_messages_decode_to_the_records_given(records, limit, sequence):
    groups = by_template(records)
    batches = [(t.template, t.encode_many(group)) for t, group in groups.items()]
    for (t, group), (_, encoded) in zip(groups.items(), batches):
        # the same bytes as the record-by-record encoder
        assert encoded == [t.template.encode_record(t.values(r)) for r in group]
    encoder = MessageEncoder(42, limit)
    encoder.sequence = sequence
    longest = max(len(data) for _, encoded in batches for data in encoded)
    if HEADER.size + SET_HEADER.size + longest + 3 > limit:
        with pytest.raises(ValueError, match=r"a record of \d+ bytes does not fit"):
            encoder.data_messages(batches, 1234)
        return
    messages = encoder.data_messages(batches, 1234)
    decoder = MessageDecoder()
    for message in MessageEncoder(42).template_messages(ALL_TEMPLATES, 1234):
        decoder.decode(message)
    decoded, next_sequence = [], sequence
    for message in messages:
        assert len(message) <= limit
        result = decoder.decode(message)
        assert result.sequence == next_sequence and result.export_time == 1234
        next_sequence = (next_sequence + len(result.records)) % 2**32
        decoded += result.records
    assert encoder.sequence == next_sequence
    assert [(template_id, decoded_values(values)) for template_id, values in decoded] == \
        [(t.template.template_id, expected_values(r)) for t, group in groups.items()
         for r in group]
    # Filled: the first record of each next message would not have fit in the one before
    # (a set header if it starts a new set, and 3 bytes kept for padding).
    record_lengths = [len(data) for _, encoded in batches for data in encoded]
    first_of_message = 0
    for message in messages[:-1]:
        first_of_message += len(decoder.decode(message).records)
        assert len(message) + SET_HEADER.size + record_lengths[first_of_message] + 3 > limit


BAD_VALUES = [  # (attribute, value, the kinds whose templates hold it)
    ("source_port", 70000, None), ("destination_port", -1, None), ("protocol", 256, None),
    ("start_seconds", 2**32, None), ("end_reason", -3, None), ("start_ms", 2**64, None),
    ("ingress_rule_action", 300, None), ("egress_rule_action", -1, None),
    ("flow_type", 256, None), ("icmp_type", 256, None), ("icmp_code", -1, None),
    ("packets", -5, {CONNTRACK, DENY}), ("octet_delta", 2**64, {CONNTRACK, DENY}),
    ("reverse_octets", -1, {CONNTRACK}), ("flow_id", 2**64, {CONNTRACK}),
]  # a string too long for its field is cut instead (next test)


@settings(max_examples=200)
@given(st.sampled_from(BAD_VALUES), st.sampled_from([CONNTRACK, CONNTRACK_UNCOUNTED, DENY]),
       st.booleans(), st.data())
def test_a_value_that_does_not_fit_its_field_raises(bad, kind, ipv6, data):
    attribute, value, kinds = bad
    if kinds is not None and kind not in kinds:
        kind = sorted(kinds)[0]
    records = data.draw(st.lists(flow_records(kind, ipv6), min_size=1, max_size=10))
    record_template = RECORD_TEMPLATES[kind, ipv6]
    record_template.encode_many(records)  # spans of these values are now cached
    culprit = data.draw(st.sampled_from(records))
    setattr(culprit, attribute, value)
    with pytest.raises(ENCODE_ERRORS):
        record_template.encode_many(records)
    with pytest.raises(ENCODE_ERRORS):  # and alone, as the exporter's fallback encodes it
        record_template.encode(culprit)


LONG_STRINGS = [("source_pod_name", "é" * 40000, None), ("ingress_rule_name", "x" * 70000, None),
                ("destination_node_name", "n" * 65536, None),
                ("tcp_state", "\N{SNOWMAN}" * 30000, {CONNTRACK, CONNTRACK_UNCOUNTED})]


@settings(max_examples=40)
@given(st.sampled_from(LONG_STRINGS), st.sampled_from([CONNTRACK, CONNTRACK_UNCOUNTED, DENY]),
       st.booleans(), st.data())
def test_a_string_too_long_for_its_field_is_cut_in_bulk_and_alone(long, kind, ipv6, data):
    """Never raised (the store encodes its spans outside the exporter's fallback): the
    record comes out, its string cut at a character boundary to the field's 65535 bytes,
    the same in bulk as alone, and the other records as given."""
    attribute, value, kinds = long
    if kinds is not None and kind not in kinds:
        kind = sorted(kinds)[0]
    records = data.draw(st.lists(flow_records(kind, ipv6), min_size=1, max_size=10))
    record_template = RECORD_TEMPLATES[kind, ipv6]
    culprit = data.draw(st.sampled_from(records))
    setattr(culprit, attribute, value)
    encoded = record_template.encode_many(records)
    at = records.index(culprit)
    assert encoded[at] == record_template.encode(culprit)
    decoded = [decoded_values(record_template.template.decode_records(data)[0])
               for data in encoded]
    kept = value.encode()[:65535].decode(errors="ignore")
    assert len(kept.encode()) > 65535 - 4  # at most a character's partial bytes dropped
    element_name = {attribute: name for name, attribute in template_fields(kind, ipv6)}
    assert decoded.pop(at)[element_name[attribute]] == kept
    assert decoded == [expected_values(r) for r in records if r is not culprit]


def test_a_cached_span_is_not_given_to_a_record_with_a_bad_action():
    """Spans are cached by value: a bad action must miss the cache and raise."""
    record_template = RECORD_TEMPLATES[CONNTRACK, False]
    good = FlowRecord(CONNTRACK, b"\x01" * 4, b"\x02" * 4, 6, tcp_state="ESTABLISHED",
                      ingress_rule_action=2)
    bad = FlowRecord(CONNTRACK, b"\x01" * 4, b"\x02" * 4, 6, tcp_state="ESTABLISHED",
                     ingress_rule_action=258)  # 258 % 256 == 2
    [encoded] = record_template.encode_many([good])
    with pytest.raises(struct.error):
        record_template.encode_many([good, bad])
    assert record_template.encode_many([good, good]) == [encoded, encoded]


@settings(max_examples=300)
@given(field_lists(), st.integers(1, 4))
def test_bulk_encoder_of_any_template_shape(fields, copies):
    """Variable-length fields first, last, alone or none; spans of one field."""
    template = Template(256, [f for f, _, _ in fields])
    attributes = [f"a{index}" for index in range(len(fields))]
    record = SimpleNamespace(**{a: value for a, (_, value, _) in zip(attributes, fields)})
    codes = [codec._struct_format(f) for f, _, _ in fields]
    variable = [index for index, code in enumerate(codes) if code is None]
    if variable and any(f.element.data_type.startswith("float")
                        for f, _, _ in fields[variable[0]:variable[-1] + 1]):
        with pytest.raises(ValueError, match="float between variable-length fields"):
            template.bulk_encoder(attributes)
        return
    encoded = template.bulk_encoder(attributes)([record] * copies)
    assert encoded == [template.encode_record([v for _, v, _ in fields])] * copies
    [decoded, *_] = template.decode_records(b"".join(encoded))
    for f, _, expected in fields:
        got = decoded[f.element.name]
        if f.element.data_type == "float32":
            assert got == pytest.approx(expected, rel=1e-6)
        elif f.element.data_type == "ipv6Address":
            assert ipaddress.ip_address(got) == expected
        else:
            assert got == expected


def test_the_span_cache_is_bounded(monkeypatch):
    """Distinct strings beyond MAX_CACHED_SPANS do not pile up in memory."""
    monkeypatch.setattr(codec, "MAX_CACHED_SPANS", 50)
    template = Template(300, [TemplateField(element("sourceTransportPort"), 2),
                              TemplateField(element("sourcePodName"), VARIABLE_LENGTH),
                              TemplateField(element("flowEndReason"), 1)])
    encode = template.bulk_encoder(["port", "pod", "reason"])
    records = [SimpleNamespace(port=i, pod=f"{i:05d}" * 400, reason=1) for i in range(2000)]
    tracemalloc.start()
    try:
        encoded = encode(records)
        assert [template.decode_records(data)[0]["sourcePodName"] for data in encoded] == \
            [r.pod for r in records]
        del encoded
        codec._encode_string.cache_clear()  # strings cached for encode_record, not spans
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained < 500_000  # 50 spans of 2 kB; unbounded, 2000 of them would be 4 MB


def test_records_cut_at_record_boundaries_over_udp():
    """Records of varying length (Pod names) over a 1472-byte path: every message full."""
    records = [FlowRecord(CONNTRACK, bytes([10, 0, i // 256, i % 256]), b"\x0a\x00\xff\x01",
                          6, 1024 + i, 80, tcp_state="ESTABLISHED",
                          source_pod_name="p" * (i % 90), flow_id=i) for i in range(3000)]
    batches = encode_batch(records)
    messages = MessageEncoder(1, 1472).data_messages(batches, 0)
    decoder = MessageDecoder()
    decoder.decode(MessageEncoder(1).template_messages(ALL_TEMPLATES, 0)[0])
    flow_ids = []
    for message in messages:
        assert len(message) <= 1472
        flow_ids += [values["flowId"] for _, values in decoder.decode(message).records]
    assert flow_ids == list(range(3000))
    assert all(len(m) > 1472 - 3 - max(map(len, batches[0][1])) for m in messages[:-1])


def test_padding_never_pushes_a_message_over_the_limit():
    """Ten 7-byte records would fill a 90-byte message exactly, but their set then needs 2
    bytes of padding: a message takes nine, as many as fit with 3 bytes kept for padding."""
    template = Template(300, [TemplateField(element("sourceTransportPort"), 2),
                              TemplateField(element("flowEndReason"), 1),
                              TemplateField(element("tcpState"), VARIABLE_LENGTH)])
    records = template.bulk_encoder(["port", "reason", "state"])(
        [SimpleNamespace(port=4739, reason=2, state="ABC")] * 30)
    assert records == [b"\x12\x83\x02\x03ABC"] * 30
    messages = MessageEncoder(1, 90).data_messages([(template, records)], 0)
    decoder = MessageDecoder()
    decoder.decode(MessageEncoder(1).template_messages([template], 0)[0])
    assert [len(m) for m in messages] == [84, 84, 84, 44]
    assert [len(decoder.decode(m).records) for m in messages] == [9, 9, 9, 3]


def test_ipfixdump_reads_bulk_encoded_strings(tmp_path):
    """libfixbuf's ipfixDump, a decoder we did not write, reads the bulk encoder's strings."""
    records = [
        FlowRecord(CONNTRACK, bytes([10, 1, 0, i]), b"\x0a\x02\x00\x01", 6, 4000 + i, 80,
                   tcp_state=["ESTABLISHED", "SYN_SENT", ""][i % 3],
                   source_pod_name="web-" + "x" * (i * 40), source_pod_namespace="default",
                   ingress_rule_name="allow-http" if i % 2 else "", ingress_rule_action=i % 2,
                   icmp_type=i, flow_id=i)
        for i in range(9)]  # pod names of 4 to 324 bytes: both length forms
    records.append(FlowRecord(DENY, b"\xfd" + bytes(15), b"\xfd" + bytes(14) + b"\x01", 17,
                              53, 53, egress_rule_name="deny-dns", egress_rule_action=2,
                              destination_pod_name="dns-0"))
    encoder = MessageEncoder(9, 1472)
    path = tmp_path / "bulk.ipfix"
    path.write_bytes(b"".join(encoder.template_messages(ALL_TEMPLATES, 0)
                              + encoder.data_messages(encode_batch(records), 0)))
    shown = ipfixdump_records(path)
    assert len(shown) == len(records)
    # ipfixDump knows no Antrea element: it shows a string's length, read from the framing
    # that the fields after it (flowId, the ICMP and millisecond fields) depend on.
    strings = [("101", "source_pod_name"), ("100", "source_pod_namespace"),
               ("103", "destination_pod_name"), ("141", "ingress_rule_name"),
               ("142", "egress_rule_name")]
    for record, fields in zip(records, shown):
        assert fields["7"] == str(record.source_port)
        for element_id, attribute in strings:
            assert fields[f"56506/{element_id}"] == \
                f"len: {len(getattr(record, attribute).encode())}"
        assert fields["56506/139"] == str(record.ingress_rule_action)
        assert fields["56506/140"] == str(record.egress_rule_action)
        assert fields["4"] == str(record.protocol)
        assert fields["176" if len(record.source_address) == 4 else "178"] == str(record.icmp_type)
        if record.kind == CONNTRACK:
            assert fields["56506/136"] == f"len: {len(record.tcp_state)}"
            assert fields["148"] == str(record.flow_id)
