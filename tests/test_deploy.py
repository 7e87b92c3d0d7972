"""The deployment files: they parse, and say what the docs promise."""

import shutil
import subprocess
from pathlib import Path

import yaml

from ovsflow.config import parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_kubernetes_manifest():
    config_map, daemon_set = yaml.safe_load_all((ROOT / "deploy/kubernetes/ovsflow.yaml")
                                                .read_text())
    assert config_map["kind"] == "ConfigMap" and daemon_set["kind"] == "DaemonSet"
    config = parse_config(yaml.safe_load(config_map["data"]["ovsflow.yaml"]))
    assert config.flow_exporter.protocols.numbers == {6, 17}
    spec = daemon_set["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    [container] = spec["containers"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"],
                                                            "add": ["NET_ADMIN"]}
    assert "privileged" not in container["securityContext"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = config.metrics.port
    assert container["ports"][0]["containerPort"] == port
    assert container["livenessProbe"]["httpGet"]["port"] == port
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["ovs-run"] == config.ovs.run_dir == volumes["ovs-run"]["hostPath"]["path"]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert mounts["config"] + "/ovsflow.yaml" == container["command"][3]
    assert daemon_set["spec"]["selector"]["matchLabels"] == \
        daemon_set["spec"]["template"]["metadata"]["labels"]


def test_systemd_unit():
    unit = (ROOT / "deploy/systemd/ovsflow.service").read_text()
    assert "ExecStart=/usr/local/bin/ovsflow run --config /etc/ovsflow/ovsflow.yaml" in unit
    assert "CapabilityBoundingSet=CAP_NET_ADMIN" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit


def test_docker_compose_validates_with_docker_compose():
    """Debian's docker-compose 1.29 validates without a Docker engine."""
    docker_compose = shutil.which("docker-compose")
    assert docker_compose, "docker-compose is installed by scripts/setup"
    result = subprocess.run([docker_compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"node", "agent", "collector"} <= set(services)
    assert services["agent"]["cap_add"] == ["NET_ADMIN"]
    compose_config = parse_config(yaml.safe_load(
        (ROOT / "deploy/compose/ovsflow.yaml").read_text()))
    assert compose_config.ovs.run_dir == "/run/ovsflow-lab"
    assert compose_config.flow_exporter.collector.host == "collector"
