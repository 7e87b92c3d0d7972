import textwrap

import pytest
from hypothesis import given, strategies as st

from ovsflow.config import (
    CollectorAddress, Config, ConfigError, format_duration, load_config, parse_collector_address,
    parse_config, parse_duration,
)


def problems_of(data):
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def test_empty_document_gives_antrea_defaults():
    config = parse_config(None)
    fe = config.flow_exporter
    assert (fe.poll_interval, fe.active_timeout, fe.idle_timeout) == (5.0, 5.0, 15.0)
    assert fe.collector == CollectorAddress("127.0.0.1", 4739, "udp")
    assert fe.protocols.exports_all
    assert config.conntrack.zones == {65520} and config.conntrack.source == "auto"
    assert config.ovs.deny_table == 250 and config.ovs.bridge == "br-int"


def test_config_is_immutable():
    config = parse_config({})
    with pytest.raises(AttributeError):
        config.flow_exporter.poll_interval = 1  # type: ignore[misc]


def test_full_section_is_read():
    config = parse_config({
        "flowExporter": {"enable": False, "flowCollectorAddr": "[fd00::1]:9995:tcp",
                         "flowPollInterval": "500ms", "activeFlowExportTimeout": "1m30s",
                         "idleFlowExportTimeout": "2h", "protocolFilter": ["TCP", 1]},
        "conntrack": {"source": "kernel", "zones": []},
        "ovs": {"runDir": "/tmp/ovs", "bridge": "br0", "denyTable": 90},
    })
    fe = config.flow_exporter
    assert fe.enable is False
    assert fe.collector == CollectorAddress("fd00::1", 9995, "tcp")
    assert (fe.poll_interval, fe.active_timeout, fe.idle_timeout) == (0.5, 90.0, 7200.0)
    assert fe.protocols.numbers == {1, 6}
    assert config.conntrack == type(config.conntrack)("kernel", frozenset())
    assert (config.ovs.run_dir, config.ovs.bridge, config.ovs.deny_table) == ("/tmp/ovs", "br0", 90)


@pytest.mark.parametrize("text, seconds", [
    ("5s", 5.0), ("500ms", 0.5), ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5),
    ("100us", 1e-4), ("2h45m", 9900.0), (" 5s ", 5.0),
])
def test_go_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("value, fragment", [
    ("5", "invalid duration '5'"), ("5 s", "invalid duration"), ("5sec", "invalid duration"),
    ("", "invalid duration"), ("0s", "greater than zero"), ("-5s", "invalid duration"),
    (5, "add a unit"), (True, "got true"), (None, "got null"), ("s", "invalid duration"),
])
def test_bad_durations(value, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_duration(value)


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (0.5, "500ms"), (90, "1m30s"),
                                           (3600, "1h0m0s"), (600, "10m0s"), (1.5, "1.5s")])
def test_duration_formatting_matches_go(seconds, text):
    assert format_duration(seconds) == text


@given(st.integers(min_value=1, max_value=10**7))
def test_duration_format_round_trips(milliseconds):
    seconds = milliseconds / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("text, address", [
    ("127.0.0.1:4739:udp", CollectorAddress("127.0.0.1", 4739, "udp")),
    ("collector.example:4739:TCP", CollectorAddress("collector.example", 4739, "tcp")),
    ("[::1]:4739:tls", CollectorAddress("::1", 4739, "tls")),
    ("10.0.0.1:4739", CollectorAddress("10.0.0.1", 4739, "tls")),
])
def test_collector_addresses(text, address):
    assert parse_collector_address(text) == address
    assert parse_collector_address(str(address)) == address


