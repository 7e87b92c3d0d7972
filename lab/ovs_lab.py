"""Open vSwitch with the userspace (netdev) datapath in a private run directory: no kernel
module, no systemd. Daemons are stopped by the PIDs in their pidfiles; pods are network
namespaces joined to the bridge by veth (TX checksum offload off, or TCP moves no bytes)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .netns import Netns, sh

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


class OvsLab:
    """The daemons and the bridge's ports live in a network namespace of their own, so the
    lab never meets an Open vSwitch the machine may already run (two netdev datapaths in
    one namespace collide on the `ovs-netdev` tap)."""

    def __init__(self, run_dir: Path, bridge: str = "br0"):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        Path(run_dir, "conf.db").unlink(missing_ok=True)  # a fresh database every time
        self.run_dir = str(run_dir)
        self.bridge = bridge
        self.env = {**os.environ, "OVS_RUNDIR": self.run_dir, "OVS_LOGDIR": self.run_dir,
                    "OVS_DBDIR": self.run_dir}
        self.pods: list[Netns] = []
        self.host = Netns("ovs")
        try:
            sh("ovsdb-tool", "create", f"{self.run_dir}/conf.db", SCHEMA)
            self.start_ovsdb()
            self.vsctl("--no-wait", "init")
            self.start_vswitchd()
            self.vsctl("add-br", bridge, "--", "set", "bridge", bridge,
                       "datapath_type=netdev", "protocols=OpenFlow10,OpenFlow13",
                       "fail_mode=secure")
            self.wait_for_bridge()
        except BaseException:
            self.stop()
            raise

    def wait_for_bridge(self, timeout: float = 20) -> None:
        """ovs-vswitchd creates the bridge's service socket a moment after the bridge."""
        mgmt = Path(self.run_dir, f"{self.bridge}.mgmt")
        deadline = time.monotonic() + timeout
        while not mgmt.is_socket():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{mgmt} did not appear")
            time.sleep(0.05)

    def _ovs(self, *args: str):
        return sh(*args, env=self.env)

    def start_ovsdb(self) -> None:
        self._ovs(*self.host.prefix(), "ovsdb-server", f"{self.run_dir}/conf.db",
                  f"--remote=punix:{self.run_dir}/db.sock", "--pidfile", "--log-file",
                  "--detach")

    def start_vswitchd(self) -> None:
        self._ovs(*self.host.prefix(), "ovs-vswitchd", f"unix:{self.run_dir}/db.sock",
                  "--pidfile", "--log-file", "--detach")

    def pid(self, daemon: str) -> int:
        return int(Path(self.run_dir, f"{daemon}.pid").read_text().strip())

    def stop_daemon(self, daemon: str) -> None:
        try:
            pid = self.pid(daemon)
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 15
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)

    def vsctl(self, *args: str) -> str:
        return self._ovs("ovs-vsctl", f"--db=unix:{self.run_dir}/db.sock", *args).stdout

    def ofctl(self, *args: str) -> str:
        command, *rest = args
        return self._ovs("ovs-ofctl", "-O", "OpenFlow13", command,
                         f"{self.run_dir}/{self.bridge}.mgmt", *rest).stdout

    def add_pod(self, address: str) -> Netns:
        """A namespace with one veth into the bridge; `address` with prefix length."""
        pod = Netns("pod")
        port = f"p{len(self.pods)}"
        inner = "eth0"
        self.host.run("ip", "link", "add", port, "type", "veth", "peer", "name", inner,
                      "netns", pod.name)
        pod.run("ip", "addr", "add", address, "dev", inner)
        pod.run("ip", "link", "set", inner, "up")
        pod.run("ethtool", "-K", inner, "tx", "off")
        self.host.run("ip", "link", "set", port, "up")
        self.vsctl("add-port", self.bridge, port)
        pod.port = port
        pod.address = address.split("/")[0]
        self.pods.append(pod)
        return pod

    def ofport(self, pod: Netns) -> int:
        return int(self.vsctl("get", "Interface", pod.port, "ofport").strip())

    def stop(self) -> None:
        self.stop_daemon("ovs-vswitchd")
        self.stop_daemon("ovsdb-server")
        for pod in self.pods:
            pod.delete()
        self.host.delete()


CONNTRACK_PIPELINE = [
    # Antrea-like: IP traffic through conntrack zone 65520, committed when new.
    "table=0,priority=10,ip,ct_state=-trk,actions=ct(table=1,zone=65520)",
    "table=1,priority=10,ip,ct_state=+trk+new,actions=ct(commit,zone=65520),NORMAL",
    "table=1,priority=10,ip,ct_state=+trk+est,actions=NORMAL",
    "table=1,priority=10,ip,ct_state=+trk+rel,actions=NORMAL",
    "table=0,priority=1,actions=NORMAL",
]
