"""The dpctl parser's fast path (`common_layout_parser`, what `parse_dump` tries first) held
to the general parser (`parse_entry`, the parser of every layout, unchanged from before the
fast path): on real dumps of ovs-vswitchd (tests/data/dpctl_*.txt, written by
tests/data/make_dpctl_dumps.py), on generated entries in OVS's layout, and on fuzzed lines."""

import socket
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from ovsflow.connection import identity, labels_value
from ovsflow.source.dpctl import (
    DpctlParseError, common_layout_parser, count_entries, parse_dump, parse_entry,
    parse_pieces, pieces,
)

DATA = Path(__file__).parent / "data"
DUMPS = sorted(DATA.glob("dpctl_*.txt"))
REAL_LINES = [line for dump in DUMPS for line in dump.read_text().splitlines()]
V4 = lambda text: socket.inet_pton(socket.AF_INET, text)  # noqa: E731
V6 = lambda text: socket.inet_pton(socket.AF_INET6, text)  # noqa: E731


def fast(line: str):
    """The common layout parser's connection for `line`, or None where it leaves the line to
    the general parser (or where `line` holds a line break: several lines to it, one to
    `parse_entry`; parse_dump, which splits lines first, is held to the general parser on
    those)."""
    if len(line.splitlines()) > 1:
        return None
    connections, _ = common_layout_parser(general=lambda left: None)(line)
    return connections[0] if connections else None


def general(line: str):
    try:
        return parse_entry(line)
    except DpctlParseError:
        return None


def test_the_real_dumps_hold_what_they_should():
    """The test data covers what the issue asks for: every protocol, both families, several
    zones, marks and labels (else the differential test below would prove little)."""
    assert len(DUMPS) == 2 and len(REAL_LINES) == 20
    connections = [parse_entry(line) for line in REAL_LINES]
    assert {c.protocol for c in connections} == {1, 6, 17, 47, 58, 132}
    assert {c.zone for c in connections} == {7, 65510, 65520}
    assert {len(c.source) for c in connections} == {4, 16}
    assert {c.mark for c in connections} == {0, 42, 0xFFFFFFFF}
    assert {labels_value(c.labels) for c in connections} == {
        0, 0x900000007, 0x123400000000000000000000ABCD}
    assert {c.state for c in connections if c.protocol == 6} >= {"ESTABLISHED", "FIN_WAIT_2"}
    assert all(c.timeout > 0 and not c.counted for c in connections)


@pytest.mark.parametrize("line", REAL_LINES)
def test_real_lines_take_the_fast_path_to_the_same_connection(line):
    found = fast(line)
    assert found is not None, "a line of ovs-vswitchd's own layout left to the slow path"
    assert found == parse_entry(line)
    assert found.key == identity(found.protocol, found.source, found.destination,
                                 found.source_port, found.destination_port, found.icmp_id,
                                 found.icmp_type, found.icmp_code, found.zone)


def test_a_text_of_many_lines_takes_the_fast_path_line_by_line_in_order():
    """The fast path reads a text's lines from one regular expression's matches: every line
    of both real dumps at once, with blank lines among them, gives each line's connection
    in order, none left to the general parser."""
    lines = REAL_LINES + [NAT] + REAL_LINES[::-1]
    text = "\n".join(lines[:10]) + "\n\n \n" + "\n".join(lines[10:]) + "\n"

    def nothing_left(line):
        raise AssertionError(f"left to the general parser: {line!r}")

    connections, errors = common_layout_parser(general=nothing_left)(text)
    assert errors == [] and connections == [parse_entry(line) for line in lines]


def test_a_real_dump_parses_whole_with_its_values():
    connections, errors = parse_dump((DATA / "dpctl_all.txt").read_text())
    assert not errors and len(connections) == 12
    [zone7] = [c for c in connections if c.zone == 7 and len(c.source) == 4]
    assert (zone7.protocol, zone7.destination_port, zone7.mark) == (17, 7000, 42)
    assert zone7.reply_source == V4("10.66.0.2") and zone7.reply_source_port == 7000
    assert labels_value(zone7.labels) == 0x123400000000000000000000ABCD
    [icmpv6] = [c for c in connections if c.protocol == 58]
    assert (icmpv6.icmp_type, icmpv6.icmp_code, icmpv6.zone) == (128, 0, 65510)
    assert icmpv6.source == V6("fd66::1") and icmpv6.source_port == 0
    [sctp] = [c for c in connections if c.protocol == 132]
    assert (sctp.source_port, sctp.timeout) == (0, 58)
    assert [c for c in connections if c.state == "TIME_WAIT"][0].ended