@pytest.mark.parametrize("text, fragment", [
    ("127.0.0.1:0:udp", "port '0'"), ("127.0.0.1:65536:udp", "port '65536'"),
    ("127.0.0.1:x:udp", "port 'x'"), ("127.0.0.1:4739:sctp", "transport 'sctp'"),
    ("::1:4739:udp", "IPv6 host in brackets"), ("[::1:4739:udp", "closing ']'"),
    ("[nope]:4739:udp", "not an IPv6 address"), ("bad_host:4739:udp", "not an IP address"),
    ("flow-aggregator/flow-aggregator:4739:tls", "not an IP address or host name"),
    ("999.1.1.1:4739:udp", "not an IP address"), ("127.0.0.1", "HOST:PORT:PROTO"),
])
def test_bad_collector_addresses(text, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_collector_address(text)


@pytest.mark.parametrize("data, key, value", [
    ({"flowExporter": {"flowPollInterval": "5 seconds"}}, "flowExporter.flowPollInterval",
     "'5 seconds'"),
    ({"flowExporter": {"flowCollectorAddr": "host:99999:udp"}}, "flowExporter.flowCollectorAddr",
     "'99999'"),
    ({"flowExporter": {"enable": "yes please"}}, "flowExporter.enable", "'yes please'"),
    ({"conntrack": {"source": "netlink"}}, "conntrack.source", "'netlink'"),
    ({"conntrack": {"zones": [65520, 70000]}}, "conntrack.zones", "70000"),
    ({"conntrack": {"zones": 65520}}, "conntrack.zones", "65520"),
    ({"ovs": {"denyTable": 255}}, "ovs.denyTable", "255"),
    ({"ovs": {"bridge": 7}}, "ovs.bridge", "7"),
    ({"ovs": "br-int"}, "ovs", "'br-int'"),
])
def test_each_bad_value_names_key_and_value(data, key, value):
    [problem] = problems_of(data)
    assert problem.startswith(key + ":") and value in problem


def test_unknown_keys_are_named_with_a_suggestion():
    problems = problems_of({"flowExporter": {"flowPolInterval": "5s"}, "conntrak": {}})
    assert any(p.startswith("flowExporter.flowPolInterval: unknown key")
               and "did you mean 'flowPollInterval'" in p for p in problems)
    assert any(p.startswith("conntrak: unknown key") and "'conntrack'" in p for p in problems)


def test_every_problem_is_reported_at_once():
    problems = problems_of({"flowExporter": {"flowPollInterval": "x", "idleFlowExportTimeout": 3,
                                             "protocols": [True]},
                            "ovs": {"denyTable": -1}})
    assert len(problems) == 5  # the bad entry, the all-invalid list, 2 durations, the table


def test_both_protocol_keys_is_an_error():
    [problem] = problems_of({"flowExporter": {"protocols": ["tcp"], "protocolFilter": ["udp"]}})
    assert "both 'protocols' and 'protocolFilter'" in problem


def test_partly_invalid_protocols_load_with_warnings():
    config = parse_config({"flowExporter": {"protocols": ["tcp", "yes", True, 300]}})
    assert config.flow_exporter.protocols.numbers == {6}
    assert len(config.warnings) == 3


def test_to_dict_round_trips_through_the_parser():
    config = parse_config({"flowExporter": {"protocols": ["udp", "tcp"],
                                            "flowCollectorAddr": "[::1]:1:tcp"},
                           "conntrack": {"zones": [2, 1]}})
    effective = config.to_dict()
    assert effective["flowExporter"]["protocols"] == [6, 17]
    assert effective["conntrack"]["zones"] == [1, 2]
    assert parse_config(effective).to_dict() == effective


def test_to_dict_says_all():
    assert parse_config({}).to_dict()["flowExporter"]["protocols"] == "all"


def write(tmp_path, text):
    path = tmp_path / "ovsflow.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = write(tmp_path, "flowExporter:\n  protocols: [tcp\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert path in caught.value.problems[0] and "line" in caught.value.problems[0]


def test_a_key_given_twice_is_an_error(tmp_path):
    path = write(tmp_path, """\
        flowExporter:
          protocols: [tcp]
          protocols: [udp]
        """)
    with pytest.raises(ConfigError, match="'protocols' is given twice"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.yaml"))


def test_yaml_booleans_in_the_protocol_list(tmp_path):
    path = write(tmp_path, """\
        flowExporter:
          protocols: [tcp, yes, "on", udp]
        """)
    config = load_config(path)
    assert config.flow_exporter.protocols.numbers == {6, 17}
    assert config.warnings == ("flowExporter.protocols[1]: ignoring true: a boolean (YAML reads "
                               "yes/no/on/off as booleans; quote the name)",
                               "flowExporter.protocols[2]: ignoring 'on': not a known protocol "
                               "name (names are IANA keywords such as tcp, udp, icmp, or a "
                               "group: transport, icmp-all)")


def test_default_config_equals_parsed_empty():
    assert parse_config({}) == Config()


def test_ipfix_section(monkeypatch):
    monkeypatch.setenv("NODE_NAME", "node-7")
    config = parse_config({"ipfix": {"templateRefreshTimeout": "1m", "pathMTU": 9000,
                                     "maxBufferedRecords": 10,
                                     "tls": {"caFile": "/ca.pem", "serverName": "collector"}}})
    ipfix = config.ipfix
    assert ipfix.node_name == "node-7"
    assert ipfix.observation_domain_id == parse_config({}).ipfix.observation_domain_id
    assert ipfix.observation_domain_id != parse_config(
        {"ipfix": {"nodeName": "node-8"}}).ipfix.observation_domain_id
    assert (ipfix.template_refresh, ipfix.path_mtu, ipfix.max_buffered_records) == (60, 9000, 10)
    assert (ipfix.tls.ca_file, ipfix.tls.server_name, ipfix.tls.cert_file) == (
        "/ca.pem", "collector", None)
    assert parse_config({"ipfix": {"observationDomainId": 5}}).ipfix.observation_domain_id == 5


@pytest.mark.parametrize("data, key", [
    ({"ipfix": {"pathMTU": 100}}, "ipfix.pathMTU: expected a whole number from 576"),
    ({"ipfix": {"observationDomainId": -1}}, "ipfix.observationDomainId:"),
    ({"ipfix": {"tls": {"keyFile": "/k.pem"}}}, "ipfix.tls.keyFile:"),
    ({"ipfix": {"tls": {"cafile": "/ca.pem"}}}, "ipfix.tls.cafile: unknown key (did you mean "
                                                "'caFile'?)"),
])
def test_bad_ipfix_values(data, key):
    [problem] = problems_of(data)
    assert problem.startswith(key)
