"""The installed `ovsflow` console script, run as a user would run it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ovsflow.yaml"
OVSFLOW = shutil.which("ovsflow", path=str(Path(sys.executable).parent))


def ovsflow(*args):
    assert OVSFLOW, "the ovsflow console script is not installed next to this Python"
    return subprocess.run([OVSFLOW, *args], capture_output=True, text=True, timeout=60)


def config_file(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_version():
    result = ovsflow("--version")
    assert result.returncode == 0 and result.stdout.startswith("ovsflow ")


def test_example_config_json():
    result = ovsflow("check-config", str(EXAMPLE), "--json")
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["flowExporter"]["protocols"] == [1, 6, 17]
    assert effective["flowExporter"]["flowCollectorAddr"] == "127.0.0.1:4739:udp"
    assert effective["conntrack"]["zones"] == [65510, 65520]
    assert result.stderr == ""


def test_absent_protocols_print_all(tmp_path):
    result = ovsflow("check-config", "--json", config_file(tmp_path, "flowExporter: {}\n"))
    assert json.loads(result.stdout)["flowExporter"]["protocols"] == "all"


def test_partly_invalid_list_exits_0_with_one_warning_line_per_problem(tmp_path):
    path = config_file(tmp_path, "flowExporter:\n  protocols: [TCP, yes, 1.5, '17', bogus]\n")
    result = ovsflow("check-config", path, "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["flowExporter"]["protocols"] == [6, 17]
    lines = result.stderr.splitlines()
    assert len(lines) == 3
    assert "true" in lines[0] and "1.5" in lines[1] and "'bogus'" in lines[2]


def test_all_invalid_list_exits_2(tmp_path):
    result = ovsflow("check-config", config_file(tmp_path, "flowExporter:\n  protocols: [yes]\n"))
    assert result.returncode == 2
    assert "none of the 1 entries is a valid protocol" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("text, expected", [
    ("flowExporter:\n  flowPolInterval: 5s\n", "flowExporter.flowPolInterval: unknown key"),
    ("flowExporter:\n  idleFlowExportTimeout: 15\n", "flowExporter.idleFlowExportTimeout:"),
    ("flowExporter:\n  flowCollectorAddr: '1.2.3.4:4739:quic'\n", "transport 'quic'"),
    ("flowExporter:\n  flowCollectorAddr: '1.2.3.4:0:udp'\n", "port '0'"),
])
def test_refusals_exit_2_naming_the_problem(tmp_path, text, expected):
    result = ovsflow("check-config", config_file(tmp_path, text))
    assert result.returncode == 2
    assert expected in result.stderr


def test_human_output_lists_protocol_names():
    result = ovsflow("check-config", str(EXAMPLE))
    assert result.returncode == 0
    assert "protocols: icmp (1), tcp (6), udp (17)" in result.stdout


def test_help_lists_every_command():
    result = ovsflow("--help")
    for command in ("run", "check-config", "collect", "conntrack"):
        assert command in result.stdout


@pytest.mark.parametrize("text, expected", [
    # Each of these made a validation regex backtrack for minutes or longer.
    ("flowExporter:\n  flowCollectorAddr: '" + "a" * 40 + "_:4739:udp'\n",
     "is not an IP address or host name"),
    ("flowExporter:\n  flowPollInterval: '" + "1" * 3000 + "'\n", "invalid duration"),
])
def test_check_config_answers_at_once_on_input_that_backtracked(tmp_path, text, expected):
    result = subprocess.run([OVSFLOW, "check-config", config_file(tmp_path, text)],
                            capture_output=True, text=True, timeout=5)
    assert result.returncode == 2
    assert expected in result.stderr


@pytest.mark.parametrize("text, expected", [
    ("? [a, b]\n: 1\n", "not valid YAML: a list as a key; keys are names"),
    ("flowExporter:\n  protocols: ['" + "1" * 5000 + "']\n",
     "none of the 1 entries is a valid protocol"),
    ("flowExporter:\n  flowCollectorAddr: 'c.example:4739:tls'\nipfix:\n  tls:\n"
     "    caFile: /nonexistent/ca.pem\n",
     "error: ipfix.tls.caFile: cannot read '/nonexistent/ca.pem': No such file or directory"),
])
def test_files_the_agent_would_refuse_exit_2_with_one_line_per_problem(tmp_path, text,
                                                                       expected):
    path = config_file(tmp_path, text)
    result = ovsflow("check-config", path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert any(expected in line for line in lines), lines
    assert lines[-1] == f"error: {path}: the agent would refuse to start"
    assert all(line.startswith("error: ") for line in lines)
    run = ovsflow("run", "--config", path)  # the same validation, the same answer
    assert run.returncode == 2 and expected in run.stderr


def test_tls_settings_without_tls_are_one_warning_line(tmp_path):
    path = config_file(tmp_path, "ipfix:\n  tls:\n    caFile: /nonexistent/ca.pem\n")
    result = ovsflow("check-config", path, "--json")
    assert result.returncode == 0
    assert result.stderr == ("warning: ipfix.tls: caFile ignored: flowExporter."
                             "flowCollectorAddr 127.0.0.1:4739:udp is udp, not tls\n")
    assert json.loads(result.stdout)["ipfix"]["tls"]["caFile"] == "/nonexistent/ca.pem"
