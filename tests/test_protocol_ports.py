"""Service ports and groups in the protocol list (issue 32): `PROTO/PORT` and
`PROTO/LOW-HIGH` entries, the predefined groups, the user's `protocolGroups`, what is an
error and what a warning, and the one rule the filter, the kernel's dump plan and the deny
table's flows take from it. The layers themselves run against real conntrack and a real
Open vSwitch in tests/test_ports_end_to_end.py."""

import json
import socket

import numpy as np
import pytest
from hypothesis import given, strategies as st

from ovsflow.config import ConfigError, parse_config
from ovsflow.connection import Connection
from ovsflow.deny.rules import deny_flows, port_prefixes
from ovsflow.filter import ConnectionFilter
from ovsflow.polled import Polled, key_bytes
from ovsflow.protocols import PORT_PROTOCOLS, PROTOCOL_GROUPS
from ovsflow.protocol_list import ProtocolListError, parse_protocol_list
from ovsflow.source.kernel import MAX_EXTRA_PORT_DUMPS, Dump, KernelFilters, plan_dumps
from test_cli import config_file, ovsflow

GROUPS_KEY = "flowExporter.protocolGroups"


def parse(entries, groups=None):
    return parse_protocol_list(entries, "flowExporter.protocols", groups, GROUPS_KEY)


def ports_of(entries, groups=None):
    """protocol -> its port ranges, None for every port."""
    protocols = parse(entries, groups).protocols
    return {n: protocols.port_ranges(n) for n in sorted(protocols.numbers)}


def problems(entries, groups=None):
    with pytest.raises(ProtocolListError) as caught:
        parse(entries, groups)
    return list(caught.value.problems)


def test_web_and_dns_are_the_service_ports_the_issue_names():
    assert ports_of(["web"]) == {6: ((80, 80), (443, 443)), 17: ((443, 443),)}
    assert ports_of(["dns"]) == {6: ((53, 53),), 17: ((53, 53),)}
    assert ports_of(["web", "dns"]) == {6: ((53, 53), (80, 80), (443, 443)),
                                        17: ((53, 53), (443, 443))}


@pytest.mark.parametrize("group, expected", [
    ("ssh", {6: ((22, 22),)}), ("ntp", {17: ((123, 123),)}),
    ("mail", {6: ((25, 25), (110, 110), (143, 143), (465, 465), (587, 587), (993, 993),
                  (995, 995))}),
    ("transport", {6: None, 17: None, 33: None, 132: None, 136: None}),
    ("icmp-all", {1: None, 58: None})])
def test_the_other_predefined_groups(group, expected):
    assert ports_of([group]) == expected


def test_port_entries_ranges_numbers_case_and_spaces():
    assert ports_of([" TCP/443 ", "6/8443", "udp/30000-32767", "Sctp / 2905 ", "icmp"]) == {
        1: None, 6: ((443, 443), (8443, 8443)), 17: ((30000, 32767),), 132: ((2905, 2905),)}


def test_overlapping_and_adjacent_ranges_merge_silently():
    parsed = parse(["tcp/80", "tcp/80-80", "tcp/81-90", "tcp/85-100", "tcp/102"])
    assert parsed.protocols.port_ranges(6) == ((80, 100), (102, 102))
    assert parsed.warnings == ()


def test_a_protocol_without_a_port_means_every_port_and_a_port_entry_beside_it_warns():
    parsed = parse(["tcp/443", "tcp", "web"])
    assert ports_of(["tcp/443", "tcp", "web"]) == {6: None, 17: ((443, 443),)}
    assert parsed.warnings == (
        "flowExporter.protocols[0]: 'tcp/443' adds nothing: every port of tcp is exported "
        "already (a protocol without a port means every port)",)  # web still adds udp/443
    [warning] = parse(["transport", "dns"]).warnings
    assert warning.startswith("flowExporter.protocols[1]: 'dns' adds nothing: every port of "
                              "tcp, udp is exported already")


