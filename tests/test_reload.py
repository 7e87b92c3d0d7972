"""Reloads of a running agent (kernel conntrack in a namespace, real collectors): a bad file
changes nothing, keeps the records flowing and says why in one line; a good one after it
still applies in full (a half-applied bad one used to swallow the collector change). And a
valid file whose parts cannot be built (TLS files, the switch refusing the deny flows)
leaves every part of the running agent as it was."""

import asyncio
import copy
import signal
import time
from pathlib import Path

import pytest
import yaml

from collecting import Output
from helpers import OVSFLOW, Collector, agent_config, filled_namespace
from lab.ovs_lab import OvsLab
from ovsflow.agent import Agent
from ovsflow.config import ConfigError, load_config
from test_exporter import tls_files  # noqa: F401 - the fixture

RELOAD_WAIT = 2.0  # the agent looks at the file every poll (500 ms)


@pytest.fixture
def node():
    with filled_namespace("reload", 20) as ns:
        yield ns


def new_log_lines(path: Path, seen: list[str]) -> list[str]:
    lines = path.read_text().splitlines()
    new = lines[len(seen):]
    seen[:] = lines
    return new


def test_bad_reloads_change_nothing_and_a_good_one_still_applies(node, tmp_path, tls_files):  # noqa: F811
    first = Collector("udp://127.0.0.1:0", timeout=120, prefix=node.prefix())
    second = Collector("tls://127.0.0.1:0", timeout=120, prefix=node.prefix(),
                       extra=("--cert", tls_files["cert"], "--key", tls_files["key"]))
    first_output, second_output = Output(first), Output(second)
    path = Path(agent_config(tmp_path, first.port, ["udp"],
                             # a heartbeat: the node's connections do not move, and the
                             # test watches the agent go on exporting
                             flowExporter={"idleFlowExportTimeout": "10m",
                                           "heartbeatFlowExportTimeout": "1s"}))
    base = yaml.safe_load(path.read_text())

    def variant(collector_port=None, transport="udp", enable=True, tls=None) -> str:
        config = yaml.safe_load(yaml.safe_dump(base))
        config["flowExporter"]["enable"] = enable
        if collector_port is not None:
            config["flowExporter"]["flowCollectorAddr"] = f"127.0.0.1:{collector_port}:{transport}"
        if tls is not None:
            config["ipfix"] = {"tls": tls}
        return yaml.safe_dump(config)

    not_a_certificate = tmp_path / "notes.txt"
    not_a_certificate.write_text("not a certificate\n")
    bad = [  # (file text, what the one log line must name besides the key)
        ("? [a, b]\n: 1\n" + variant(), str(path)),
        (variant(second.port, "tls", tls={"caFile": "/nonexistent/ca.pem"}),
         "/nonexistent/ca.pem"),
        (variant(second.port, "tls", tls={"caFile": str(not_a_certificate)}),
         str(not_a_certificate)),
        (variant(enable=False), "flowExporter.enable"),
    ]
    log_path = tmp_path / "agent.log"
    with open(log_path, "w") as log_file:
        agent = node.popen(OVSFLOW, "run", "--config", str(path), stderr=log_file)
    seen: list[str] = []
    try:
        time.sleep(RELOAD_WAIT)
        for text, named in bad:
            new_log_lines(log_path, seen)
            exported = len(first_output.records())
            path.write_text(text)
            time.sleep(RELOAD_WAIT)
            reload_lines = [line for line in new_log_lines(log_path, seen) if "reload" in line]
            assert len(reload_lines) == 1, reload_lines
            key = "ipfix.tls.caFile" if "tls" in text else ""
            assert named in reload_lines[0] and key in reload_lines[0], reload_lines
            assert "keeping the running configuration" in reload_lines[0], reload_lines
            assert len(first_output.records()) > exported  # still exporting, same collector
        path.write_text(variant(second.port, "tls", tls={"caFile": tls_files["ca"],
                                                          "serverName": "collector.test"}))
        time.sleep(RELOAD_WAIT + 1)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
        second_records = second_output.until_disconnected()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        first_output.stop()
        second_output.stop()
    assert len(second_records) >= 20  # the final records at least, over TLS
    assert "reload: collector" in log_path.read_text()


DENY_TABLE = 250


def ovsflow_deny_flows(lab) -> list[str]:
    """Our flows in the deny table (our cookie), without their counters."""
    text = lab.ofctl("dump-flows", f"table={DENY_TABLE}", "--no-stats")
    return sorted(line.strip() for line in text.splitlines() if "0x6f7673666c6f7700" in line)


def running(agent: Agent) -> dict:
    """What a reload may change, as the parts the agent runs with hold it."""
    return {"config": agent.config, "reloads": agent.reloads,
            "filter": (agent.filter.protocols, agent.filter.zones),
            "timeouts": [(store.active_timeout, store.idle_timeout)
                         for store in (agent.store, agent.deny_store)],
            "pod networks": (agent.enricher.pod_networks, agent.enricher.settings),
            "exporters": {collector: (exporter, exporter.transport, exporter.max_buffered,
                                      exporter.template_refresh)
                          for collector, exporter in agent.exporters.by_collector.items()}}