NAT = ("tcp,orig=(src=10.10.1.5,dst=10.96.0.10,sport=40000,dport=53),reply=(src=10.10.2.7,"
       "dst=10.10.1.5,sport=5353,dport=40000),id=17,zone=65520,status=SEEN_REPLY|ASSURED|"
       "CONFIRMED|DST_NAT|DST_NAT_DONE,timeout=431999,mark=3,labels=0x1,protoinfo=("
       "state_orig=ESTABLISHED,state_reply=ESTABLISHED,wscale_orig=7,wscale_reply=7,"
       "flags_orig=WINDOW_SCALE|SACK_PERM,flags_reply=WINDOW_SCALE)")


def test_a_nat_entry_on_the_fast_path():
    """Service traffic: the reply tuple is not the original's mirror (DNAT)."""
    c = fast(NAT)
    assert c == parse_entry(NAT)
    assert (c.reply_source, c.reply_source_port, c.reply_destination_port) == (
        V4("10.10.2.7"), 5353, 40000)
    assert (c.id, c.timeout, c.mark, c.state, c.ended) == (17, 431999, 3, "ESTABLISHED", False)
    assert c.status == 2 | 4 | 8 | 32 | 256  # SEEN_REPLY, ASSURED, CONFIRMED, DST_NAT(_DONE)


@pytest.mark.parametrize("line", [
    # counters and a start time (a kernel datapath's dpctl): the general parser's
    "tcp,orig=(src=10.0.0.1,dst=10.0.0.2,sport=1,dport=2,packets=5,bytes=300),reply=(src="
    "10.0.0.2,dst=10.0.0.1,sport=2,dport=1,packets=4,bytes=200),start=2026-11-25T22:17:12.345,"
    "id=99,status=ASSURED,timeout=100,protoinfo=(state=ESTABLISHED)",
    "sctp,orig=(src=10.0.0.1,dst=10.0.0.2),reply=(src=10.0.0.2,dst=10.0.0.1),id=0,status=0,"
    "timeout=10",  # no ports
    NAT.replace("sport=40000", "sport=040000"),  # a leading zero: int(, 0) refuses it
    NAT.replace("sport=40000", "sport=65536"),
    NAT.replace("timeout=431999", "timeout=4294967296"),
    NAT.replace("10.10.1.5,dst=10.96", "10.10.1.05,dst=10.96"),
    NAT.replace("dst=10.96.0.10", "dst=fd00::10"),  # mixed families
    NAT.replace("status=SEEN_REPLY", "status=WEIRD"),
    NAT.replace("wscale_orig=7", "state_orig=CLOSED"),  # the general parser takes the last
    NAT + ",helper=ftp",
    " " + NAT,
])
def test_other_layouts_and_wrong_values_are_left_to_the_general_parser(line):
    assert fast(line) is None
    connections, errors = parse_dump(line)
    assert (connections, [str(e) for e in errors]) == (
        ([parse_entry(line)], []) if general(line) else ([], [str(_error(line))]))


def _error(line: str) -> DpctlParseError:
    with pytest.raises(DpctlParseError) as caught:
        parse_entry(line)
    return caught.value


@pytest.mark.parametrize("size", [1, 100, 250, 1 << 20])
@pytest.mark.parametrize("separator", ["\n", "\r\n", "\r"])
def test_pieces_cut_at_line_ends_lose_and_repeat_nothing(size, separator):
    """The poll parses a dump a piece at a time: whatever the piece size and line ends,
    the pieces together give each line's connection once, in order."""
    lines = REAL_LINES + ["", "garbage", NAT]
    text = separator.join(lines)
    parsed = list(parse_pieces(pieces(text, size)))
    connections = [c for piece, _ in parsed for c in piece]
    errors = [str(e) for _, piece_errors in parsed for e in piece_errors]
    assert connections == [parse_entry(line) for line in lines if general(line)]
    assert len(connections) == 21 and errors == [str(_error("garbage"))]
    if size == 1 and separator == "\n":
        assert len(parsed) >= 20  # a line or two each


