"""The docker-compose lab for real: scripts/compose-test (build, records of both layers and
nfacctd's, a stop under 8 s with every container exiting 0, removal), on the Docker engine
that the project's tool starts where it exists (../shared/tools/docker-engine beside the
repository, as on the project's machines and in `.ci/run`)."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT.parent / "shared/tools/docker-engine"


@pytest.mark.skipif(not ENGINE.exists(), reason=f"no Docker engine tool at {ENGINE}")
@pytest.mark.timeout(1800)  # a first run installs Docker and builds the images
def test_compose_lab():
    started = not _engine_running()  # an engine that was running before is left running
    up = subprocess.run([str(ENGINE), "up"], capture_output=True, text=True, timeout=900)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        docker_host = re.search(r"^export DOCKER_HOST=(\S+)$", up.stdout, re.MULTILINE)
        assert docker_host, up.stdout
        result = subprocess.run([str(ROOT / "scripts/compose-test")], capture_output=True,
                                text=True, timeout=1500,
                                env={**os.environ, "DOCKER_HOST": docker_host[1]})
    finally:
        if started:  # the tool stops its dockerd by the PID in its pidfile
            subprocess.run([str(ENGINE), "down"], capture_output=True, timeout=120)
    report = result.stdout[-8000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert re.search(r"^compose-test: PASS \(stop \d+\.\d s", result.stdout, re.MULTILINE), \
        report


def _engine_running() -> bool:
    """Whether the tool's dockerd (its pidfile, /run/ovsflow-docker/dockerd.pid) is alive."""
    try:
        os.kill(int(Path("/run/ovsflow-docker/dockerd.pid").read_text()), 0)
    except (OSError, ValueError):
        return False
    return True
