import pytest
from hypothesis import given, strategies as st

from ovsflow.protocols import ALL_PROTOCOLS, IANA_PROTOCOLS, PROTOCOL_NUMBERS
from ovsflow.protocol_list import ProtocolListError, parse_protocol_list


def numbers(entries):
    return parse_protocol_list(entries).protocols.numbers


def test_names_numbers_and_numeric_strings_mix():
    assert numbers(["tcp", "udp", 1, "58"]) == {6, 17, 1, 58}


def test_case_and_surrounding_spaces_are_ignored():
    assert numbers([" TCP ", "Udp", "\tIcmp\n", " 47 "]) == {6, 17, 1, 47}


def test_duplicates_by_number_collapse_without_warning():
    parsed = parse_protocol_list(["tcp", "TCP", 6, "6", " tcp"])
    assert parsed.protocols.numbers == {6}
    assert parsed.warnings == ()


@pytest.mark.parametrize("alias, number", [("icmpv6", 58), ("ipv6-icmp", 58), ("ICMP6", 58),
                                           ("sctp", 132), ("gre", 47), ("udplite", 136)])
def test_aliases(alias, number):
    assert numbers([alias]) == {number}


@pytest.mark.parametrize("entry, quoted, reason", [
    (True, "true", "boolean"), (False, "false", "boolean"), (2.5, "2.5", "fraction"),
    (6.0, "6.0", "fraction"), (None, "null", "null"), ([6], "[6]", "list"),
    ({"tcp": 1}, "{'tcp': 1}", "map"), ("tcpp", "'tcpp'", "not a known protocol name"),
    (256, "256", "0-255"), (-1, "-1", "0-255"), ("300", "'300'", "0-255"),
    ("", "''", "not a known"),
])
def test_invalid_entry_is_warned_with_its_value_and_others_apply(entry, quoted, reason):
    parsed = parse_protocol_list(["udp", entry])
    assert parsed.protocols.numbers == {17}
    assert len(parsed.warnings) == 1
    warning = parsed.warnings[0]
    assert warning.startswith("protocols[1]: ignoring " + quoted)
    assert reason in warning


def test_generically_tracked_protocol_filters_with_a_warning():
    parsed = parse_protocol_list(["tcp", "ospf", 89])
    assert parsed.protocols.numbers == {6, 89}
    assert len(parsed.warnings) == 1 and "only generically" in parsed.warnings[0]
    assert "'ospf'" in parsed.warnings[0]


@pytest.mark.parametrize("name", ["tcp", "udp", "udplite", "icmp", "icmpv6", "sctp", "gre",
                                  "dccp"])
def test_conntrack_tracked_protocols_warn_nothing(name):
    assert parse_protocol_list([name]).warnings == ()


@pytest.mark.parametrize("entries", [None, []])
def test_absent_or_empty_means_all(entries):
    parsed = parse_protocol_list(entries)
    assert parsed.protocols is ALL_PROTOCOLS and parsed.protocols.exports_all
    assert 253 in parsed.protocols and 0 in parsed.protocols


def test_all_invalid_is_an_error_that_lists_each_entry():
    with pytest.raises(ProtocolListError) as caught:
        parse_protocol_list([True, "bogus", 999], key="flowExporter.protocols")
    assert "none of the 3 entries" in str(caught.value)
    assert len(caught.value.details) == 3
    assert "'bogus'" in caught.value.details[1]


def test_not_a_list_is_an_error():
    with pytest.raises(ProtocolListError, match="expected a list"):
        parse_protocol_list("tcp")


def test_membership():
    protocols = parse_protocol_list(["tcp", 1]).protocols
    assert 6 in protocols and 1 in protocols and 17 not in protocols


def test_table_is_consistent():
    assert len(set(IANA_PROTOCOLS.values())) == len(IANA_PROTOCOLS)
    for name, number in PROTOCOL_NUMBERS.items():
        assert name == name.strip().lower() and 0 <= number <= 255
    assert IANA_PROTOCOLS[6] == "tcp" and IANA_PROTOCOLS[132] == "sctp"


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(),
                         st.sampled_from(sorted(PROTOCOL_NUMBERS)))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=12)


@pytest.mark.fuzz
@given(st.lists(yaml_values, max_size=12))
def test_parser_never_fails_unexpectedly_and_stays_in_range(entries):
    try:
        parsed = parse_protocol_list(entries)
    except ProtocolListError as err:
        # Refused: a list with a port entry in error (one line per such entry), or a
        # non-empty list with no valid entry (one line per entry, then why).
        port_entries = {f"protocols[{i}]: " for i, entry in enumerate(entries)
                        if isinstance(entry, str) and "/" in entry}
        if err.message:
            assert entries and len(err.details) == len(entries)
        else:
            assert err.details and {d[:d.index(" ") + 1] for d in err.details} <= port_entries
        return
    if parsed.protocols.numbers is not None:
        assert parsed.protocols.numbers <= set(range(256))
        assert parsed.protocols.numbers
    else:
        assert not entries


@given(yaml_values)
def test_a_value_that_is_not_a_list_is_refused_by_name(value):
    if isinstance(value, list) or value is None:
        return
    with pytest.raises(ProtocolListError, match="expected a list"):
        parse_protocol_list(value)


def test_groups():
    assert numbers(["transport"]) == {6, 17, 132, 136, 33}
    assert numbers([" ICMP-all ", "tcp"]) == {1, 58, 6}
    assert parse_protocol_list(["transport", "icmp-all"]).warnings == ()


def test_group_names_do_not_shadow_protocols():
    from ovsflow.protocols import PROTOCOL_GROUPS
    assert not set(PROTOCOL_GROUPS) & set(PROTOCOL_NUMBERS)


@pytest.mark.parametrize("entry, expected", [
    ("1" * 5000, "protocols[1]: ignoring '1111"),  # int() refuses more than 4300 digits
    (" " + "0" * 5000 + "6 ", None),  # leading zeros: still tcp
    ("256", "protocols[1]: ignoring '256': protocol numbers are 0-255"),
    (16**5000 - 1, "protocols[1]: ignoring a 20000-bit number: protocol numbers are 0-255"),
    ("x" * 10_000, "protocols[1]: ignoring 'xxx"),
], ids=["5000 digits", "leading zeros", "256", "a 20000-bit int", "10000 letters"])
def test_huge_entries_are_warned_about_briefly(entry, expected):
    parsed = parse_protocol_list(["udp", entry])
    if expected is None:
        assert parsed.protocols.numbers == {6, 17} and parsed.warnings == ()
        return
    assert parsed.protocols.numbers == {17}
    [warning] = parsed.warnings
    assert warning.startswith(expected) and len(warning) < 400