def test_user_groups_nest_and_are_named_like_entries():
    groups = {"db": ["tcp/5432", "tcp/3306"], "Backend": ["db", "web", "udp/9000-9010"]}
    parsed = parse([" backend ", "icmp"], groups)
    assert {n: parsed.protocols.port_ranges(n) for n in parsed.protocols.numbers} == {
        1: None, 6: ((80, 80), (443, 443), (3306, 3306), (5432, 5432)),
        17: ((443, 443), (9000, 9010))}
    assert parsed.warnings == ()
    assert parsed.groups == (("db", ("tcp/5432", "tcp/3306")),
                             ("backend", ("db", "web", "udp/9000-9010")))


def test_port_entry_errors_name_the_entry_and_the_key_all_at_once():
    assert problems(["tcp/0", "udp/65536", "tcp/443-80", "icmp/8", "gre/1", "bogus/80",
                     "tcp/http", "udp/", "tcp/1-2-3", "udp", "tcp/" + "9" * 5000]) == [
        "flowExporter.protocols[0]: 'tcp/0': port 0 is out of range: ports are 1-65535",
        "flowExporter.protocols[1]: 'udp/65536': port 65536 is out of range: ports are "
        "1-65535",
        "flowExporter.protocols[2]: 'tcp/443-80': the range is the wrong way round; write "
        "tcp/80-443",
        "flowExporter.protocols[3]: 'icmp/8': icmp has no ports (a port needs tcp, udp, sctp, "
        "dccp or udplite); write icmp for all of it",
        "flowExporter.protocols[4]: 'gre/1': gre has no ports (a port needs tcp, udp, sctp, "
        "dccp or udplite); write gre for all of it",
        "flowExporter.protocols[5]: 'bogus/80': 'bogus' is not a protocol name or number",
        "flowExporter.protocols[6]: 'tcp/http': 'http' is not a port: write PROTO/PORT or "
        "PROTO/LOW-HIGH with ports 1-65535 (a protocol alone means every port)",
        "flowExporter.protocols[7]: 'udp/': '' is not a port: write PROTO/PORT or "
        "PROTO/LOW-HIGH with ports 1-65535 (a protocol alone means every port)",
        "flowExporter.protocols[8]: 'tcp/1-2-3': '2-3' is not a port: write PROTO/PORT or "
        "PROTO/LOW-HIGH with ports 1-65535 (a protocol alone means every port)",
        "flowExporter.protocols[10]: 'tcp/" + "9" * 43 + "..." + "9" * 48 + "': port "
        "999999999999 is out of range: ports are 1-65535"]


def test_group_definition_errors_all_at_once():
    groups = {"db": ["tcp/5432", "mysqll", True], "loop": ["loop"], "a": ["b"], "b": ["c"],
              "c": ["b"], "web": ["tcp/8080"], "TCP": ["udp"], "7": ["udp"], "x y": ["udp"],
              "list": "tcp/1", "Dup": ["udp/1"], "dup": ["udp/2"], "bad": ["icmp/1"]}
    assert problems(["db", "loop", "a"], groups) == [
        "flowExporter.protocolGroups.web: 'web' is a predefined group (tcp/80, tcp/443, "
        "udp/443); give yours another name",
        "flowExporter.protocolGroups.TCP: 'TCP' is the protocol tcp (6)",
        "flowExporter.protocolGroups.7: a group name is a word of letters, digits and - _ . "
        "(not a number), got '7'",
        "flowExporter.protocolGroups.x y: a group name is a word of letters, digits and - _ . "
        "(not a number), got 'x y'",
        "flowExporter.protocolGroups.list: expected a list of entries, got 'tcp/1'",
        "flowExporter.protocolGroups.dup: 'dup' is defined twice (names ignore case and "
        "spaces)",
        "flowExporter.protocolGroups.db[1]: 'mysqll': not a known protocol name (names are "
        "IANA keywords such as tcp, udp, icmp), PROTO/PORT entry (tcp/443) or group "
        "(transport, icmp-all, web, dns, ssh, ntp, mail, db, loop, a, b, c, list, dup, bad)",
        "flowExporter.protocolGroups.db[2]: true: a boolean (YAML reads yes/no/on/off as "
        "booleans; quote the name)",
        "flowExporter.protocolGroups.loop[0]: 'loop' names its own group",
        "flowExporter.protocolGroups.c[0]: 'b' makes a cycle of groups (b -> c -> b)",
        "flowExporter.protocolGroups.bad[0]: 'icmp/1': icmp has no ports (a port needs tcp, "
        "udp, sctp, dccp or udplite); write icmp for all of it"]


