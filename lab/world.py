"""The demo's world, kept running: OVS (userspace datapath), pods, the pipeline with a deny
rule, and traffic every few seconds, until SIGTERM. For docker-compose.yml, where the agent
and the collector run in containers of their own.

    python -m lab.world --run-dir /run/ovsflow-lab
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path

from .demo import build_world, traffic
from .ovs_lab import OvsLab


class Stopped(Exception):
    """Raised by SIGTERM/SIGINT wherever the main thread is, so a traffic round in progress
    (its client killed by subprocess.run on the way out) does not delay the stop."""


def _stop(*_) -> None:
    raise Stopped


def reap_daemons(lab: OvsLab) -> None:
    """The OVS daemons detach, so they are re-parented to PID 1 of the PID namespace: to us
    when we are a container's first process without an init. Unreaped, a stopped daemon stays
    a zombie whose /proc/<pid> makes OvsLab.stop wait its 15 s before SIGKILL, and `docker
    stop` kills us first. Waits for our own children only: anyone else's init reaps them."""
    def wait(pid: int) -> None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # not re-parented to us: not ours to reap
    for daemon in ("ovs-vswitchd", "ovsdb-server"):
        threading.Thread(target=wait, args=(lab.pid(daemon),), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="/run/ovsflow-lab",
                        help="Open vSwitch's run directory (shared with the agent)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between rounds")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        lab, node, peer = build_world(Path(args.run_dir))  # cleans up after itself if stopped
    except Stopped:
        return
    reap_daemons(lab)
    try:
        print(f"lab ready: bridge {lab.bridge}, run dir {lab.run_dir}", flush=True)
        while True:
            traffic(lab, node, peer)
            time.sleep(args.interval)
    except Stopped:
        print("lab stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up runs to its end
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        peer.delete()
        lab.stop()


if __name__ == "__main__":
    main()
