"""The OVS userspace datapath's conntrack: real ovs-vswitchd, pods in namespaces, the
dpctl text through our unixctl client and parser, and `ovsflow run` on top."""

import json
import re
import signal
import subprocess
import time

import pytest

from helpers import OVSFLOW, Collector, agent_config
from lab.netns import LAB, PYTHON
from lab.ovs_lab import CONNTRACK_PIPELINE, OvsLab
from ovsflow.source.ovs import UnixctlError, unixctl_text


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = OvsLab(tmp_path_factory.mktemp("ovs"))
    try:
        lab.client = lab.add_pod("10.66.0.1/24")
        lab.server = lab.add_pod("10.66.0.2/24")
        for flow in CONNTRACK_PIPELINE:
            lab.ofctl("add-flow", flow)
        yield lab
    finally:
        lab.stop()


def config(tmp_path, lab, source="auto", protocols=(), port=4739):
    return agent_config(tmp_path, port, list(protocols), conntrack={"source": source},
                        ovs={"runDir": lab.run_dir, "bridge": lab.bridge})


def tcp_exchange(lab, port: int) -> dict:
    server = lab.server.popen(PYTHON, "-u", str(LAB / "traffic.py"), "tcp-server", str(port),
                              "3000", stdout=subprocess.PIPE, text=True)
    assert "listening" in server.stdout.readline()
    client = json.loads(lab.client.traffic("tcp-client", lab.server.address, str(port),
                                           "5000", "1", "0").stdout)
    server.wait(timeout=30)
    assert client["received"] == 3000  # the bytes really crossed the bridge
    return client


