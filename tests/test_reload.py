"""Reloads of a running agent (kernel conntrack in a namespace, real collectors): a bad file
changes nothing, keeps the records flowing and says why in one line; a good one after it
still applies in full (a half-applied bad one used to swallow the collector change)."""

import signal
import time
from pathlib import Path

import pytest
import yaml

from collecting import Output
from helpers import OVSFLOW, Collector, agent_config, filled_namespace
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
                             flowExporter={"idleFlowExportTimeout": "10m"}))
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