def test_groups_that_are_not_a_mapping_and_lists_that_are_not_lists():
    assert problems(["udp"], ["db"]) == [
        "flowExporter.protocolGroups: expected a mapping of group names to lists of entries "
        "(e.g. {db: [tcp/5432, tcp/3306]}), got ['db']"]
    assert problems("web") == ["flowExporter.protocols: expected a list of protocol names or "
                               "numbers, PROTO/PORT entries or groups, got 'web'"]


def test_group_warnings_empty_and_unused():
    parsed = parse(["udp", "empty"], {"empty": [], "spare": ["tcp/1"]})
    assert parsed.protocols.numbers == {17}
    assert parsed.warnings == (
        "flowExporter.protocolGroups.empty: an empty group adds nothing where it is named",
        "flowExporter.protocolGroups.spare: defined but not named in flowExporter.protocols")
    # without a list, every protocol: the groups are read (their errors count) and unused
    assert parse(None, {"spare": ["tcp/1"]}).protocols.exports_all
    assert problems(None, {"spare": ["tcp/0"]})[0].startswith(
        "flowExporter.protocolGroups.spare[0]: 'tcp/0'")


def test_the_old_rules_still_hold_for_plain_entries_of_the_list():
    """An invalid plain entry is a warning and the others apply (BRIEF §2), now with a hint
    when it looks like a port; a list of only empty groups exports nothing: refused."""
    parsed = parse(["web", 443, "webb"])
    assert parsed.protocols.numbers == {6, 17}
    assert parsed.warnings[0] == ("flowExporter.protocols[1]: ignoring 443: protocol numbers "
                                  "are 0-255 (a port? write tcp/443 or udp/443)")
    assert "ignoring 'webb': not a known protocol name" in parsed.warnings[1]
    with pytest.raises(ProtocolListError, match="none of the 1 entries"):
        parse(["nothing"], {"nothing": []})


entry_texts = st.one_of(
    st.sampled_from(["tcp", "udp", "icmp", "gre", "web", "dns", "transport", "a", "b", "c"]),
    st.builds(lambda p, low, high: f"{p}/{low}{high}", st.sampled_from(
        ["tcp", "udp", "sctp", "icmp", "6", "x", ""]), st.integers(-1, 70000).map(str),
        st.one_of(st.just(""), st.integers(0, 70000).map(lambda n: f"-{n}"))),
    st.text(max_size=8), st.integers(-5, 70000), st.booleans(), st.none())


@pytest.mark.fuzz
@given(st.lists(entry_texts, max_size=8),
       st.one_of(st.none(), st.dictionaries(st.one_of(st.sampled_from(["a", "b", "c", "web"]),
                                                      st.text(max_size=5), st.integers()),
                                            st.one_of(st.lists(entry_texts, max_size=4),
                                                      entry_texts), max_size=4)))
def test_lists_and_groups_parse_or_are_refused_by_name_never_otherwise(entries, groups):
    try:
        parsed = parse(entries, groups)
    except ProtocolListError as err:
        assert err.problems and all(line.startswith("flowExporter.") for line in err.problems)
        return
    protocols = parsed.protocols
    if protocols.numbers is None:
        assert not entries and not protocols.ports
        return
    for protocol, ranges in protocols.ports:
        assert protocol in protocols.numbers and protocol in PORT_PROTOCOLS
        assert all(1 <= low <= high <= 65535 for low, high in ranges)
        assert all(high + 1 < low for (_, high), (low, _) in zip(ranges, ranges[1:]))


def test_a_protocol_named_with_a_slash_is_still_that_protocol():
    assert ports_of(["a/n"]) == {107: None}  # IANA's keyword for protocol 107


def test_group_names_collide_with_no_protocol_and_ports_only_where_conntrack_has_them():
    from ovsflow.protocols import PROTOCOL_NUMBERS
    assert not PROTOCOL_GROUPS.keys() & PROTOCOL_NUMBERS.keys()
    assert PORT_PROTOCOLS == {6, 17, 33, 132, 136}


