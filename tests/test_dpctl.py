"""The dpctl/dump-conntrack text parser: the formats ct-dpif.c prints, and fuzzing."""

import ipaddress
import os
import time

import pytest
from hypothesis import given, strategies as st

from ovsflow.connection import labels_value
from ovsflow.source.dpctl import DpctlParseError, parse_dump, parse_entry

V4 = lambda text: ipaddress.ip_address(text).packed  # noqa: E731

TCP = ("tcp,orig=(src=10.98.0.1,dst=10.98.0.2,sport=35460,dport=8080),reply=(src=10.98.0.2,"
       "dst=10.98.0.1,sport=8080,dport=35460),id=0,zone=65520,status=0,timeout=29,"
       "protoinfo=(state_orig=FIN_WAIT_2,state_reply=FIN_WAIT_2,wscale_orig=10,"
       "wscale_reply=10,flags_orig=WINDOW_SCALE,flags_reply=WINDOW_SCALE)")
ICMP = ("icmp,orig=(src=10.98.0.1,dst=10.98.0.2,id=5565,type=8,code=0),reply=(src=10.98.0.2,"
        "dst=10.98.0.1,id=5565,type=0,code=0),id=0,zone=65520,status=0,timeout=28")
UDP6 = ("udp,orig=(src=fd00::1,dst=fd00::2,sport=47431,dport=5353),reply=(src=fd00::2,"
        "dst=fd00::1,sport=5353,dport=47431),id=7,zone=7,status=SEEN_REPLY|CONFIRMED,"
        "timeout=59,mark=42,labels=0xabcd")
KERNEL = ("tcp,orig=(src=10.0.0.1,dst=10.0.0.2,sport=1,dport=2,packets=5,bytes=300),"
          "reply=(src=10.0.0.2,dst=10.0.0.1,sport=2,dport=1,packets=4,bytes=200),"
          "start=2026-11-25T22:17:12.345,id=99,status=ASSURED,timeout=100,"
          "protoinfo=(state=ESTABLISHED)")
SCTP = ("sctp,orig=(src=10.0.0.1,dst=10.0.0.2),reply=(src=10.0.0.2,dst=10.0.0.1),id=0,"
        "zone=65520,status=0,timeout=10")
GENERIC = "47,orig=(src=10.0.0.1,dst=10.0.0.2),reply=(src=10.0.0.2,dst=10.0.0.1),timeout=5"


def test_tcp_entry_of_the_userspace_datapath():
    c = parse_entry(TCP)
    assert (c.protocol, c.source, c.destination) == (6, V4("10.98.0.1"), V4("10.98.0.2"))
    assert (c.source_port, c.destination_port) == (35460, 8080)
    assert (c.reply_source, c.reply_source_port, c.reply_destination_port) == (
        V4("10.98.0.2"), 8080, 35460)
    assert (c.zone, c.timeout, c.state, c.counted) == (65520, 29, "FIN_WAIT_2", False)
    assert (c.packets, c.octets, c.start_ns) == (0, 0, 0)


def test_icmp_entry():
    c = parse_entry(ICMP)
    assert (c.protocol, c.icmp_type, c.icmp_code, c.icmp_id) == (1, 8, 0, 5565)
    assert (c.source_port, c.destination_port) == (0, 0)


def test_ipv6_status_mark_labels():
    c = parse_entry(UDP6)
    assert c.source == V4("fd00::1") and len(c.reply_destination) == 16
    assert (c.zone, c.mark, c.id) == (7, 42, 7)
    assert c.status == (1 << 1) | (1 << 3)
    assert labels_value(c.labels) == 0xabcd


@pytest.fixture
def local_time_zone():
    """Set the process's local time zone (POSIX TZ) for one test, then put it back."""
    saved = os.environ.get("TZ")

    def set_zone(zone: str) -> None:
        os.environ["TZ"] = zone
        time.tzset()

    yield set_zone
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


def test_kernel_datapath_counters_and_start_time(local_time_zone):
    local_time_zone("UTC0")
    c = parse_entry(KERNEL)
    assert c.counted and (c.packets, c.octets, c.reply_packets, c.reply_octets) == (
        5, 300, 4, 200)
    assert c.start_ns == 1795645032345000000 and c.state == "ESTABLISHED"
    assert c.status == 1 << 2