def test_a_reload_whose_parts_cannot_be_built_leaves_everything_as_it_was(
        tmp_path, tls_files):  # noqa: F811
    """The agent in this process, its deny path on a real Open vSwitch. Two valid files
    change every reloadable key: one's TLS CA file stops loading between the file's check and
    the transport's build, and for the other the switch refuses the deny flows of the new
    protocols (a flow limit on the deny table). Each fails and must leave config, filter,
    timeouts, Pod networks and exporters as they were, the very objects; the same file once
    the switch accepts applies in full. (An agent that took the new config before it had
    built everything would run half of a file it said it refused.)"""
    lab = OvsLab(tmp_path / "ovs")
    try:
        path = Path(agent_config(
            tmp_path, 4739, ["udp"], conntrack={"source": "ovs"},
            ovs={"runDir": lab.run_dir, "bridge": lab.bridge, "denyTable": DENY_TABLE}))
        changed = yaml.safe_load(path.read_text())
        changed["flowExporter"].update(protocols=["udp", "tcp"], flowPollInterval="2s",
                                       activeFlowExportTimeout="7s",
                                       idleFlowExportTimeout="45s")
        changed["conntrack"]["zones"] = [65520, 7]
        changed["ipfix"].update(maxBufferedRecords=777, templateRefreshTimeout="42s",
                                clusterPodCIDRs=["10.99.0.0/16"])
        rotated = tmp_path / "rotated-ca.pem"  # a Secret's CA, rotated under the agent
        rotated.write_text(Path(tls_files["ca"]).read_text())
        to_tls = copy.deepcopy(changed)
        to_tls["flowExporter"]["flowCollectorAddr"] = "127.0.0.1:4740:tls"
        to_tls["ipfix"]["tls"] = {"caFile": str(rotated)}

        async def scenario():
            agent = Agent(load_config(str(path)), str(path))
            deny_path = asyncio.create_task(agent.deny.run())
            try:
                await asyncio.wait_for(agent.deny.installed_event.wait(), 10)
                flows, before = ovsflow_deny_flows(lab), running(agent)
                config = agent.config

                # The file checks out (its CA loads), then the CA is replaced by one that
                # does not, before the transport is built: a rotation half done.
                path.write_text(yaml.safe_dump(to_tls))
                to_tls_config = load_config(str(path))
                rotated.write_text("not a certificate yet\n")
                with pytest.raises(ConfigError, match="rotated-ca.pem"):
                    await agent.reloader.apply(to_tls_config)
                assert agent.config is config and running(agent) == before

                lab.vsctl("--", "--id=@ft", "create", "Flow_Table", f"flow_limit={len(flows)}",
                          "overflow_policy=refuse", "--", "set", "Bridge", lab.bridge,
                          f"flow_tables:{DENY_TABLE}=@ft")
                path.write_text(yaml.safe_dump(changed))
                assert await agent.reloader.reload() is False
                assert agent.config is config and running(agent) == before
                assert ovsflow_deny_flows(lab) == flows  # none of tcp's went in

                lab.vsctl("clear", "Bridge", lab.bridge, "flow_tables")
                assert await agent.reloader.reload() is True
                after = running(agent)
                for _ in range(200):  # reconciled now, or installed by the next session
                    if any(",tcp " in flow for flow in ovsflow_deny_flows(lab)):
                        break
                    await asyncio.sleep(0.1)
                return config, before, after, ovsflow_deny_flows(lab)
            finally:
                # Cancelled again if need be: a cancellation that lands just as a session ends
                # (as right after the refused reconcile) is swallowed by the deny path, which
                # then starts another session.
                while not deny_path.done():
                    deny_path.cancel()
                    await asyncio.wait([deny_path], timeout=2)

        config, before, after, flows = asyncio.run(scenario())
    finally:
        lab.stop()
    assert after["config"] is not config and after["reloads"] == 1
    assert after["config"].flow_exporter.poll_interval == 2.0
    assert after["filter"][0].describe() == "tcp (6), udp (17)"
    assert after["filter"][1] == frozenset({65520, 7})
    assert after["timeouts"] == [(7.0, 45.0)] * 2
    assert [str(n) for n in after["pod networks"][0].networks] == ["10.99.0.0/16"]
    assert after["pod networks"][1] == before["pod networks"][1] + 1
    [(collector, (exporter, transport, *settings))] = after["exporters"].items()
    [(exporter_before, transport_before, *_)] = before["exporters"].values()
    assert collector == "127.0.0.1:4739:udp"
    assert (exporter, transport) == (exporter_before, transport_before)  # same collector
    assert settings == [777, 42.0]
    assert [flow.split()[2] for flow in flows] == [
        "priority=0", "priority=200,tcp", "priority=200,tcp6", "priority=200,udp",
        "priority=200,udp6"]