def test_membership_and_description():
    protocols = parse(["web", "icmp", "udp/30000-32767"]).protocols
    assert 6 in protocols and 1 in protocols and 58 not in protocols
    assert protocols.accepts(6, 443) and protocols.accepts(17, 31000)
    assert not protocols.accepts(6, 8080) and not protocols.accepts(17, 80)
    assert protocols.accepts(1, 0) and not protocols.accepts(58, 0)
    assert protocols.describe() == ("icmp (1), tcp (6) ports 80,443, udp (17) ports "
                                    "443,30000-32767")


# --- the one filter, over connections and over columns

def connection(protocol, zone, port):
    return Connection(protocol, b"\1" * 4, b"\2" * 4, 1000, port, zone=zone)


CONNECTIONS = [connection(protocol, zone, port) for protocol in (1, 6, 17, 132, 47)
               for zone in (0, 7) for port in ((0,) if protocol in (1, 47) else
                                               (22, 53, 80, 443, 8080, 30001))]


@pytest.mark.parametrize("entries", [["web", "dns"], ["tcp/22", "icmp"], ["tcp"],
                                     ["udp/30000-32767", "sctp/80", "gre"], None])
def test_connections_columns_and_single_checks_agree(entries):
    f = ConnectionFilter(frozenset({7}), parse(entries).protocols)
    expected = [c for c in CONNECTIONS
                if c.zone == 7 and (entries is None or _reference(entries, c))]
    assert f.apply(CONNECTIONS) == expected
    assert [c for c in CONNECTIONS if f.accepts(c.zone, c.protocol, c.destination_port)] == \
        expected
    columns = Polled.from_connections([c._replace(key=bytes([i])) for i, c in
                                       enumerate(CONNECTIONS)])
    kept = f.apply_polled(columns)
    assert [CONNECTIONS[key[0]] for key in key_bytes(kept.keys)] == expected
    accepted = f.accepts_columns(columns.zones, columns.protocols, columns.destination_ports)
    assert accepted.tolist() == [c in expected for c in CONNECTIONS]


def _reference(entries, c) -> bool:
    """The entries' meaning, spelt out for the connections above."""
    names = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "gre": 47}
    expanded = [e for entry in entries for e in PROTOCOL_GROUPS.get(entry, (entry,))]
    for entry in expanded:
        name, _, ports = entry.partition("/")
        low, _, high = ports.partition("-")
        if names[name] == c.protocol and (not ports or int(low) <= c.destination_port
                                          <= int(high or low)):
            return True
    return False


def test_what_the_filter_drops_is_counted_per_protocol_by_port_too():
    f = ConnectionFilter(frozenset(), parse(["dns"]).protocols)
    f.apply([connection(17, 0, 53), connection(17, 0, 54), connection(6, 0, 80),
             connection(1, 0, 0)])
    assert f.rejected == {17: 1, 6: 1, 1: 1}
    assert f.accepts_packet(17, 53) and not f.accepts_packet(17, 5353)


@given(st.lists(st.tuples(st.sampled_from(sorted(PORT_PROTOCOLS)), st.integers(1, 65535),
                          st.integers(0, 300)), max_size=6),
       st.lists(st.tuples(st.sampled_from([1, 6, 17, 33, 47, 58, 132, 136]),
                          st.integers(0, 65535)), min_size=1, max_size=50))
def test_the_column_filter_is_the_single_filter(ranges, traffic):
    entries = [f"{p}/{low}-{min(low + span, 65535)}" for p, low, span in ranges] or ["icmp"]
    protocols = parse(entries).protocols
    f = ConnectionFilter(frozenset(), protocols)
    accepted = f.accepts_columns(np.zeros(len(traffic), np.uint16),
                                 np.array([p for p, _ in traffic], np.uint8),
                                 np.array([port for _, port in traffic], np.uint16))
    assert accepted.tolist() == [any(p == q and low <= port <= min(low + span, 65535)
                                     for q, low, span in ranges) or (not ranges and p == 1)
                                 for p, port in traffic]


# --- the kernel's dumps