def test_start_is_read_in_local_time_as_ovs_prints_it(local_time_zone):
    """ct-dpif.c formats start= with ds_put_strftime_msec(..., utc=false): vswitchd's local
    time. 22:17:12.345 on a node two hours east of UTC is 20:17:12.345 UTC."""
    local_time_zone("EET-2")
    assert parse_entry(KERNEL).start_ns == 1795645032345000000 - 2 * 3600 * 10**9
    local_time_zone("EST5")
    assert parse_entry(KERNEL).start_ns == 1795645032345000000 + 5 * 3600 * 10**9


@pytest.mark.parametrize("line, ended", [
    (TCP, False),  # FIN_WAIT_2: the other side may still send
    (TCP.replace("state_orig=FIN_WAIT_2", "state_orig=TIME_WAIT"), True),
    (TCP.replace("state_orig=FIN_WAIT_2", "state_orig=CLOSED"), True),
    (KERNEL.replace("state=ESTABLISHED", "state=CLOSE"), True),
    (UDP6, False),
    (UDP6.replace("SEEN_REPLY|CONFIRMED", "CONFIRMED|DYING"), True),
])
def test_the_parser_says_when_a_connection_ended(line, ended):
    assert parse_entry(line).ended is ended


def test_portless_and_numbered_protocols():
    assert parse_entry(SCTP).protocol == 132 and parse_entry(SCTP).source_port == 0
    assert parse_entry(GENERIC).protocol == 47


@pytest.mark.parametrize("line, fragment", [
    ("hello", "not a conntrack entry"),
    ("tcp,orig=(src=1.2.3.4,dst=1.2.3.5,sport=1,dport=2)", "missing orig=(...) or reply"),
    ("tcp,orig=(src=1.2.3.4,dst=1.2.3.5),reply=(src=x,dst=1.2.3.4)", "bad address 'x'"),
    ("tcp,orig=(src=1.2.3.4,dst=::1),reply=(src=::1,dst=1.2.3.4)", "mixed IPv4 and IPv6"),
    ("tcp,orig=(src=1.2.3.4,dst=1.2.3.5,sport=abc),reply=(src=1.2.3.5,dst=1.2.3.4)",
     "bad number sport='abc'"),
    ("tcp,orig=(src=1.2.3.4,dst=1.2.3.5,reply=(src=1.2.3.5,dst=1.2.3.4)", "orig"),
    ("quic,orig=(src=1.2.3.4,dst=1.2.3.5),reply=(src=1.2.3.5,dst=1.2.3.4)",
     "unknown protocol 'quic'"),
    ("tcp,orig=(src=1.2.3.4,dst=1.2.3.5),reply=(src=1.2.3.5,dst=1.2.3.4),status=WEIRD",
     "unknown status flag 'WEIRD'"),
    ("tcp,orig=(src=1.2.3.4),reply=(src=1.2.3.5,dst=1.2.3.4)", "without src= or dst="),
    ("tcp,orig=(src=1.2.3.4,dst=1.2.3.5),reply=(src=1.2.3.5,dst=1.2.3.4),labels=0x1"
     + "0" * 40, "labels=0x1" + "0" * 40 + " out of range (128 bits)"),
    ("tcp,orig=(src=1.2.3.4,dst=1.2.3.5,sport=70000,dport=2),reply=(src=1.2.3.5,"
     "dst=1.2.3.4)", "sport=70000 out of range (16 bits)"),
    ("tcp,orig=(src=1.2.3.4,dst=1.2.3.5,sport=-1,dport=2),reply=(src=1.2.3.5,dst=1.2.3.4)",
     "sport=-1 out of range"),
    ("icmp,orig=(src=1.2.3.4,dst=1.2.3.5,id=1,type=300,code=0),reply=(src=1.2.3.5,"
     "dst=1.2.3.4)", "type=300 out of range (8 bits)"),
    ("udp,orig=(src=1.2.3.4,dst=1.2.3.5),reply=(src=1.2.3.5,dst=1.2.3.4),zone=65536",
     "zone=65536 out of range (16 bits)"),
    ("udp,orig=(src=1.2.3.4,dst=1.2.3.5),reply=(src=1.2.3.5,dst=1.2.3.4),id=4294967296",
     "id=4294967296 out of range (32 bits)"),
    ("udp,orig=(src=1.2.3.4,dst=1.2.3.5,packets=18446744073709551616),reply=(src=1.2.3.5,"
     "dst=1.2.3.4)", "packets=18446744073709551616 out of range (64 bits)"),
    ("udp,orig=(src=1.2.3.4,dst=1.2.3.5),reply=(src=1.2.3.5,dst=1.2.3.4),"
     "start=1960-01-01T00:00:00.000", "start time '1960-01-01T00:00:00.000' before 1970"),
])
def test_bad_lines_are_named(line, fragment):
    with pytest.raises(DpctlParseError, match=fragment.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace(".", r"\.")):
        parse_entry(line)


