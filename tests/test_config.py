import socket
import ssl
import textwrap
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from hypothesis import given, strategies as st

from ovsflow.config import (
    CollectorAddress, Config, ConfigError, client_tls_context, format_duration, load_config,
    parse_collector_address, parse_config, parse_duration,
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
    assert config.conntrack.zones == {65520, 65510} and config.conntrack.source == "auto"
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
    # Antrea's grammar: PORT and PROTO may be left out (4739, tls), PORT alone left empty
    ("10.0.0.5", CollectorAddress("10.0.0.5", 4739, "tls")),
    ("10.0.0.5::udp", CollectorAddress("10.0.0.5", 4739, "udp")),
    ("collector.example:4740", CollectorAddress("collector.example", 4740, "tls")),
    ("[fd00::5]", CollectorAddress("fd00::5", 4739, "tls")),
    ("[fd00::5]::tcp", CollectorAddress("fd00::5", 4739, "tcp")),
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
    ("999.1.1.1:4739:udp", "not an IP address"), ("[::1]4739", "closing ']'"),
    ("10.0.0.5::sctp", "transport 'sctp'"), ("[::1]:1:udp:x", "HOST[:PORT][:PROTO]"),
    ("", "HOST[:PORT][:PROTO]"),
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
                               "name (names are IANA keywords such as tcp, udp, icmp), "
                               "PROTO/PORT entry (tcp/443) or group (transport, icmp-all, web, "
                               "dns, ssh, ntp, mail)")


def test_default_config_equals_parsed_empty():
    assert parse_config({}) == Config()


def test_ipfix_section(monkeypatch):
    monkeypatch.setenv("NODE_NAME", "node-7")
    config = parse_config({"ipfix": {"templateRefreshTimeout": "1m", "pathMTU": 9000,
                                     "maxBufferedRecords": 10,
                                     "tls": {"caFile": "/ca.pem", "serverName": "collector"}}})
    ipfix = config.ipfix
    assert ipfix.node_name == "node-7"
    # CRC-32 (IEEE) of b"node-7", as gzip computes it: printf node-7 | gzip | tail -c8
    assert ipfix.observation_domain_id == 4203854186
    assert parse_config({"ipfix": {"nodeName": "node-8"}}).ipfix.observation_domain_id == \
        zlib.crc32(b"node-8")
    assert (ipfix.template_refresh, ipfix.path_mtu, ipfix.max_buffered_records) == (60, 9000, 10)
    assert (ipfix.tls.ca_file, ipfix.tls.server_name, ipfix.tls.cert_file) == (
        "/ca.pem", "collector", None)
    assert parse_config({"ipfix": {"observationDomainId": 5}}).ipfix.observation_domain_id == 5


@pytest.mark.parametrize("data, key", [
    ({"ipfix": {"pathMTU": 100}}, "ipfix.pathMTU: expected a whole number from 576"),
    ({"ipfix": {"observationDomainId": -1}}, "ipfix.observationDomainId:"),
    ({"flowExporter": {"flowCollectorAddr": "c:1:tls"}, "ipfix": {"tls": {"keyFile": "/k.pem"}}},
     "ipfix.tls.keyFile: set, but certFile is not"),
    ({"ipfix": {"tls": {"cafile": "/ca.pem"}}}, "ipfix.tls.cafile: unknown key (did you mean "
                                                "'caFile'?)"),
])
def test_bad_ipfix_values(data, key):
    [problem] = problems_of(data)
    assert problem.startswith(key)


# --- any file: the only exception out of load_config is ConfigError, one line per problem

def load_problems(tmp_path, text):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert all("\n" not in problem for problem in caught.value.problems)
    return caught.value.problems


