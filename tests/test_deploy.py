"""The deployment files: they parse, and say what the docs and the measurements promise."""

import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ovsflow import __version__
from ovsflow.config import StateConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent
ANTREA_ZONES = {65520, 65510}  # IPv4, IPv6


@pytest.fixture(scope="module")
def manifest():
    config_map, daemon_set = yaml.safe_load_all((ROOT / "deploy/kubernetes/ovsflow.yaml")
                                                .read_text())
    assert config_map["kind"] == "ConfigMap" and daemon_set["kind"] == "DaemonSet"
    config = parse_config(yaml.safe_load(config_map["data"]["ovsflow.yaml"]))
    [container] = daemon_set["spec"]["template"]["spec"]["containers"]
    return config_map, daemon_set, config, container


def test_kubernetes_manifest(manifest):
    config_map, daemon_set, config, container = manifest
    assert config.flow_exporter.protocols.numbers == {6, 17}
    assert config.conntrack.zones == ANTREA_ZONES
    spec = daemon_set["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    # a collector outage fails /healthz, and must not restart the agent (tests/test_probes.py)
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["ovs-run"] == config.ovs.run_dir == volumes["ovs-run"]["hostPath"]["path"]
    # the export state outlives the Pod, not the node's boot (/run is a tmpfs)
    assert mounts["state"] == config.state.directory == volumes["state"]["hostPath"]["path"]
    assert config.state.directory.startswith("/var/run/")
    # flowType needs the cluster's Pod CIDRs; the comment beside them says to edit them
    assert config.ipfix.cluster_pod_cidrs
    assert "EDIT" in config_map["data"]["ovsflow.yaml"].split("clusterPodCIDRs")[0] \
        .rsplit("ipfix:", 1)[1]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert mounts["config"] + "/ovsflow.yaml" == container["command"][3]
    assert daemon_set["spec"]["selector"]["matchLabels"] == \
        daemon_set["spec"]["template"]["metadata"]["labels"]


def test_kubernetes_security_context(manifest):
    """Root (see the manifest's comment) with NET_ADMIN alone, nothing written but the
    sysctls: every mount but /proc/sys/net read-only, and so is the root filesystem."""
    _, daemon_set, _, container = manifest
    context = container["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context.get("privileged", False) is False
    assert daemon_set["spec"]["template"]["spec"]["securityContext"]["seccompProfile"] == \
        {"type": "RuntimeDefault"}
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/proc/sys/net", "/var/run/ovsflow"}
    # ovsflow never calls the Kubernetes API
    assert daemon_set["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_kubernetes_metrics_scrapeable_where_annotated(manifest):
    """With hostNetwork the pod's IP is the node's and one ConfigMap serves every node: only
    a wildcard bind answers Prometheus (and the probes) at that address."""
    _, daemon_set, config, container = manifest
    annotations = daemon_set["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.metrics.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert ipaddress.ip_address(config.metrics.host).is_unspecified
    assert container["ports"][0]["containerPort"] == config.metrics.port
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == config.metrics.port
        assert "host" not in container[probe]["httpGet"]  # the pod IP, as Prometheus


def highest_mb(cell: str) -> float:
    """The highest figure in MB of a table cell, in bytes: today's, not the earlier ones it
    cites after "was"."""
    peaks = [float(mb) * 1e6 for mb in re.findall(r"(\d+(?:\.\d+)?) MB", cell.split("was")[0])]
    assert peaks, cell
    return max(peaks)


def measured_peak() -> tuple[int, float]:
    """docs/performance.md's benchmark 4: (connections, the highest peak RSS in bytes)."""
    text = (ROOT / "docs/performance.md").read_text()
    row = re.search(r"^\| 4\. peak RSS of `ovsflow run`\D*(\d+)k connections[^|]*\|"
                    r"([^|]*)\|", text, re.MULTILINE)
    assert row, "docs/performance.md lost its peak RSS row (benchmark 4)"
    return int(row[1]) * 1000, highest_mb(row[2])


def quantity_bytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)", quantity).groups()
    base = 1024 if unit.endswith("i") else 1000
    return float(number) * base ** ("KMG".index(unit[0]) + 1)


def test_kubernetes_memory_limit_above_measured_peak(manifest):
    """The limit covers the measured peak with headroom at the scale the ConfigMap keeps
    the agent to (maxConnections), so neither can drift from the benchmark."""
    _, _, config, container = manifest
    connections, peak = measured_peak()
    limit = quantity_bytes(container["resources"]["limits"]["memory"])
    assert limit >= 1.25 * peak, (limit, peak)
    assert config.conntrack.max_connections <= connections
    assert quantity_bytes(container["resources"]["requests"]["memory"]) <= limit


def test_kubernetes_memory_comment_gives_the_measured_figures(manifest):
    """The sizing comment quotes docs/performance.md as it is, not an earlier release."""
    header = (ROOT / "deploy/kubernetes/ovsflow.yaml").read_text().split("apiVersion", 1)[0]
    comment = " ".join(header.replace("#", " ").split())
    _, peak = measured_peak()
    assert f"peak RSS of {peak / 1e6:.0f} MB there" in comment
    performance = (ROOT / "docs/performance.md").read_text()
    at_500k = re.search(r"^\| 4\. same at 500k \|([^|]*)\|", performance, re.M)
    assert at_500k and f"{highest_mb(at_500k[1]) / 1e6:.0f} MB at 500k" in comment


def test_image_build_line_makes_the_image_the_daemonset_names(manifest):
    _, _, _, container = manifest
    assert container["image"] == f"ovsflow:{__version__}"
    build = f"docker build -t {container['image']} ."
    for path in ("README.md", "Dockerfile", "deploy/kubernetes/ovsflow.yaml"):
        assert build in (ROOT / path).read_text(), path


def test_kubernetes_checkov_findings_left_are_justified_beside_them():
    """docs/operations.md records checkov's result; each failed check it lists stays only
    with a comment in the manifest that names it."""
    operations = " ".join((ROOT / "docs/operations.md").read_text().split())
    record = operations.split("## Deployment checks", 1)[1].split("## ", 1)[0]
    passed, failed = map(int, re.search(r"(\d+) passed, (\d+) failed", record).groups())
    listed = set(re.findall(r"CKV2?_K8S_\d+", record))
    assert len(listed) == failed == 6 and passed + failed == 90
    manifest_comments = "\n".join(line for line in (ROOT / "deploy/kubernetes/ovsflow.yaml")
                                  .read_text().splitlines() if line.strip().startswith("#"))
    assert {check for check in listed if check in manifest_comments} == listed


def test_kubernetes_cpu_request_and_limit(manifest):
    """checkov's CKV_K8S_11: a CPU limit; one core, over the request."""
    _, _, _, container = manifest
    resources = container["resources"]
    assert resources["limits"]["cpu"] == "1"
    assert resources["requests"]["cpu"] == "100m"


def test_kubernetes_manifest_passes_kubernetes_validate():
    """The manifest against the Kubernetes API's own schemas (kubernetes-validate, offline)."""
    import kubernetes_validate

    for document in yaml.safe_load_all((ROOT / "deploy/kubernetes/ovsflow.yaml").read_text()):
        kubernetes_validate.validate(document, "1.30", strict=True)


def test_measured_peak_parsing():
    """The parser reads the figures that are there (140 and 200 MB at 100k today)."""
    connections, peak = measured_peak()
    assert connections >= 10_000 and 50e6 < peak < 4e9
    assert quantity_bytes("400Mi") == 400 * 2**20 and quantity_bytes("1G") == 1e9


def test_systemd_unit():
    unit = (ROOT / "deploy/systemd/ovsflow.service").read_text()
    assert "ExecStart=/opt/ovsflow/bin/ovsflow run --config /etc/ovsflow/ovsflow.yaml" in unit
    # the install step the comment gives puts the command where ExecStart looks
    assert "#   python3 -m venv /opt/ovsflow && /opt/ovsflow/bin/pip install .\n" in unit
    assert "CapabilityBoundingSet=CAP_NET_ADMIN" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    # /run/ovsflow (= /var/run/ovsflow, the default state.directory), kept across restarts and
    # across stop/start: with `restart` systemd deletes it at every stop (systemd.exec(5))
    assert "RuntimeDirectory=ovsflow\n" in unit and "RuntimeDirectoryPreserve=yes\n" in unit
    # a refused configuration (exit 2) is not restarted every RestartSec forever
    assert "Restart=on-failure\n" in unit and "RestartPreventExitStatus=2\n" in unit
    assert StateConfig().directory == "/var/run/ovsflow"


def test_systemd_unit_verifies():
    """systemd's own check: its only complaint is the command not installed on this machine."""
    result = subprocess.run(["systemd-analyze", "verify",
                             str(ROOT / "deploy/systemd/ovsflow.service")],
                            capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line]
    assert complaints == ["ovsflow.service: Command /opt/ovsflow/bin/ovsflow is not "
                          "executable: No such file or directory"], complaints


def compose_config(*files: str) -> dict:
    """docker-compose 1.29's own view of the files (it validates without a Docker engine),
    every profile included."""
    docker_compose = shutil.which("docker-compose")
    assert docker_compose, "docker-compose is installed by scripts/setup"
    args = [docker_compose]
    for name in files:
        args += ["-f", str(ROOT / name)]
    result = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, env={**os.environ, "COMPOSE_PROFILES": "nfacctd"})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def test_docker_compose_validates_with_docker_compose():
    services = compose_config("docker-compose.yml")
    assert {"node", "agent", "collector", "nfacctd", "agent-nfacctd"} <= set(services)
    for agent in ("agent", "agent-nfacctd"):
        assert services[agent]["cap_add"] == ["NET_ADMIN"]
        assert services[agent]["cap_drop"] == ["ALL"]
        assert services[agent]["read_only"] is True
    assert services["node"]["init"] is True  # reaps the detached OVS daemons
    compose_config_file = parse_config(yaml.safe_load(
        (ROOT / "deploy/compose/ovsflow.yaml").read_text()))
    assert compose_config_file.ovs.run_dir == "/run/ovsflow-lab"
    assert compose_config_file.flow_exporter.collector.host == "collector"
    assert compose_config_file.conntrack.zones == ANTREA_ZONES


def test_docker_compose_nfacctd_profile_needs_no_edit():
    """The profile brings its own agent exporting to nfacctd, and nfacctd is built from
    Debian's pmacct (no registry image)."""
    services = compose_config("docker-compose.yml")
    for name in ("nfacctd", "agent-nfacctd"):
        assert services[name]["profiles"] == ["nfacctd"]
    assert "build" in services["nfacctd"] and "image" not in services["nfacctd"]
    assert services["nfacctd"]["stop_signal"] == "SIGINT"  # it ignores SIGTERM
    mounts = {volume.split(":")[1]: volume.split(":")[0]
              for volume in services["agent-nfacctd"]["volumes"]}
    config = parse_config(yaml.safe_load(Path(mounts["/etc/ovsflow/ovsflow.yaml"]).read_text()))
    assert config.flow_exporter.collector.host == "nfacctd"
    # the bridge for the Pod names, with a deny table and meter beside the first agent's
    first = parse_config(yaml.safe_load((ROOT / "deploy/compose/ovsflow.yaml").read_text()))
    assert config.ovs.bridge == first.ovs.bridge
    assert config.ovs.deny_table != first.ovs.deny_table
    assert config.ovs.deny_meter_id != first.ovs.deny_meter_id
    assert config.metrics.port != first.metrics.port  # one network namespace
    assert config.ovs.run_dir == "/run/ovsflow-lab"


def test_compose_build_override_covers_every_build():
    """Every service that builds gets the host network in the CI override, and only there:
    the user's compose file stays engine-neutral."""
    services = compose_config("docker-compose.yml")
    overridden = compose_config("docker-compose.yml", "deploy/compose/host-network-build.yml")
    building = {name for name, service in services.items() if "build" in service}
    assert building == {"node", "agent", "collector", "nfacctd", "agent-nfacctd"}
    for name in building:
        assert "network" not in services[name]["build"]
        assert overridden[name]["build"]["network"] == "host"
        for key in ("context", "dockerfile"):
            assert overridden[name]["build"].get(key) == services[name]["build"].get(key)