def test_a_bad_line_costs_only_itself():
    connections, errors = parse_dump("\n".join([TCP, "garbage", ICMP, "", UDP6]))
    assert [c.protocol for c in connections] == [6, 1, 17]
    assert len(errors) == 1 and "garbage" in str(errors[0])


def test_a_10k_entry_dump():
    lines = [TCP.replace("sport=35460", f"sport={1000 + i}") for i in range(10_000)]
    connections, errors = parse_dump("\n".join(lines) + "\n")
    assert not errors and len(connections) == 10_000
    assert connections[-1].source_port == 10_999


@st.composite
def entries(draw):
    v6 = draw(st.booleans())
    address = st.ip_addresses(v=6 if v6 else 4)
    src, dst = draw(address), draw(address)
    protocol = draw(st.sampled_from(["tcp", "udp", "icmp", "sctp", "47"]))
    ports = (f",id={draw(st.integers(0, 65535))},type=8,code=0" if protocol == "icmp"
             else f",sport={draw(st.integers(0, 65535))},dport={draw(st.integers(0, 65535))}")
    line = (f"{protocol},orig=(src={src},dst={dst}{ports}),reply=(src={dst},dst={src}),"
            f"id={draw(st.integers(0, 2**32 - 1))},zone={draw(st.integers(0, 65535))},"
            f"status=0,timeout={draw(st.integers(0, 10**6))}")
    return line, src, dst


@given(entries())
def test_generated_entries_parse_back(entry):
    line, src, dst = entry
    c = parse_entry(line)
    assert (c.source, c.destination) == (src.packed, dst.packed)


@pytest.mark.fuzz
@given(st.text(max_size=300))
def test_arbitrary_text_is_accounted_for_line_by_line(text):
    """Every non-blank line is either a connection or one DpctlParseError that quotes it;
    nothing else escapes, nothing is lost."""
    connections, errors = parse_dump(text)
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(connections) + len(errors) == len(lines)
    assert all(isinstance(e, DpctlParseError) for e in errors)
    assert all(any(repr(line) in str(e) for line in lines) for e in errors)


@pytest.mark.fuzz
@given(entries(), st.integers(0, 400), st.text(max_size=5))
def test_mangled_entries_parse_to_valid_values_or_a_named_error(entry, cut, junk):
    """A mangled line either raises DpctlParseError quoting it or gives a connection whose
    values fit their fields (ports 16 bits, protocol 8, addresses 4 or 16 bytes): the
    encoder never sees an out-of-range number from this parser."""
    line = entry[0]
    mangled = line[:cut] + junk + line[cut + len(junk):]
    try:
        c = parse_entry(mangled)
    except DpctlParseError as err:
        assert repr(mangled) in str(err)
        return
    assert 0 <= c.protocol <= 255
    assert len(c.source) == len(c.destination) in (4, 16)
    assert all(0 <= value <= 65535 for value in (
        c.source_port, c.destination_port, c.reply_source_port, c.reply_destination_port,
        c.icmp_id, c.zone))
    assert 0 <= c.icmp_type <= 255 and 0 <= c.icmp_code <= 255
    assert all(0 <= value < 1 << 32 for value in (c.id, c.mark, c.timeout, c.status))


@pytest.mark.parametrize("line", [
    "¹,", "¹,orig=(src=1.2.3.4,dst=1.2.3.5),reply=(src=1.2.3.5,dst=1.2.3.4)",
    "tcp,orig=(src=1.2.3.4,dst=1.2.3.5),reply=(src=1.2.3.5,dst=1.2.3.4),status=²"])
def test_unicode_digits_are_not_numbers(line):
    """Found by the 100k fuzz run: str.isdigit() accepts '¹', int() does not."""
    with pytest.raises(DpctlParseError):
        parse_entry(line)
