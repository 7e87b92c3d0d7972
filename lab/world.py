"""The demo's world, kept running: OVS (userspace datapath), pods, the pipeline with a deny
rule, and traffic every few seconds, until SIGTERM. For docker-compose.yml, where the agent
and the collector run in containers of their own.

    python -m lab.world --run-dir /run/ovsflow-lab
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from .demo import build_world, traffic
from .netns import CommandFailed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="/run/ovsflow-lab",
                        help="Open vSwitch's run directory (shared with the agent)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between rounds")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    lab, node, peer = build_world(Path(args.run_dir))
    try:
        print(f"lab ready: bridge {lab.bridge}, run dir {lab.run_dir}", flush=True)
        while not stop.wait(args.interval):
            try:
                traffic(lab, node, peer)
            except CommandFailed:
                if not stop.is_set():  # a signal to the whole group stops the traffic too
                    raise
    finally:
        peer.delete()
        lab.stop()


if __name__ == "__main__":
    main()