def test_a_few_tcp_and_udp_ports_are_a_dump_each_where_the_kernel_filters_them():
    linux = KernelFilters(family=True, protocol=True, zone=False, ports=frozenset({6, 17}))
    f = ConnectionFilter(frozenset({65520, 65510}), parse(["dns", "sctp/2905"]).protocols)
    v4, v6 = socket.AF_INET, socket.AF_INET6
    assert plan_dumps(f, linux) == [
        Dump(v4, None, 6, 53), Dump(v4, None, 17, 53), Dump(v4, None, 132, None),
        Dump(v6, None, 6, 53), Dump(v6, None, 17, 53), Dump(v6, None, 132, None)]
    no_ports = KernelFilters(family=True, protocol=True, zone=False)
    assert plan_dumps(f, no_ports) == [
        Dump(family, None, protocol) for family in (v4, v6) for protocol in (6, 17, 132)]


def test_port_dumps_add_at_most_max_extra_port_dumps_walks_fewest_ports_first():
    linux = KernelFilters(family=True, protocol=True, zone=True, ports=frozenset({6, 17}))

    def ports_dumped(entries, zones=()):
        plan = plan_dumps(ConnectionFilter(frozenset(zones), parse(entries).protocols), linux)
        return sorted({(d.protocol, d.port) for d in plan}), len(plan)

    assert MAX_EXTRA_PORT_DUMPS == 6
    # 4 ports: 3 more dumps per family, 6 more walks than a dump of tcp per family
    four = [f"tcp/{port}" for port in range(1001, 1005)]
    assert ports_dumped(four) == ([(6, port) for port in range(1001, 1005)], 8)
    # 5 ports would add 8: one dump of tcp per family, the ports in userspace
    assert ports_dumped(four + ["tcp/1005"]) == ([(6, None)], 2)
    assert ports_dumped(["tcp/1-65535"]) == ([(6, None)], 2)
    # web and dns: udp (2 ports, 2 more) first, then tcp (3 ports, 4 more): 10 dumps
    assert ports_dumped(["web", "dns"]) == (
        [(6, 53), (6, 80), (6, 443), (17, 53), (17, 443)], 10)
    # in Antrea's two zones on a kernel that filters them, tcp's would add 8 more to udp's
    # 4: udp by port, tcp by protocol
    assert ports_dumped(["web", "dns"], {65520, 65510}) == (
        [(6, None), (17, 53), (17, 443)], 12)
    # one port per protocol costs no walk more: always by port, within the cap of dumps
    assert ports_dumped(["tcp/5432", "udp/53"], {65520, 65510}) == ([(6, 5432), (17, 53)], 8)


# --- the deny table

def flows(entries):
    return sorted((f.priority, tuple((x.name, x.int(), x.mask and int.from_bytes(x.mask, "big"))
                                     for x in f.match))
                  for f in deny_flows(parse(entries).protocols))


def test_deny_flows_match_the_destination_port_of_tcp_udp_and_sctp():
    ip, ip6 = ("eth_type", 0x0800, None), ("eth_type", 0x86DD, None)
    assert flows(["dns", "sctp/2904-2905", "dccp/5000", "icmp"]) == sorted([
        (0, ()),
        (200, (ip, ("ip_proto", 1, None))),
        *[(200, (eth, ("ip_proto", 6, None), ("tcp_dst", 53, None))) for eth in (ip, ip6)],
        *[(200, (eth, ("ip_proto", 17, None), ("udp_dst", 53, None))) for eth in (ip, ip6)],
        *[(200, (eth, ("ip_proto", 132, None), ("sctp_dst", 2904, 0xFFFE)))
          for eth in (ip, ip6)],
        # OpenFlow has no DCCP port: every port reaches the userspace filter
        *[(200, (eth, ("ip_proto", 33, None))) for eth in (ip, ip6)]])


