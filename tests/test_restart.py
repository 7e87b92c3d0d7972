"""Every connection once, every byte once, through what every node goes through: rolling
restarts (SIGTERM, a new agent a second later), a SIGKILL, a bad state file, tuples reused
through TIME_WAIT. Real kernel conntrack in a network namespace, `ovsflow run` as processes,
the records decoded by the PyPI `ipfix` package (tests/ipfix_sink.py), the totals read from
`conntrack -L` itself."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import OVSFLOW, agent_config
from ipfix_sink import DatagramSink
from lab.netns import PYTHON, Netns
from ovsflow.record import ACTIVE_TIMEOUT, END_OF_FLOW, IDLE_TIMEOUT
from ovsflow.state import SAVE_INTERVAL
from test_antrea_records import utc

LAB = Path(__file__).resolve().parents[1] / "lab"
SERVER_PORT = 7070
COUNTERS = ("packetDeltaCount", "octetDeltaCount", "reversePacketDeltaCount",
            "reverseOctetDeltaCount")


@contextmanager
def conntrack_node(role: str, directory: Path):
    """A network namespace counting its connections in zone 65520, with a UDP collector
    (`.sink`) in it; deleted afterwards."""
    ns = Netns(role)
    ns.sink = None
    try:
        ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1",
               "net.netfilter.nf_conntrack_timestamp=1")
        for chain in ("OUTPUT", "PREROUTING"):
            ns.run("iptables", "-t", "raw", "-A", chain, "-j", "CT", "--zone", "65520")
        directory.mkdir(exist_ok=True)
        ns.sink = DatagramSink(directory / "datagrams", ns.prefix())
        yield ns
    finally:
        if ns.sink is not None:
            ns.sink.stop()
        ns.delete()


@pytest.fixture
def node(tmp_path):
    with conntrack_node("restart", tmp_path) as ns:
        yield ns


def start_agent(node, tmp_path, state="state", read_only_sysctls=False):
    config = agent_config(
        tmp_path, node.sink.port, ["tcp"],
        flowExporter={"flowPollInterval": "200ms", "activeFlowExportTimeout": "1s",
                      "idleFlowExportTimeout": "60s"},
        state={"directory": str(tmp_path / state) if state else ""})
    # An agent without a writable /proc/sys (a DaemonSet missing its privileges): its kernel
    # source cannot switch accounting on, so it never opens.
    prefix = ["unshare", "-m", "sh", "-c", "mount --bind /proc/sys /proc/sys && mount -o "
              "remount,bind,ro /proc/sys && exec \"$@\"", "sh"] if read_only_sysctls else []
    return node.popen(*prefix, OVSFLOW, "run", "--config", config, stderr=subprocess.PIPE,
                      text=True)


def stop(agent, how=signal.SIGTERM) -> str:
    agent.send_signal(how)
    code = agent.wait(timeout=60)
    assert code == (0 if how == signal.SIGTERM else -how), agent.stderr.read()
    return agent.stderr.read()


def steady_traffic(node, tmp_path, count=20):
    control = tmp_path / "control"
    control.mkdir(exist_ok=True)
    server = node.popen(PYTHON, str(LAB / "traffic.py"), "steady-server", str(SERVER_PORT),
                        "300", stdout=subprocess.PIPE, text=True)
    assert "listening" in server.stdout.readline()
    clients = node.popen(PYTHON, str(LAB / "traffic.py"), "steady-clients", "127.0.0.1",
                         str(SERVER_PORT), str(count), "700", "0.05", str(control),
                         stdout=subprocess.PIPE, text=True)
    ports = json.loads(clients.stdout.readline())["ports"]
    return control, ports


def conntrack_totals(node) -> dict[int, tuple[int, int, int, int]]:
    """client port -> packets, bytes, reply packets, reply bytes, as conntrack counts them."""
    text = node.run("conntrack", "-L", "-p", "tcp", "--dport", str(SERVER_PORT)).stdout
    totals = {}
    for line in text.splitlines():
        sport = int(re.search(r"sport=(\d+)", line).group(1))
        numbers = [int(n) for n in re.findall(r"(?:packets|bytes)=(\d+)", line)]
        totals[sport] = tuple(numbers)
    return totals


def per_connection(records, ports):
    """client port -> its records (the connections to the steady server)."""
    found = defaultdict(list)
    for r in records:
        if r.get("destinationTransportPort") == SERVER_PORT and r[
                "sourceTransportPort"] in ports:
            found[r["sourceTransportPort"]].append(r)
    return found


def sums(records):
    return tuple(sum(r[name] for r in records) for name in COUNTERS)


def last_agent_ends(node, control, agent, ports):
    """The traffic stops, the agent's polls see the final counters, the agent stops:
    conntrack's totals, the agent's log and each connection's records."""
    (control / "stop").touch()
    time.sleep(1.5)
    totals = conntrack_totals(node)
    log = stop(agent)
    time.sleep(0.5)
    found = per_connection(node.sink.records(), ports)
    (control / "close").touch()
    return totals, log, found