@pytest.mark.parametrize("text, fragments", [
    ("? [a, b]\n: 1\n", ["a list as a key", "line 1"]),
    ("flowExporter:\n  ? {x: 1}\n  : 1\n", ["a dict as a key", "line 2"]),
    ("flowExporter:\n  protocols: [" + "1" * 5000 + "]\n",
     ["cannot read '111", "4300 digits", "line 2"]),
    ("flowExporter:\n  flowPollInterval: 2001-13-45\n", ["'2001-13-45'", "month", "line 2"]),
    ("flowExporter:\n  protocols: [" + "[" * 5000 + "]" * 5000 + "]\n", ["nesting depth"]),
])
def test_yaml_that_pyyaml_cannot_construct_is_a_config_error(tmp_path, text, fragments):
    [problem] = load_problems(tmp_path, text)
    assert problem.startswith(str(tmp_path / "ovsflow.yaml") + ": not valid YAML: ")
    for fragment in fragments:
        assert fragment in problem


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "ovsflow.yaml"
    path.write_bytes(b"flowExporter:\n  enable: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8 text: invalid start byte"):
        load_config(str(path))


@pytest.mark.parametrize("text, expected", [
    # int() refuses strings of more than 4300 digits
    ("flowExporter:\n  protocols: ['" + "1" * 5000 + "']\n",
     "flowExporter.protocols[0]: ignoring '11111"),
    # hexadecimal escapes that limit, and repr() of the value does not
    ("flowExporter:\n  protocols: [0x" + "f" * 5000 + "]\n",
     "flowExporter.protocols[0]: ignoring a 20000-bit number: protocol numbers are 0-255"),
    ("ipfix:\n  observationDomainId: 0x" + "f" * 5000 + "\n",
     "ipfix.observationDomainId: expected a whole number from 0 to 4294967295, got a "
     "20000-bit number"),
    ("flowExporter:\n  flowCollectorAddr: 'h:" + "1" * 5000 + ":udp'\n",
     "is not a number from 1 to 65535"),
    ("flowExporter:\n  flowPollInterval: '" + "9" * 400 + "s'\n",
     "flowExporter.flowPollInterval: duration '999"),
    ("0x" + "f" * 1000 + ": 1\n", ": unknown key; known keys: flowExporter"),
])
def test_absurd_numbers_are_errors_naming_the_key(tmp_path, text, expected):
    problems = load_problems(tmp_path, text)
    assert any(expected in problem for problem in problems), problems
    assert all(len(problem) < 500 for problem in problems)


def test_an_alias_bomb_is_quoted_briefly(tmp_path):
    lines = ['l0: &l0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    problems = load_problems(tmp_path, "\n".join(lines) + "\nflowExporter:\n  protocols: *l9\n")
    assert "flowExporter.protocols[0]: ignoring [[[...]" in problems[0]
    assert all(len(problem) < 500 for problem in problems)


def test_a_merge_key_merges_and_may_be_overridden(tmp_path):
    config = load_config(write(tmp_path, """\
        flowExporter:
          <<: {flowPollInterval: 1s, protocols: [udp]}
          protocols: [tcp]
        """))
    assert config.flow_exporter.poll_interval == 1.0
    assert config.flow_exporter.protocols.numbers == {6}


@pytest.mark.parametrize("value, expected", [
    ("1" * 300 + "s", "longer than Go's longest"),
    ("1" * 3000, "invalid duration"),  # no unit: used to backtrack for minutes
    ("٥s", "invalid duration"),  # an Arabic-Indic digit: Go reads ASCII digits only
    ("2562048h", "longer than Go's longest"),
])
def test_durations_out_of_go_range(value, expected):
    with pytest.raises(ValueError, match=expected):
        parse_duration(value)


def test_longest_go_duration_is_accepted():
    assert parse_duration("2562047h") == 2562047 * 3600


@pytest.mark.parametrize("host", [
    "a" * 40 + "_", "a." * 100 + "_", "-a.example", "a-.example", "a" * 64 + ".example",
    "a..example", "x" * 254,
])
def test_bad_host_names(host):
    with pytest.raises(ValueError, match="not an IP address or host name"):
        parse_collector_address(f"{host}:4739:udp")


@pytest.mark.parametrize("host", ["a" * 63 + ".example", "collector.example.", "a", "1a.b-c"])
def test_good_host_names(host):
    assert parse_collector_address(f"{host}:4739:udp").host == host


@pytest.mark.fuzz
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from(["tcp", "5s", "1.2.3.4:1:udp", "1" * 5000, 16**1000, "a" * 40 + "_"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["flowExporter", "conntrack", "ovs", "ipfix", "metrics", "tls",
                         "protocols", "zones", "flowCollectorAddr", "flowPollInterval",
                         "bridge", "bindAddress", "nodeName", "source", "denyTable",
                         "caFile", "serverName", "pathMTU"]) | st.text(max_size=5)
        | st.integers(), children, max_size=4),
    max_leaves=20))