@pytest.mark.parametrize("source", ["ovs", "auto"])
def test_conntrack_command_reads_the_userspace_datapath(lab, tmp_path, source):
    client = tcp_exchange(lab, 8000 + (source == "auto"))
    lab.client.traffic("udp", lab.server.address, "5353", "2", "50")
    lab.client.run("ping", "-c", "1", "-W", "1", lab.server.address)
    result = subprocess.run([OVSFLOW, "conntrack", "--config", config(tmp_path, lab, source)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    [tcp] = [e for e in entries if e["protocol"] == 6 and e["sourcePort"] == client["sport"]]
    assert (tcp["source"], tcp["destination"]) == ("10.66.0.1", "10.66.0.2")
    assert (tcp["replySource"], tcp["replyDestinationPort"]) == ("10.66.0.2", client["sport"])
    assert tcp["zone"] == 65520
    assert tcp["state"] in ("FIN_WAIT_2", "TIME_WAIT", "CLOSING", "CLOSE_WAIT", "LAST_ACK")
    assert tcp["octets"] is None and tcp["packets"] is None  # none kept: none invented
    assert any(e["protocol"] == 17 and e["destinationPort"] == 5353 for e in entries)
    assert any(e["protocol"] == 1 and e["icmpType"] == 8 for e in entries)


def test_agent_exports_userspace_connections_without_counters(lab, tmp_path):
    collector = Collector("udp://127.0.0.1:0", timeout=60)
    agent = subprocess.Popen([OVSFLOW, "run", "--config",
                              config(tmp_path, lab, "auto", ["tcp"], collector.port)],
                             stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        client = tcp_exchange(lab, 8100)
        lab.client.traffic("udp", lab.server.address, "5354", "2", "50")
        time.sleep(2)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, agent.stderr.read()
    finally:
        if agent.poll() is None:
            agent.kill()
        records = collector.stop_and_read()
    assert records and {r["protocolIdentifier"] for r in records} == {6}
    ours = [r for r in records if r["sourceTransportPort"] == client["sport"]]
    assert ours and {r["_templateId"] for r in ours} == {258}
    assert all("octetTotalCount" not in r and "packetDeltaCount" not in r for r in ours)
    assert ours[0]["destinationIPv4Address"] == "10.66.0.2"
    assert ours[0]["destinationTransportPort"] == 8100
    assert ours[-1]["tcpState"] in ("FIN_WAIT_2", "TIME_WAIT", "CLOSING", "CLOSE_WAIT")


def appctl_dump(lab, *arguments: str) -> list[str]:
    control = f"{lab.run_dir}/ovs-vswitchd.{lab.pid('ovs-vswitchd')}.ctl"
    return subprocess.run(["ovs-appctl", "-t", control, "dpctl/dump-conntrack", *arguments],
                          capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.mark.parametrize("protocols, prefixes", [
    ((), None), (["udp"], ("udp,",)), (["icmp", "tcp"], ("icmp,", "tcp,"))])
def test_count_is_what_the_listing_holds_and_what_ovs_prints(lab, tmp_path, protocols,
                                                             prefixes):
    """`--count` counts the lines of the zone's dump by protocol without parsing them: the
    same number as the connections `ovsflow conntrack` lists, and as ovs-appctl's own dump
    holds of those protocols."""
    lab.client.traffic("udp", lab.server.address, "5360", "1", "10")
    lab.client.run("ping", "-c", "1", "-W", "1", lab.server.address)
    cfg = config(tmp_path, lab, "ovs", protocols)
    listed = subprocess.run([OVSFLOW, "conntrack", "--config", cfg], capture_output=True,
                            text=True, timeout=60, check=True).stdout.splitlines()
    counted = subprocess.run([OVSFLOW, "conntrack", "--config", cfg, "--count"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    reference = [line for line in appctl_dump(lab, "zone=65520")
                 if prefixes is None or line.startswith(prefixes)]
    assert int(counted) == len(listed) == len(reference) > 0
    if protocols == ["udp"]:
        assert {json.loads(line)["protocol"] for line in listed} == {17}


def test_every_connection_carries_the_timeout_ovs_prints(lab, tmp_path):
    """Connection.timeout is the seconds left that `-s` prints; a packet refreshes it (the
    store tells a quiet connection from a busy one by it)."""
    sport = json.loads(lab.client.traffic("udp", lab.server.address, "5361", "1",
                                          "10").stdout)["sport"]
    time.sleep(2.2)
    cfg = config(tmp_path, lab, "ovs")

    def ours() -> int:
        listed = [json.loads(line) for line in subprocess.run(
            [OVSFLOW, "conntrack", "--config", cfg], capture_output=True, text=True,
            timeout=60, check=True).stdout.splitlines()]
        assert all(entry["timeout"] > 0 for entry in listed)
        [entry] = [e for e in listed if e["sourcePort"] == sport and e["protocol"] == 17]
        return entry["timeout"]

    quiet = ours()
    [line] = [text for text in appctl_dump(lab, "-s", "zone=65520")
              if f"sport={sport}," in text and text.startswith("udp,")]
    printed = int(line.split("timeout=")[1].split(",")[0])
    assert printed - 1 <= quiet <= printed + 1
    # the lab's first-packet UDP timeout is 60 s (ovs-vswitchd's default, udp_first/single)
    assert 50 < quiet < 59
    lab.client.run(PYTHON, "-c", "import socket; s = socket.socket(socket.AF_INET, "
                   f"socket.SOCK_DGRAM); s.bind(('', {sport})); "
                   f"s.sendto(b'again', ('{lab.server.address}', 5361))")
    assert ours() > quiet


def test_the_unixctl_read_gives_the_text_ovs_appctl_prints(lab):
    """Our unixctl client against ovs-appctl's, on the same ovs-vswitchd: the same lines
    (each but for the seconds left, which run down between the two dumps), and an error
    reply raised with ovs-vswitchd's own message, the one ovs-appctl prints."""
    lab.client.traffic("udp", lab.server.address, "5362", "3", "10")
    lab.client.run("ping", "-c", "1", "-W", "1", lab.server.address)
    control = f"{lab.run_dir}/ovs-vswitchd.{lab.pid('ovs-vswitchd')}.ctl"
    pieces = list(unixctl_text(control, "dpctl/dump-conntrack", "-m", "-s"))
    printed = appctl_dump(lab, "-m", "-s")
    assert pieces and all(piece.endswith("\n") for piece in pieces)
    without_timeouts = lambda lines: sorted(  # noqa: E731
        re.sub(r",timeout=\d+", "", line) for line in lines)
    assert without_timeouts("".join(pieces).splitlines()) == without_timeouts(printed)
    assert any(line.startswith("icmp,") for line in printed)

    refused = subprocess.run(["ovs-appctl", "-t", control, "dpctl/dump-conntrack",
                              "zone=none"], capture_output=True, text=True)
    assert refused.returncode != 0 and refused.stderr
    with pytest.raises(UnixctlError) as caught:
        list(unixctl_text(control, "dpctl/dump-conntrack", "zone=none"))
    # ovs-appctl prints the message, then a line of its own
    message = str(caught.value).removeprefix("dpctl/dump-conntrack: ")
    assert message.strip() and refused.stderr.startswith(message), (message, refused.stderr)