def test_two_rolling_restarts_count_every_byte_once(node, tmp_path):
    control, ports = steady_traffic(node, tmp_path)
    logs = []
    for _ in range(2):
        agent = start_agent(node, tmp_path)
        time.sleep(3)
        logs.append(stop(agent))
        time.sleep(1)  # traffic goes on while no agent runs
    agent = start_agent(node, tmp_path)
    time.sleep(2.5)
    totals, log, found = last_agent_ends(node, control, agent, ports)
    logs.append(log)

    assert "continuing 20 conntrack entries" in logs[1] and "continuing" in logs[2], logs
    assert sorted(found) == sorted(ports) and sorted(totals) == sorted(ports)
    for port in ports:
        records = found[port]
        assert sums(records) == totals[port], port
        # one connection from start to end: one start, never ended, nothing counted twice
        assert len({r["flowStartMilliseconds"] for r in records}) == 1
        assert {r["flowEndReason"] for r in records} == {ACTIVE_TIMEOUT}
        assert len(records) >= 6  # several records per agent, not one big one
    # without the state, the second agent's first delta would be each connection's total
    assert all(min(r["octetDeltaCount"] for r in found[port]) < totals[port][1] / 3
               for port in ports)


def test_an_agent_whose_source_never_opened_keeps_the_connections_for_the_next(node,
                                                                             tmp_path):
    control, ports = steady_traffic(node, tmp_path, count=5)
    agent = start_agent(node, tmp_path)
    time.sleep(2.5)
    stop(agent)
    agent = start_agent(node, tmp_path, read_only_sysctls=True)
    time.sleep(2)
    failed = stop(agent)
    agent = start_agent(node, tmp_path)
    time.sleep(2)
    totals, log, found = last_agent_ends(node, control, agent, ports)
    assert "cannot enable net.netfilter.nf_conntrack_acct" in failed, failed
    assert "continuing 5 conntrack entries" in log, log
    for port in ports:
        assert sums(found[port]) == totals[port], port
        assert len({r["flowStartMilliseconds"] for r in found[port]}) == 1


def test_without_export_state_a_restart_counts_again(node, tmp_path):
    """The same restart with `state.directory: ""`: what the state is for."""
    control, ports = steady_traffic(node, tmp_path, count=5)
    agent = start_agent(node, tmp_path, state="")
    time.sleep(2.5)
    stop(agent)
    agent = start_agent(node, tmp_path, state="")
    time.sleep(1.5)
    totals, _, found = last_agent_ends(node, control, agent, ports)
    for port in ports:
        assert sums(found[port])[1] > totals[port][1] * 1.2  # counted again