def test_any_document_loads_or_raises_config_error(document):
    try:
        config = parse_config(document)
    except ConfigError as err:
        assert err.problems and all("\n" not in p for p in err.problems)
    else:
        assert isinstance(config, Config)
        assert all("\n" not in w for w in config.warnings)


# --- ipfix.tls: with a tls collector the files are opened and a TLS context is built

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a collector certificate and a client certificate from it, and bad files."""
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    collector = ca.issue_cert("collector.example")
    client = ca.issue_cert("node-1")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(directory / "client.pem"))
    client.private_key_pem.write_to_path(str(directory / "client.key"))
    trustme.CA().issue_cert("other").private_key_pem.write_to_path(str(directory / "other.key"))
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), None)
    (directory / "encrypted.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    (directory / "junk.pem").write_text("not PEM\n")
    return ca, collector, directory


def tls_config(transport="tls", **tls):
    return {"flowExporter": {"flowCollectorAddr": f"collector.example:4739:{transport}"},
            "ipfix": {"tls": tls}}


def test_tls_files_load_and_the_context_completes_a_mutual_handshake(pki):
    ca, collector, d = pki
    config = parse_config(tls_config(caFile=str(d / "ca.pem"), certFile=str(d / "client.pem"),
                                     keyFile=str(d / "client.key")))
    assert config.warnings == ()
    client_context = client_tls_context(config.ipfix.tls)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    collector.configure_cert(server_context)
    ca.configure_trust(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    client_socket, server_socket = socket.socketpair()
    with client_socket, server_socket, ThreadPoolExecutor(1) as pool:
        server = pool.submit(lambda: server_context.wrap_socket(server_socket, server_side=True))
        client = client_context.wrap_socket(client_socket, server_hostname="collector.example")
        client_saw = client.getpeercert()
        server_saw = server.result(timeout=10).getpeercert()
    assert ("DNS", "collector.example") in client_saw["subjectAltName"]
    assert ("DNS", "node-1") in server_saw["subjectAltName"]


@pytest.mark.parametrize("tls, expected", [
    ({"caFile": "absent.pem"}, "ipfix.tls.caFile: cannot read '{d}/absent.pem': No such file"),
    ({"caFile": ""}, None),  # "": the system's CAs
    ({"caFile": "."}, "ipfix.tls.caFile: cannot read '{d}': Is a directory"),
    ({"caFile": "junk.pem"}, "ipfix.tls.caFile: '{d}/junk.pem' holds no PEM CA certificate"),
    ({"certFile": "client.pem", "keyFile": "absent.key"},
     "ipfix.tls.keyFile: cannot read '{d}/absent.key'"),
    ({"certFile": "client.pem", "keyFile": "other.key"},
     "ipfix.tls.certFile, keyFile: cannot load '{d}/client.pem' with '{d}/other.key': the key "
     "does not belong to the certificate"),
    ({"certFile": "junk.pem", "keyFile": "client.key"},
     "ipfix.tls.certFile, keyFile: cannot load '{d}/junk.pem' with '{d}/client.key': expected "
     "a PEM certificate"),
    ({"certFile": "client.pem"}, "ipfix.tls.certFile: cannot load '{d}/client.pem' with "
     "'{d}/client.pem': expected"),  # no key in it
    ({"certFile": "client.pem", "keyFile": "encrypted.key"},
     "ipfix.tls.keyFile: the private key is encrypted"),
    ({"keyFile": "client.key"}, "ipfix.tls.keyFile: set, but certFile is not"),
    ({"serverName": "bad name"}, "ipfix.tls.serverName: 'bad name' is not a host name"),
    ({"serverName": "fd00::1"}, None),
])
def test_tls_problems_name_the_key_and_the_file(pki, tls, expected):
    d = pki[2]
    tls = {key: str(d / value) if key.endswith("File") and value else value
           for key, value in tls.items()}
    if expected is None:
        assert parse_config(tls_config(**tls)).warnings == ()
        return
    [problem] = problems_of(tls_config(**tls))
    assert problem.startswith(expected.format(d=d)), problem


def test_tls_settings_with_udp_or_tcp_are_ignored_with_one_warning(pki):
    for transport in ("udp", "tcp"):
        config = parse_config(tls_config(transport, caFile="/absent.pem", serverName="bad name",
                                         insecureSkipVerify=False))
        assert config.warnings == (
            f"ipfix.tls: caFile, serverName ignored: flowExporter.flowCollectorAddr "
            f"collector.example:4739:{transport} is {transport}, not tls",)


def test_insecure_skip_verify_with_tls_is_a_warning_and_verifies_nothing():
    config = parse_config(tls_config(insecureSkipVerify=True))
    assert config.warnings == ("ipfix.tls.insecureSkipVerify: true: the collector's "
                               "certificate is NOT verified",)
    context = client_tls_context(config.ipfix.tls)
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_NONE, False)


def test_cluster_pod_cidrs_are_read_and_normalised():
    config = parse_config({"ipfix": {"clusterPodCIDRs": ["10.60.0.0/25", " fd00:10::/48 "]}})
    assert [str(n) for n in config.ipfix.cluster_pod_cidrs] == ["10.60.0.0/25", "fd00:10::/48"]
    assert parse_config({}).ipfix.cluster_pod_cidrs == ()


@pytest.mark.parametrize("value, fragment", [
    (["10.60.0.1/25"], "'10.60.0.1/25' is not a CIDR"),  # host bits set
    (["10.60.0.0/33"], "'10.60.0.0/33' is not a CIDR"),
    ([7], "entry 0: expected a CIDR, got 7"),
    ("10.0.0.0/8", "expected a list of CIDRs"),
])
def test_bad_cluster_pod_cidrs_name_the_key_and_value(value, fragment):
    [problem] = problems_of({"ipfix": {"clusterPodCIDRs": value}})
    assert problem.startswith("ipfix.clusterPodCIDRs: ") and fragment in problem, problem


def test_several_collectors_each_with_its_own_settings(pki):
    ca = str(pki[2] / "ca.pem")
    config = parse_config({"ipfix": {
        "maxBufferedRecords": 7000, "tls": {"caFile": ca},
        "collectors": ["10.0.0.1:4739:udp",
                       {"address": "flows.example:4740:tls", "maxBufferedRecords": 50},
                       {"address": "[fd00::9]:4741:tls",
                        "tls": {"caFile": ca, "serverName": "collector.example"}}]}})
    first, second, third = config.collectors
    assert (str(first.address), first.max_buffered_records) == ("10.0.0.1:4739:udp", 7000)
    assert (second.tls.ca_file, second.max_buffered_records) == (ca, 50)
    assert (third.tls.server_name, third.max_buffered_records) == ("collector.example", 7000)
    effective = config.to_dict()
    assert "flowCollectorAddr" not in effective["flowExporter"]
    assert [c["address"] for c in effective["ipfix"]["collectors"]] == [
        "10.0.0.1:4739:udp", "flows.example:4740:tls", "[fd00::9]:4741:tls"]
    del effective["flowExporter"]["protocols"]  # "all": the parser takes a list or nothing
    again = parse_config(effective).to_dict()
    assert again["flowExporter"].pop("protocols") == "all" and again == effective


def test_without_a_list_antreas_one_collector_is_the_list():
    config = parse_config({"flowExporter": {"flowCollectorAddr": "10.0.0.5:4739:tcp"},
                           "ipfix": {"maxBufferedRecords": 9}})
    [only] = config.collectors
    assert (str(only.address), only.max_buffered_records) == ("10.0.0.5:4739:tcp", 9)


@pytest.mark.parametrize("collectors, expected", [
    ("10.0.0.1:4739:udp", "ipfix.collectors: expected a list"),
    (["10.0.0.1:4739:udp", "10.0.0.1:4739:udp"], "ipfix.collectors[1]: 10.0.0.1:4739:udp is "
                                                 "listed twice"),
    (["10.0.0.1:99999:udp"], "ipfix.collectors[0]: "),
    ([{"adress": "10.0.0.1:4739:udp"}], "ipfix.collectors[0].adress: unknown key (did you "
                                        "mean 'address'?)"),
    ([{"tls": {}}], "ipfix.collectors[0].address: missing"),
    ([{"address": "h:1:tls", "tls": {"caFile": "/nonexistent"}}],
     "ipfix.collectors[0].tls.caFile: cannot read '/nonexistent'"),
    ([{"address": "h:1:udp", "maxBufferedRecords": 0}],
     "ipfix.collectors[0].maxBufferedRecords: "),
])
def test_bad_collector_lists_name_the_entry(collectors, expected):
    problems = problems_of({"ipfix": {"collectors": collectors}})
    assert any(problem.startswith(expected) for problem in problems), problems


def test_a_collector_list_and_flow_collector_addr_together_are_an_error():
    problems = problems_of({"flowExporter": {"flowCollectorAddr": "10.0.0.1:4739:udp"},
                            "ipfix": {"collectors": ["10.0.0.2:4739:udp"]}})
    assert problems == ["ipfix.collectors: set, and so is flowExporter.flowCollectorAddr: "
                        "list every collector in one of them"]


def test_the_heartbeat_is_none_by_default_and_at_least_the_active_timeout():
    """flowExporter.heartbeatFlowExportTimeout: a record at least this often for every live
    connection. None by default (a record that says nothing new is not sent); shorter than
    the active timeout it would send unchanged connections more records than changing ones:
    an error that names both keys."""
    assert parse_config({}).flow_exporter.heartbeat_timeout == 0.0
    assert parse_config({}).to_dict()["flowExporter"]["heartbeatFlowExportTimeout"] == "0s"
    for zero in ("0s", "0", "0ms", " 0 "):
        fe = {"heartbeatFlowExportTimeout": zero}
        assert parse_config({"flowExporter": fe}).flow_exporter.heartbeat_timeout == 0.0
    config = parse_config({"flowExporter": {"heartbeatFlowExportTimeout": "5m"}})
    assert config.flow_exporter.heartbeat_timeout == 300.0
    assert config.to_dict()["flowExporter"]["heartbeatFlowExportTimeout"] == "5m0s"
    [problem] = problems_of({"flowExporter": {"activeFlowExportTimeout": "1m",
                                              "heartbeatFlowExportTimeout": "30s"}})
    assert problem.startswith("flowExporter.heartbeatFlowExportTimeout: '30s' is shorter "
                              "than activeFlowExportTimeout (1m0s)")
    for bad, fragment in (("-1s", "invalid duration '-1s'"), (30, "add a unit"),
                          ("soon", "invalid duration 'soon'")):
        [problem] = problems_of({"flowExporter": {"heartbeatFlowExportTimeout": bad}})
        assert problem.startswith("flowExporter.heartbeatFlowExportTimeout: ") and \
            fragment in problem
