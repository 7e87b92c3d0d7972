"""The documentation states facts the code must keep true."""

import asyncio
import copy
import logging
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from ovsflow.agent import Agent
from ovsflow.config import Config, parse_config
from ovsflow.ipfix.templates import DENY_TOTALS, RECORD_TEMPLATES
from ovsflow.metrics import AgentMetrics

ROOT = Path(__file__).resolve().parent.parent


def test_ipfix_doc_lists_every_template_field_as_exported():
    text = (ROOT / "docs" / "ipfix.md").read_text()
    documented = {}
    for section in re.split(r"^## Template ", text, flags=re.M)[1:]:
        template_id = int(section.split(":", 1)[0])
        rows = re.findall(r"^\| (\w+) \| (\d+) \| .*\((\d+)\) \| \w+ \| (\d+) \|$", section, re.M)
        documented[template_id] = [(n, int(i), int(e), int(length)) for n, i, e, length in rows]
    exported = {
        rt.template.template_id: [(f.element.name, f.element.element_id, f.element.enterprise,
                                   f.length) for f in rt.template.fields]
        for rt in [*RECORD_TEMPLATES.values(), DENY_TOTALS]}
    assert documented == exported


def test_readme_quick_start_has_exactly_two_commands():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", quick_start, re.S)
    assert len(blocks) == 1
    assert blocks[0].strip().splitlines() == ["scripts/demo", "scripts/test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test" in ci


def table_rows(text: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header row starts with `header`, as cells."""
    lines = text.split(header, 1)[1].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def flat_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("tls", "protocolGroups"):  # user's names
            keys |= flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_readme_defaults_table_is_the_code():
    """Every key of the configuration has a row, and each default the table gives, written
    into a file, makes the same configuration as leaving the key out."""
    rows = table_rows((ROOT / "README.md").read_text(), "| key | default | rule |")
    documented = {}
    for key_cell, default_cell, _ in rows:
        key = re.match(r"`([\w.]+)`", key_cell)[1]
        key = "ipfix.tls" if key.startswith("ipfix.tls.") else key  # one row for the section
        default = re.match(r"`([^`$]+)`", default_cell)
        documented[key] = yaml.safe_load(default[1]) if default else None
    assert set(documented) == flat_keys(Config().to_dict())
    defaults = parse_config({})
    derived = {"ipfix.nodeName", "ipfix.observationDomainId", "ipfix.tls",
               "flowExporter.protocols"}  # from the host, or not a YAML value: said in words
    assert {key for key, value in documented.items() if value is None} == derived
    for key, value in documented.items():
        if key in derived:
            continue
        section, name = key.split(".")
        assert parse_config({section: {name: value}}) == defaults, key


async def reload_once(tmp_path: Path, change: dict, caplog) -> tuple[Agent, list[str]]:
    """An agent (not started) given a configuration that differs by `change`; the reload's
    'next restart' warnings."""
    base = {"flowExporter": {"flowCollectorAddr": "127.0.0.1:4739:udp"},
            "conntrack": {"source": "kernel"}, "ovs": {"bridge": ""},
            "metrics": {"bindAddress": ""}, "state": {"directory": ""}}
    changed = copy.deepcopy(base)
    for section, values in change.items():
        changed.setdefault(section, {}).update(values)
        changed[section] = {k: v for k, v in changed[section].items() if v is not None}
    agent = Agent(parse_config(base))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ovsflow.reload"):
        await asyncio.wait_for(agent.reloader.apply(parse_config(changed)), 10)
    return agent, [r.getMessage() for r in caplog.records if "next restart" in r.getMessage()]


def exporters(agent: Agent) -> list:
    return list(agent.exporters.by_collector.values())


# A change of each key the docs name, and where the agent shows it applied
LIVE = {
    "ipfix.tls": ({"ipfix": {"tls": {"serverName": "collector.example"}}}, None),
    "ipfix.pathMTU": ({"ipfix": {"pathMTU": 9000}}, None),
    "ipfix.maxBufferedRecords": ({"ipfix": {"maxBufferedRecords": 5}},
                                 lambda agent: {e.max_buffered for e in exporters(agent)} == {5}),
    "ipfix.templateRefreshTimeout": ({"ipfix": {"templateRefreshTimeout": "1m"}},
                                     lambda agent: {e.template_refresh
                                                    for e in exporters(agent)} == {60}),
    "ipfix.clusterPodCIDRs": ({"ipfix": {"clusterPodCIDRs": ["10.0.0.0/8"]}},
                              lambda agent: [str(n) for n in agent.enricher.pod_networks
                                             .networks] == ["10.0.0.0/8"]),
    "ipfix.collectors": ({"flowExporter": {"flowCollectorAddr": None},
                          "ipfix": {"collectors": ["127.0.0.1:4739:udp", "127.0.0.1:4740:tcp"]}},
                         lambda agent: list(agent.exporters.by_collector) == [
                             "127.0.0.1:4739:udp", "127.0.0.1:4740:tcp"]),
}
RESTART_ONLY = {
    "conntrack.source": {"conntrack": {"source": "ovs"}},
    "conntrack.maxConnections": {"conntrack": {"maxConnections": 7}},
    "ovs": {"ovs": {"runDir": "/nonexistent"}},
    "metrics": {"metrics": {"bindAddress": "127.0.0.1:1"}},
    "ipfix.observationDomainId": {"ipfix": {"observationDomainId": 7}},
    "ipfix.nodeName": {"ipfix": {"nodeName": "another-node"}},
}


def documented_reload_keys() -> tuple[set[str], set[str]]:
    """(live ipfix keys, restart-only keys), as docs/configuration.md lists them."""
    text = " ".join((ROOT / "docs" / "configuration.md").read_text().split())
    bullet = text.split("**Live changes", 1)[1].split("- **", 1)[0]
    live = bullet.split("of `ipfix`:", 1)[1].split("Logged as needing a restart:", 1)
    restart = live[1].split(". ", 1)[0]
    return ({f"ipfix.{key}" for key in re.findall(r"`(\w+)`", live[0])},
            set(re.findall(r"`([\w.]+)`", restart)))


def test_live_and_restart_only_keys_are_what_a_reload_does(tmp_path, caplog):
    live, restart_only = documented_reload_keys()
    assert live == set(LIVE) and restart_only == set(RESTART_ONLY)
    operations = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    applied = operations.split("Applied live:", 1)[1].split("Changes to", 1)[0]
    assert live <= set(re.findall(r"`([\w.]+)`", applied))

    async def scenario():
        for key, (change, applied_check) in LIVE.items():
            agent, warnings = await reload_once(tmp_path, change, caplog)
            assert warnings == [], key
            assert applied_check is None or applied_check(agent), key
        for key, change in RESTART_ONLY.items():
            _, warnings = await reload_once(tmp_path, change, caplog)
            assert len(warnings) == 1, key

    asyncio.run(scenario())


def test_operations_metrics_table_names_every_metric_as_served(tmp_path):
    """The table's names are the code's: every family metrics.py defines, with `_total` on
    exactly the counters (as an agent serves them, where one not started serves it)."""
    rows = table_rows((ROOT / "docs" / "operations.md").read_text(),
                      "| metric | what it counts |")
    documented = {name for row in rows for name in re.findall(r"`(ovsflow_\w+)", row[0])}
    source = (ROOT / "ovsflow" / "metrics.py").read_text()
    defined = set(re.findall(r'"(ovsflow_\w+)"', source))
    counters = set(re.findall(r'CounterMetricFamily\(\s*"(ovsflow_\w+)"', source))

    async def served() -> dict[str, str]:
        agent = Agent(parse_config({"ovs": {"bridge": "br0", "runDir": str(tmp_path)},
                                    "metrics": {"bindAddress": ""},
                                    "state": {"directory": str(tmp_path)}}))
        registry = CollectorRegistry()
        registry.register(AgentMetrics(agent))
        text = generate_latest(registry).decode()
        return dict(re.findall(r"^# TYPE (\S+) (\w+)$", text, re.M))

    types = asyncio.run(served())
    expected = set()
    for name in defined:
        kind = types.get(f"{name}_total") and "counter" or types.get(name)
        is_counter = kind == "counter" if kind else name in counters
        expected.add(f"{name}_total" if is_counter else name)
    assert documented == expected