def test_sigkill_overcounts_at_most_what_was_exported_since_the_last_save(node, tmp_path):
    control, ports = steady_traffic(node, tmp_path, count=5)
    agent = start_agent(node, tmp_path)
    time.sleep(SAVE_INTERVAL + 4)  # a periodic save, then more records
    killed_at = time.time()
    stop(agent, signal.SIGKILL)
    agent = start_agent(node, tmp_path)
    time.sleep(1.5)
    totals, log, found = last_agent_ends(node, control, agent, ports)
    assert "continuing 5 conntrack entries" in log
    for port in ports:
        over = sums(found[port])[1] - totals[port][1]
        # the records of the killed agent after its last save, counted again: the octets of
        # at most SAVE_INTERVAL + an active timeout, far less than the total at the kill
        before_kill = [r for r in found[port] if utc(r["flowEndMilliseconds"]) <= killed_at]
        recent = sum(r["octetDeltaCount"] for r in before_kill
                     if utc(r["flowEndMilliseconds"]) > killed_at - SAVE_INTERVAL - 1.5)
        assert 0 <= over <= recent, (port, over, recent)
        assert over < sum(r["octetDeltaCount"] for r in before_kill) / 2


def test_a_corrupt_state_file_costs_one_line_and_the_agent_starts_anew(node, tmp_path):
    control, ports = steady_traffic(node, tmp_path, count=2)
    agent = start_agent(node, tmp_path)
    time.sleep(3)
    stop(agent)
    [state_file] = (tmp_path / "state").glob("export-state-*")
    state_file.write_bytes(state_file.read_bytes()[:-100])
    agent = start_agent(node, tmp_path)
    time.sleep(3)
    log = stop(agent)
    (control / "close").touch()
    assert len(re.findall(r"export state .* not used, starting anew: cut short", log)) == 1, log
    records = per_connection(node.sink.records(), ports)
    assert all(len(records[port]) >= 3 for port in ports), (
        {port: len(found) for port, found in records.items()}, log)


def test_connections_reopened_on_one_tuple_through_time_wait_are_each_exported(node,
                                                                              tmp_path):
    """8 connections in a row from one source port to one server port; the server closes
    first, so each new connection meets the previous one's TIME_WAIT entry, and the kernel
    often hands it the same conntrack id."""
    events = node.popen("conntrack", "-E", "-e", "DESTROY", "-p", "tcp", "--dport", "7171",
                        stdout=subprocess.PIPE, text=True)
    agent = start_agent(node, tmp_path)
    try:
        time.sleep(1)
        server = node.popen(PYTHON, str(LAB / "traffic.py"), "reopen-server", "7171",
                            stdout=subprocess.PIPE, text=True)
        assert "listening" in server.stdout.readline()
        node.traffic("reopen-client", "127.0.0.1", "7171", "40404", "8", "0.7")
        time.sleep(1)
        listed = conntrack_lines(node.run("conntrack", "-L", "-p", "tcp", "--dport",
                                          "7171").stdout)
    finally:
        log = stop(agent)
        events.terminate()
        destroyed = conntrack_lines(events.communicate(timeout=30)[0])
    time.sleep(0.5)
    records = [r for r in node.sink.records() if r.get("destinationTransportPort") == 7171]
    by_start = defaultdict(list)
    for r in records:
        by_start[r["flowStartMilliseconds"]].append(r)
    # conntrack's own view: each connection's counters, when its entry was destroyed (or
    # still listed, the last one)
    reference = sorted(destroyed + listed)
    assert len(reference) == 8, (destroyed, listed)
    assert sorted(sums(found) for found in by_start.values()) == reference, log
    assert all(found[-1]["flowEndReason"] in (END_OF_FLOW, IDLE_TIMEOUT)
               for found in by_start.values())


def conntrack_lines(text: str) -> list[tuple[int, int, int, int]]:
    return [tuple(int(n) for n in re.findall(r"(?:packets|bytes)=(\d+)", line))
            for line in text.splitlines() if "packets=" in line]