@given(st.integers(1, 65535), st.integers(0, 65535))
def test_a_range_is_a_few_masked_matches_that_cover_exactly_it(low, span):
    high = min(low + span, 65535)
    prefixes = port_prefixes(low, high)
    assert len(prefixes) <= 30
    for port in {low, high, low - 1, high + 1, (low + high) // 2} - {0, 65536}:
        matched = [value for value, mask in prefixes if port & mask == value]
        assert len(matched) == (1 if low <= port <= high else 0), (port, prefixes)


# --- the configuration and check-config

def test_the_effective_configuration_keeps_protocols_as_numbers_and_adds_the_ports():
    config = parse_config({"flowExporter": {
        "protocolFilter": ["web", "db", "icmp"],
        "protocolGroups": {"DB": [" TCP/5432 ", "tcp/3306"]}}})
    effective = config.to_dict()["flowExporter"]
    assert effective["protocols"] == [1, 6, 17]
    assert effective["ports"] == {"6": [[80, 80], [443, 443], [3306, 3306], [5432, 5432]],
                                  "17": [[443, 443]]}
    assert effective["protocolGroups"] == {"db": ["tcp/5432", "tcp/3306"]}
    plain = parse_config({"flowExporter": {"protocols": ["tcp"]}}).to_dict()["flowExporter"]
    assert "ports" not in plain and plain["protocolGroups"] == {}


def test_a_file_with_errors_in_the_list_and_elsewhere_reports_them_all():
    with pytest.raises(ConfigError) as caught:
        parse_config({"flowExporter": {"protocols": ["web", "tcp/0"],
                                       "protocolGroups": {"db": ["db"]},
                                       "flowPollInterval": "5"}})
    assert caught.value.problems == [
        "flowExporter.protocols[1]: 'tcp/0': port 0 is out of range: ports are 1-65535",
        "flowExporter.protocolGroups.db[0]: 'db' names its own group",
        "flowExporter.flowPollInterval: invalid duration '5': use Go-style durations such as "
        "'500ms', '5s' or '1m30s'"]


def test_sctp_ports_with_the_ovs_source_are_a_warning():
    config = parse_config({"flowExporter": {"protocols": ["sctp/2905", "tcp/80"]},
                           "conntrack": {"source": "ovs"}})
    assert config.warnings == (
        "flowExporter.protocols: sctp ports match denied packets only: the OVS userspace "
        "datapath's conntrack (conntrack.source: ovs) tracks SCTP without ports",)
    assert parse_config({"flowExporter": {"protocols": ["sctp/2905"]},
                         "conntrack": {"source": "kernel"}}).warnings == ()


def test_check_config_prints_the_effective_list(tmp_path):
    path = config_file(tmp_path, "flowExporter:\n  protocols: [web, dns, db, icmp]\n"
                                 "  protocolGroups:\n    db: [tcp/5432, tcp/3306]\n")
    result = ovsflow("check-config", path, "--json")
    assert result.returncode == 0 and result.stderr == ""
    effective = json.loads(result.stdout)["flowExporter"]
    assert (effective["protocols"], effective["ports"]) == (
        [1, 6, 17], {"6": [[53, 53], [80, 80], [443, 443], [3306, 3306], [5432, 5432]],
                     "17": [[53, 53], [443, 443]]})
    human = ovsflow("check-config", path)
    assert ("  protocols: icmp (1), tcp (6) ports 53,80,443,3306,5432, udp (17) ports 53,443"
            in human.stdout.splitlines())


def test_check_config_refuses_a_bad_port_with_one_line_per_problem(tmp_path):
    path = config_file(tmp_path, "flowExporter:\n  protocols: [web, udp/99999, icmp/3]\n")
    result = ovsflow("check-config", path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: flowExporter.protocols[1]: 'udp/99999': port 99999 is out of range: ports are "
        "1-65535",
        "error: flowExporter.protocols[2]: 'icmp/3': icmp has no ports (a port needs tcp, udp, "
        "sctp, dccp or udplite); write icmp for all of it",
        f"error: {path}: the agent would refuse to start"]


def test_the_example_file_parses_and_its_commented_groups_too(tmp_path):
    """examples/ovsflow.yaml shows groups in comments: uncommented, they load."""
    from test_cli import EXAMPLE
    text = EXAMPLE.read_text()
    shown = [line.strip().lstrip("#").strip() for line in text.splitlines()
             if line.strip().startswith("#   protocol")]
    assert shown, "the example shows no group"
    path = config_file(tmp_path, "flowExporter:\n" + "".join(f"  {line}\n" for line in shown))
    result = ovsflow("check-config", path, "--json")
    assert result.returncode == 0, result.stderr
    assert "ports" in json.loads(result.stdout)["flowExporter"]
