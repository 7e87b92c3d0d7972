"""What deploy/prometheus and deploy/grafana ship, checked by Debian's Prometheus itself: the
alert rules pass `promtool check rules` and their unit tests, and a real Prometheus, running
the shipped scrape job against a running agent, agrees with the collector, loads the alerts
and answers every dashboard panel's query.

The agent runs as `ovsflow run` in a network namespace with kernel conntrack and traffic of
three protocols, with the deny path on a userspace-datapath bridge (OvsLab) whose pipeline
denies pod 1 -> pod 2; the collector (`ovsflow collect`, UDP) and Prometheus run in that
namespace too, so everything listens on its loopback.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlencode

import pytest
import yaml

from collecting import Output
from helpers import OVSFLOW, Collector, agent_config, free_port
from lab.netns import LAB, PYTHON, Netns
from lab.ovs_lab import OvsLab
from test_deny import TABLE, deny_traffic, pipeline

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "ovsflow-dashboard.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
CONNTRACK_TEMPLATES, DENY_TEMPLATES = {256, 257}, {260, 261}
TRAFFIC = LAB / "traffic.py"
PEER = "127.0.0.2"  # the address the test's traffic goes to
PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp"}
# Grafana's variables, as Grafana would expand them for a short time range and every agent
DASHBOARD_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$collector": ".*"}

FETCH = """import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"""


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool comes with Debian's prometheus package (scripts/setup)"
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=PROMETHEUS_DIR)


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    checked = promtool("check", "rules", "ovsflow-alerts.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 13 rules found" in checked.stdout
    tested = promtool("test", "rules", "ovsflow-alerts.test.yaml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def alert_names() -> set[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "ovsflow-alerts.yaml").read_text())
    return {rule["alert"] for group in rules["groups"] for rule in group["rules"]}


def test_every_alert_has_a_unit_test_that_fires_and_a_runbook_line():
    alerts = alert_names()
    tests = yaml.safe_load((PROMETHEUS_DIR / "ovsflow-alerts.test.yaml").read_text())
    fired = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]
             if case["exp_alerts"]}
    quiet = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]
             if not case["exp_alerts"]}
    assert fired == alerts and quiet == alerts
    operations = (ROOT / "docs" / "operations.md").read_text()
    runbook = operations.split("## Alerts", 1)[1].split("\n## ", 1)[0]
    assert {name for name in alerts if f"| `{name}` |" in runbook} == alerts


def test_scrape_configuration_passes_promtool_check_config():
    checked = promtool("check", "config", "prometheus.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_kubernetes_scrape_job_reads_the_daemonsets_annotations():
    """Debian's promtool has no Kubernetes discovery to check this file with: its relabelling
    is checked against the DaemonSet it finds instead."""
    [job] = yaml.safe_load((PROMETHEUS_DIR / "prometheus-kubernetes.yaml").read_text())[
        "scrape_configs"]
    _, daemon_set = yaml.safe_load_all((ROOT / "deploy/kubernetes/ovsflow.yaml").read_text())
    template = daemon_set["spec"]["template"]
    relabel = {tuple(rule.get("source_labels", [])): rule for rule in job["relabel_configs"]}
    [app] = [rule["regex"] for labels, rule in relabel.items()
             if labels == ("__meta_kubernetes_pod_label_app",)]
    assert template["metadata"]["labels"]["app"] == app
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == relabel[
        ("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["regex"]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [
        daemon_set["metadata"]["namespace"]]
    assert relabel[()]["target_label"] == "job" and relabel[()]["replacement"] == "ovsflow"


def fetch(node: Netns, url: str) -> str:
    return node.run(PYTHON, "-c", FETCH, url).stdout


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout}s")
        time.sleep(0.5)
    return result


def prometheus_config(directory: Path, target: str) -> Path:
    """The shipped configuration with this agent as its target and a 1 s scrape and rule
    interval; everything else as shipped."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yaml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    for rules in config["rule_files"]:
        shutil.copy(PROMETHEUS_DIR / rules, directory / rules)
    path = directory / "prometheus.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """Traffic seen by an agent whose metrics a real Prometheus scrapes; yields once the
    records have stopped coming: `query(promql)`, `records`, `metrics_url`, `node`."""
    assert PROMETHEUS, "prometheus comes with Debian's prometheus package (scripts/setup)"
    tmp = tmp_path_factory.mktemp("prometheus")
    lab = OvsLab(tmp / "ovs")
    node = None
    processes: list[subprocess.Popen] = []
    try:
        lab.pod1 = lab.add_pod("10.56.0.1/24")
        lab.pod2 = lab.add_pod("10.56.0.2/24")
        pipeline(lab)
        node = Netns("prom")
        node.run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1",
                 # no entry ends while the counts are compared
                 "net.netfilter.nf_conntrack_udp_timeout=600",
                 "net.netfilter.nf_conntrack_icmp_timeout=600")
        # only the test's traffic, to and from PEER: not the scrapes, queries and exports
        for chain in ("OUTPUT", "PREROUTING"):
            for direction in ("-d", "-s"):
                node.run("iptables", "-t", "raw", "-A", chain, direction, PEER, "-j", "CT",
                         "--zone", "65520")
        collector = Collector("udp://127.0.0.1:0", timeout=600, prefix=node.prefix())
        processes.append(collector.process)
        output = Output(collector)
        metrics_port, web_port = free_port(), free_port()
        config = agent_config(tmp, collector.port, ["tcp", "udp", "icmp"],
                              flowExporter={"activeFlowExportTimeout": "10m",
                                            "idleFlowExportTimeout": "2s"},
                              ovs={"runDir": lab.run_dir, "bridge": lab.bridge,
                                   "denyTable": TABLE},
                              metrics={"bindAddress": f"127.0.0.1:{metrics_port}"},
                              state={"directory": str(tmp / "state")})
        agent = node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.DEVNULL)
        processes.append(agent)
        prometheus = node.popen(
            PROMETHEUS, f"--config.file={prometheus_config(tmp, f'127.0.0.1:{metrics_port}')}",
            f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web_port}",
            "--log.level=warn", stdout=subprocess.DEVNULL,
            stderr=(tmp / "prometheus.log").open("w"))
        processes.append(prometheus)
        api = f"http://127.0.0.1:{web_port}/api/v1"

        def started() -> bool:
            assert prometheus.poll() is None, (tmp / "prometheus.log").read_text()
            return node.run(PYTHON, "-c", FETCH, f"http://127.0.0.1:{web_port}/-/ready",
                            check=False).returncode == 0

        wait_for(started, 60, "Prometheus to start")

        def query(promql: str) -> list[dict]:
            answer = json.loads(fetch(node, f"{api}/query?" + urlencode({"query": promql})))
            assert answer["status"] == "success", answer
            return answer["data"]["result"]

        exported = "ovsflow_records_exported_total"
        # a first sample before any traffic: the counter's increase from there is the
        # whole run's
        wait_for(lambda: query(f"count_over_time({exported}[1h]) >= 2"), 60,
                 "Prometheus scraping the agent")
        for _ in range(3):  # three UDP connections (three source ports)
            node.traffic("udp", PEER, "5353", "4", "100")
        server = node.popen(PYTHON, str(TRAFFIC), "tcp-server", "8080", "1000",
                            stdout=subprocess.PIPE, text=True)
        assert "listening" in server.stdout.readline()
        node.traffic("tcp-client", PEER, "8080", "500", "2", "0")
        server.wait(timeout=30)
        node.run("ping", "-c", "2", "-i", "0.2", PEER)
        deny_traffic(lab)

        def counts() -> tuple[int, list[str]]:
            return len(output.records()), [series["value"][1] for series in query(exported)]

        def quiet() -> bool:
            """The collector's count and Prometheus' latest sample equal and unchanged for
            3 s (idle records come 2 s after the traffic, then nothing is due for 10m)."""
            before = counts()
            time.sleep(3)
            return before == counts() == (before[0], [str(before[0])]) and before[0] > 0

        wait_for(quiet, 90, "the records to stop coming")
        yield SimpleNamespace(query=query, records=output.records(), node=node, api=api,
                              metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if node is not None:
            node.delete()
        lab.stop()


def test_prometheus_counts_what_the_collector_decoded(scraped):
    records = scraped.records
    conntrack = Counter(PROTOCOL_NAMES[r["protocolIdentifier"]] for r in records
                        if r["_templateId"] in CONNTRACK_TEMPLATES)
    deny = Counter(PROTOCOL_NAMES[r["protocolIdentifier"]] for r in records
                   if r["_templateId"] in DENY_TEMPLATES)
    assert conntrack["udp"] >= 3 and conntrack["tcp"] >= 1 and conntrack["icmp"] >= 1
    assert deny["udp"] >= 1 and deny["tcp"] >= 1 and deny["icmp"] >= 1
    # the increase over the whole run, from a first sample taken before any record (exact:
    # PromQL's increase() extrapolates to the window's edges)
    [increase] = scraped.query("max_over_time(ovsflow_records_exported_total[1h])"
                               " - min_over_time(ovsflow_records_exported_total[1h])")
    assert float(increase["value"][1]) == len(records)
    by_protocol = {(s["metric"]["layer"], s["metric"]["protocol"]): float(s["value"][1])
                   for s in scraped.query("ovsflow_records_by_protocol_total")}
    expected = {("conntrack", name): count for name, count in conntrack.items()} | {
        ("deny", name): count for name, count in deny.items()}
    assert by_protocol == expected
    [dropped] = scraped.query("ovsflow_records_dropped_total")
    assert dropped["value"][1] == "0"


def test_metrics_pass_promtool_check_metrics(scraped):
    text = fetch(scraped.node, scraped.metrics_url)
    assert "ovsflow_packet_ins_total{" in text  # the deny path's metrics are there too
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", \
        checked.stdout + checked.stderr


def test_alert_rules_load_and_a_healthy_agent_raises_none_of_the_trouble_alerts(scraped):
    """Every rule evaluates without error against the agent's real series. The collector
    takes every record, nothing is dropped, every layer is healthy, no task restarted: none
    of the alerts fire. The agent's first start found no export state, and says so, but an
    earlier run could not have left one: that is no alert either."""
    groups = json.loads(fetch(scraped.node, f"{scraped.api}/rules"))["data"]["groups"]
    rules = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
    assert set(rules) == alert_names() and set(rules.values()) == {"ok"}, rules
    alerts = {(a["metric"]["alertname"], a["metric"]["alertstate"])
              for a in scraped.query("ALERTS")}
    # the test's 500 ms polls can take longer than that on a loaded machine: only pending
    assert alerts <= {("OvsflowPollsSlowerThanInterval", "pending")}, alerts
    assert scraped.query('ovsflow_healthy{layer="deny"} == 1')
    assert scraped.query('up{job="ovsflow"} == 1')
    assert scraped.query("ovsflow_export_state_missing == 1")  # no file: a first start
    # what the reworked alerts read is there from the start
    assert scraped.query('process_start_time_seconds{job="ovsflow"} > 0')
    assert scraped.query("ovsflow_boot_time_seconds > 0")
    assert {s["metric"]["task"] for s in scraped.query("ovsflow_task_restarts_total == 0")} \
        == {"poll", "exporter", "deny-path", "state", "metrics"}
    [limit] = scraped.query("ovsflow_export_queue_limit_records")
    assert limit["value"][1] == "100000" and limit["metric"]["collector"].endswith(":udp")
    [limit] = scraped.query("ovsflow_connections_limit")
    assert limit["value"][1] == "500000"
    [limit] = scraped.query("ovsflow_deny_connections_limit")
    assert limit["value"][1] == "100000"


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


def test_every_dashboard_panel_query_returns_series(scraped):
    queries = dashboard_queries()
    titles = {title for title, _ in queries}
    assert len(titles) == len(json.loads(DASHBOARD.read_text())["panels"]) >= 12
    empty = [(title, expr) for title, expr in queries if not scraped.query(expr)]
    assert empty == []


def test_the_dashboard_shows_each_node_and_each_collector_by_name(scraped):
    """Every series a panel draws is one node's (its `instance`), and one collector's
    wherever the metric has a collector: nothing is summed across them, and the legends
    name them."""
    text = fetch(scraped.node, scraped.metrics_url)
    per_collector = set(re.findall(r'^(ovsflow_\w+)\{[^}]*collector="', text, re.M))
    assert "ovsflow_records_exported_total" in per_collector
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr, legend = target["expr"], target["legendFormat"]
            for variable, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(variable, value)
            series = scraped.query(expr)
            assert series and all("instance" in s["metric"] for s in series), expr
            assert "{{instance}}" in legend, (panel["title"], legend)
            if set(re.findall(r"ovsflow_\w+", expr)) & per_collector:
                assert all("collector" in s["metric"] for s in series), expr
                assert "{{collector}}" in legend, (panel["title"], legend)


def test_a_restart_without_its_export_state_is_told_and_one_with_it_is_not(tmp_path):
    """A real Prometheus scrapes three agent processes one after another at one address, as
    a restarted DaemonSet Pod: the first starts without state (a first start: no alert);
    the second continues the state the first saved at SIGTERM (no alert); the third
    starts after the state directory was emptied, as one that does not survive restarts
    (the alert fires, with the agent's labels)."""
    assert PROMETHEUS, "prometheus comes with Debian's prometheus package (scripts/setup)"
    node = Netns("promstate")
    processes: list[subprocess.Popen] = []
    state = tmp_path / "state"
    try:
        metrics_port, web_port = free_port(), free_port()
        config = agent_config(tmp_path, free_port(socket.SOCK_DGRAM), ["udp"],
                              metrics={"bindAddress": f"127.0.0.1:{metrics_port}"},
                              state={"directory": str(state)})
        prometheus = node.popen(
            PROMETHEUS, f"--config.file={prometheus_config(tmp_path, f'127.0.0.1:{metrics_port}')}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(prometheus)
        api = f"http://127.0.0.1:{web_port}/api/v1"
        wait_for(lambda: node.run(PYTHON, "-c", FETCH, f"http://127.0.0.1:{web_port}/-/ready",
                                  check=False).returncode == 0, 60, "Prometheus to start")

        def query(promql: str) -> list[dict]:
            answer = json.loads(fetch(node, f"{api}/query?" + urlencode({"query": promql})))
            return answer["data"]["result"]

        def start_agent() -> subprocess.Popen:
            """An agent, once Prometheus has scraped it (a start time not seen before) and
            evaluated the rules on it a few times."""
            agent = node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.DEVNULL)
            processes.append(agent)
            wait_for(lambda: [s for s in query("process_start_time_seconds")
                              if s["value"][1] not in seen], 60, "a scrape of the new process")
            seen.update(s["value"][1] for s in query("process_start_time_seconds"))
            time.sleep(3)
            return agent

        def stop(agent: subprocess.Popen) -> None:
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=30) == 0

        def missing() -> str:
            [sample] = query("ovsflow_export_state_missing")
            return sample["value"][1]

        def firing() -> set[tuple[str, str]]:
            return {(s["metric"]["alertstate"], s["metric"].get("instance", ""))
                    for s in query('ALERTS{alertname="OvsflowExportStateNotRestored"}')}

        seen: set[str] = set()
        agent = start_agent()  # a first start: no state yet
        assert (missing(), firing()) == ("1", set())
        stop(agent)
        assert any(state.iterdir())  # the state it saved at SIGTERM
        agent = start_agent()  # continues it
        assert (missing(), firing()) == ("0", set())
        stop(agent)
        shutil.rmtree(state)  # a state directory that did not survive the restart
        agent = start_agent()
        assert (missing(), firing()) == ("1", {("firing", f"127.0.0.1:{metrics_port}")})
        stop(agent)
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
        node.delete()
