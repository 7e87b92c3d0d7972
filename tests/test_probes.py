"""The probes the DaemonSet gives the kubelet, under the manifest's own settings: a collector
outage fails /healthz (people and alerts are told) but never /livez (the kubelet would
restart every agent of the cluster, and each would drop its queue), and /readyz stays as it
was; a stuck agent fails /livez. `ovsflow run` and `ovsflow collect` (TCP) run in a network
namespace whose kernel conntrack holds connections that are due every second."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from collecting import Output
from helpers import OVSFLOW, Collector, agent_config, filled_namespace, free_port
from lab.netns import PYTHON
from ovsflow.health import LIVENESS_MIN_SECONDS, liveness

ROOT = Path(__file__).resolve().parent.parent

# The probe as the kubelet makes it: an HTTP GET with a timeout; 200-399 is a success.
PROBE = """import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).status)
except urllib.error.HTTPError as err:
    print(err.code)
except OSError:
    print("timeout")"""


def probe_settings(name: str) -> SimpleNamespace:
    """A probe of the DaemonSet's container, with Kubernetes' defaults where it sets none."""
    _, daemon_set = yaml.safe_load_all((ROOT / "deploy/kubernetes/ovsflow.yaml").read_text())
    [container] = daemon_set["spec"]["template"]["spec"]["containers"]
    probe = container[name]
    return SimpleNamespace(path=probe["httpGet"]["path"],
                           period=probe.get("periodSeconds", 10),
                           timeout=probe.get("timeoutSeconds", 1),
                           failures=probe.get("failureThreshold", 3))


@pytest.fixture
def agent(tmp_path):
    """An agent exporting 200 connections every second over TCP to a collector that the test
    can stop; `probe(path, timeout)` asks its metrics server from inside the namespace."""
    with filled_namespace("probes", 200) as node:
        collector = Collector("tcp://127.0.0.1:0", timeout=300, prefix=node.prefix())
        output = Output(collector)
        port = free_port()
        config = agent_config(tmp_path, collector.port, ["udp"],
                              flowExporter={"flowCollectorAddr": f"127.0.0.1:{collector.port}"
                                                                 ":tcp"},
                              metrics={"bindAddress": f"127.0.0.1:{port}"})
        process = node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.DEVNULL)

        def probe(path: str, timeout: float) -> str:
            return node.run(PYTHON, "-c", PROBE, f"http://127.0.0.1:{port}{path}",
                            str(timeout)).stdout.strip()

        try:
            yield SimpleNamespace(process=process, probe=probe, output=output)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait()
            output.stop()
            collector.stop()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout}s")
        time.sleep(0.2)


def test_a_collector_outage_fails_healthz_but_never_the_liveness_probe(agent):
    liveness_probe = probe_settings("livenessProbe")
    readiness_probe = probe_settings("readinessProbe")
    assert liveness_probe.path == "/livez" and readiness_probe.path == "/readyz"
    wait_for(agent.output.records, 30, "records at the collector")
    assert agent.probe("/readyz", readiness_probe.timeout) == "200"
    agent.output.stop()  # the collector goes away, for good
    outage = time.monotonic()
    wait_for(lambda: agent.probe("/healthz", 5) == "503", 60, "/healthz to report it")
    # the kubelet's view from now on: it restarts the container after `failures` failed
    # liveness probes in a row, one every `period` seconds; watch that long and one more
    answers = []
    for _ in range(liveness_probe.failures + 1):
        answers.append(agent.probe("/livez", liveness_probe.timeout))
        time.sleep(liveness_probe.period)
    assert answers == ["200"] * (liveness_probe.failures + 1)
    assert time.monotonic() - outage > liveness_probe.failures * liveness_probe.period
    # still reported as it was: the agent has started and delivered; the outage is
    # /healthz's (and ovsflow_collector_reachable's) to tell
    assert agent.probe("/healthz", 5) == "503"
    assert agent.probe("/readyz", readiness_probe.timeout) == "200"
    assert agent.process.poll() is None


def test_a_stuck_agent_fails_the_liveness_probe(agent):
    liveness_probe = probe_settings("livenessProbe")
    wait_for(lambda: agent.probe("/livez", liveness_probe.timeout) == "200", 30,
             "the agent to answer")
    agent.process.send_signal(signal.SIGSTOP)  # nothing of it runs: no answer at all
    try:
        assert agent.probe("/livez", liveness_probe.timeout) == "timeout"
    finally:
        agent.process.send_signal(signal.SIGCONT)
    assert agent.probe("/livez", liveness_probe.timeout) == "200"


def agent_state(poll_interval: float, started_ago: float,
                last_poll_ago: float | None) -> SimpleNamespace:
    """What liveness() reads of the agent's Health, at times relative to now: when it
    started and when a poll, failed or not, last ended."""
    now = time.monotonic()
    return SimpleNamespace(
        poll_interval=poll_interval,
        started_at=now - started_ago,
        last_poll_ended_at=0.0 if last_poll_ago is None else now - last_poll_ago)


def test_liveness_fails_only_when_no_poll_ended_for_its_generous_bound():
    assert LIVENESS_MIN_SECONDS == 120
    assert liveness(agent_state(5, started_ago=1000, last_poll_ago=100))[0] == 200
    status, text = liveness(agent_state(5, started_ago=1000, last_poll_ago=130))
    assert status == 503 and "no poll ended for 130s (bound 120s)" in text
    # ten intervals when that is longer than two minutes
    assert liveness(agent_state(30, started_ago=1000, last_poll_ago=290))[0] == 200
    assert liveness(agent_state(30, started_ago=1000, last_poll_ago=310))[0] == 503
    # the first poll of a large table: counted from the start
    assert liveness(agent_state(5, started_ago=60, last_poll_ago=None))[0] == 200
    assert liveness(agent_state(5, started_ago=200, last_poll_ago=None))[0] == 503
    # a poll that failed ended too (a failing source is /healthz's to report, not a stuck
    # loop); one that fails and then hangs does not end: 503 as any other
    assert liveness(agent_state(5, started_ago=1000, last_poll_ago=5))[0] == 200