def test_count_entries_counts_lines_by_protocol():
    text = (DATA / "dpctl_all.txt").read_text() + "\ngarbage\n\nquic,orig=(x)\n"
    assert count_entries(text) == {17: 5, 6: 3, 1: 1, 58: 1, 132: 1, 47: 1}


NUMBER = st.integers(0, 70000).map(str) | st.sampled_from(["0", "65535", "4294967295", "07"])
ADDRESS = st.ip_addresses(v=4).map(str) | st.ip_addresses(v=6).map(str)


@st.composite
def ovs_lines(draw):
    """Lines in ovs-vswitchd's layout, with values in and out of range."""
    protocol = draw(st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "sctp", "47", "300"]))
    addresses = [draw(ADDRESS) for _ in range(2)] + [draw(ADDRESS) for _ in range(2)]
    if draw(st.booleans()):
        addresses[2:] = addresses[1::-1]  # no NAT: the reply mirrors the original
    if protocol.startswith("icmp") and draw(st.booleans()):
        parts = [f"id={draw(NUMBER)},type={draw(NUMBER)},code={draw(NUMBER)}"
                 for _ in range(2)]
    else:
        ports = [draw(NUMBER) for _ in range(4)]
        if draw(st.booleans()):
            ports[2:] = ports[1::-1]
        parts = [f"sport={ports[0]},dport={ports[1]}", f"sport={ports[2]},dport={ports[3]}"]
    line = (f"{protocol},orig=(src={addresses[0]},dst={addresses[1]},{parts[0]}),"
            f"reply=(src={addresses[2]},dst={addresses[3]},{parts[1]}),id={draw(NUMBER)}")
    if draw(st.booleans()):
        line += f",zone={draw(NUMBER)}"
    status = draw(st.sampled_from(["0", "SEEN_REPLY|CONFIRMED", "DYING", "CONFIRMED|DYING",
                                   "12", "BOGUS"]))
    line += f",status={status},timeout={draw(NUMBER)}"
    if draw(st.booleans()):
        line += f",mark={draw(NUMBER)}"
    if draw(st.booleans()):
        line += f",labels=0x{draw(st.integers(1, 2**130)):x}"
    if draw(st.booleans()):
        state = draw(st.sampled_from(["ESTABLISHED", "TIME_WAIT", "CLOSED", "SYN_SENT"]))
        line += f",protoinfo=(state_orig={state},state_reply={state},wscale_orig=7)"
    return line


@given(ovs_lines())
def test_generated_lines_in_ovs_layout_parse_as_the_general_parser_does(line):
    found, reference = fast(line), general(line)
    assert found == reference
    assert parse_dump(line)[0] == ([reference] if reference else [])


@pytest.mark.fuzz
@given(st.sampled_from(REAL_LINES + [NAT]) | ovs_lines(), st.integers(0, 400),
       st.text(max_size=6), st.booleans())
def test_mangled_lines_give_what_the_general_parser_gives(line, cut, junk, insert):
    """A mangled line gives the general parser's connection, or the general parser's named
    error; the fast path never answers differently and nothing else escapes."""
    mangled = line[:cut] + junk + line[cut + (0 if insert else len(junk)):]
    found, reference = fast(mangled), general(mangled)
    if found is not None:
        assert found == reference
    mangled = "\n".join([REAL_LINES[0], mangled, NAT])  # the line among others
    lines = [text for text in mangled.splitlines() if text.strip()]
    connections, errors = parse_dump(mangled)
    assert len(connections) + len(errors) == len(lines)
    assert all(isinstance(e, DpctlParseError) for e in errors)
    assert connections == [c for c in map(general, lines) if c is not None]
