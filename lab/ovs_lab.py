"""Open vSwitch with the userspace (netdev) datapath in a private run directory: no kernel
module, no systemd. Daemons are stopped by the PIDs in their pidfiles; pods are network
namespaces joined to the bridge by veth (TX checksum offload off, or TCP moves no bytes)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path

from .netns import Netns, sh

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
# What antrea-agent sets on br-int at every start (antrea-io/antrea
# pkg/ovs/ovsconfig/ovs_client.go, the bridge's Protocols): OpenFlow 1.0 and 1.5, no 1.3.
ANTREA_PROTOCOLS = ("OpenFlow10", "OpenFlow15")


class OvsLab:
    """The daemons and the bridge's ports live in a network namespace of their own, so the
    lab never meets an Open vSwitch the machine may already run (two netdev datapaths in
    one namespace collide on the `ovs-netdev` tap)."""

    def __init__(self, run_dir: Path, bridge: str = "br0", switch: bool = True,
                 protocols: tuple[str, ...] = ANTREA_PROTOCOLS):
        """`switch=False`: ovsdb-server and the bridge's row only, no ovs-vswitchd (for
        tests of OVSDB readers with more ports than a datapath could open). `protocols`:
        the OpenFlow versions the bridge allows, by default a real Antrea node's."""
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        Path(run_dir, "conf.db").unlink(missing_ok=True)  # a fresh database every time
        self.run_dir = str(run_dir)
        self.bridge = bridge
        # ovs-ofctl speaks the newest version the bridge allows
        self.openflow = max((p for p in protocols if p in ("OpenFlow13", "OpenFlow15")),
                            default="OpenFlow10")
        self.env = {**os.environ, "OVS_RUNDIR": self.run_dir, "OVS_LOGDIR": self.run_dir,
                    "OVS_DBDIR": self.run_dir}
        self.pods: list[Netns] = []
        self.host = Netns("ovs")
        try:
            sh("ovsdb-tool", "create", f"{self.run_dir}/conf.db", SCHEMA)
            self.start_ovsdb()
            self.vsctl("--no-wait", "init")
            if switch:
                self.start_vswitchd()
            self.vsctl(*([] if switch else ["--no-wait"]), "add-br", bridge, "--", "set",
                       "bridge", bridge, "datapath_type=netdev",
                       f"protocols={','.join(protocols)}", "fail_mode=secure")
            if switch:
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
        return self._ovs("ovs-ofctl", "-O", self.openflow, command,
                         f"{self.run_dir}/{self.bridge}.mgmt", *rest).stdout

    def appctl(self, *args: str) -> str:
        """ovs-appctl to this lab's ovs-vswitchd."""
        control = f"{self.run_dir}/ovs-vswitchd.{self.pid('ovs-vswitchd')}.ctl"
        return self._ovs("ovs-appctl", "-t", control, *args).stdout

    def add_pod(self, address: str, name: str | None = None, namespace: str = "default",
                pod: bool = True) -> Netns:
        """A namespace with one veth into the bridge; `address` with prefix length. Its Port
        gets the external_ids Antrea's CNI writes for a Pod (`pod=False`: none, a plain port
        such as a host or another node's stand-in)."""
        netns = Netns("pod")
        port = f"p{len(self.pods)}"
        inner = "eth0"
        self.host.run("ip", "link", "add", port, "type", "veth", "peer", "name", inner,
                      "netns", netns.name)
        # an IPv6 address without duplicate address detection: usable at once
        netns.run("ip", "addr", "add", address, "dev", inner, *(["nodad"] if ":" in address
                                                                 else []))
        netns.run("ip", "link", "set", inner, "up")
        netns.run("ethtool", "-K", inner, "tx", "off")
        self.host.run("ip", "link", "set", port, "up")
        netns.port = port
        netns.address = address.split("/")[0]
        netns.pod_name = (name or f"pod{len(self.pods) + 1}") if pod else ""
        netns.pod_namespace = namespace if pod else ""
        mac = netns.run("cat", f"/sys/class/net/{inner}/address").stdout.strip()
        external_ids = (pod_external_ids(netns.pod_name, namespace, [netns.address], mac,
                                         f"/var/run/netns/{netns.name}") if pod else {})
        self.vsctl("add-port", self.bridge, port, *set_external_ids("Port", port, external_ids))
        self.pods.append(netns)
        return netns

    def remove_pod(self, pod: Netns) -> None:
        """As the CNI's DEL: the Port goes, then the namespace."""
        self.vsctl("del-port", self.bridge, pod.port)
        self.pods.remove(pod)
        pod.delete()

    def add_pod_rows(self, count: int, first_address: str) -> list[str]:
        """`count` Pod Ports (Antrea's external_ids, consecutive IPv4 addresses from
        `first_address`) in one transaction, without network namespaces: for a lab without
        ovs-vswitchd. Returns the addresses."""
        start = ipaddress.ip_address(first_address)
        addresses, operations = [], []
        for index in range(count):
            address = str(start + index)
            addresses.append(address)
            ids = pod_external_ids(f"pod-{index}", f"ns-{index % 50}", [address],
                                   "02:00:00:00:00:00", f"/var/run/netns/cni-{index}")
            operations += [
                {"op": "insert", "table": "Interface", "row": {"name": f"bulk{index}"},
                 "uuid-name": f"i{index}"},
                {"op": "insert", "table": "Port", "uuid-name": f"p{index}",
                 "row": {"name": f"bulk{index}", "interfaces": ["named-uuid", f"i{index}"],
                         "external_ids": ["map", sorted(ids.items())]}},
            ]
        operations.append({"op": "mutate", "table": "Bridge",
                           "where": [["name", "==", self.bridge]],
                           "mutations": [["ports", "insert", ["set", [
                               ["named-uuid", f"p{index}"] for index in range(count)]]]]})
        self.transact(*operations)
        return addresses

    def transact(self, *operations: dict) -> list:
        """One OVSDB transaction (RFC 7047 §4.1.3) through db.sock with the stdlib's json: for
        bulk changes that would not fit on an ovs-vsctl command line."""
        request = {"method": "transact", "params": ["Open_vSwitch", *operations], "id": 0}
        with socket.socket(socket.AF_UNIX) as db:
            db.connect(f"{self.run_dir}/db.sock")
            db.sendall(json.dumps(request).encode())
            decoder, text = json.JSONDecoder(), ""
            while True:
                chunk = db.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("ovsdb-server closed the connection")
                text += chunk.decode()
                try:
                    reply, _ = decoder.raw_decode(text)
                except json.JSONDecodeError:
                    continue
                if reply.get("id") != 0:  # e.g. an echo request
                    text = ""
                    continue
                errors = [r for r in reply["result"] if isinstance(r, dict) and "error" in r]
                if reply.get("error") or errors:
                    raise RuntimeError(f"OVSDB transaction failed: {reply.get('error')} "
                                       f"{errors}")
                return reply["result"]

    def ofport(self, pod: Netns) -> int:
        return int(self.vsctl("get", "Interface", pod.port, "ofport").strip())

    def stop(self) -> None:
        self.stop_daemon("ovs-vswitchd")
        self.stop_daemon("ovsdb-server")
        for pod in self.pods:
            pod.delete()
        self.host.delete()


def pod_external_ids(name: str, namespace: str, addresses: list[str], mac: str,
                     netns_path: str) -> dict[str, str]:
    """What Antrea's CNI writes into a Pod's Port (antrea-io/antrea,
    pkg/agent/cniserver/pod_configuration.go, BuildOVSPortExternalIDs; `if-dev` only for a
    secondary interface)."""
    return {"antrea-type": "container", "attached-mac": mac,
            "container-id": uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{name}").hex,
            "ip-address": ",".join(addresses), "pod-name": name, "pod-namespace": namespace,
            "net-ns": netns_path}


def set_external_ids(table: str, record: str, external_ids: dict[str, str]) -> list[str]:
    """ovs-vsctl arguments that set them in the same transaction (as Antrea creates the Port
    with them: no moment without)."""
    if not external_ids:
        return []
    return ["--", "set", table, record,
            *(f'external_ids:{key}="{value}"' for key, value in external_ids.items())]


def commit_with_rules(match: str, ingress_rule: int, egress_rule: int) -> str:
    """A flow for table 1 of CONNTRACK_PIPELINE that commits new connections matching `match`
    with NetworkPolicy rule ids in ct_label where Antrea's pipeline puts them: the ingress
    rule's in bits 0-31, the egress rule's in bits 32-63 (antrea-io/antrea,
    pkg/agent/openflow/fields.go: IngressRuleCTLabel, EgressRuleCTLabel)."""
    return (f"table=1,priority=20,ip,ct_state=+trk+new,{match},actions=ct(commit,zone=65520,"
            f"exec(load:{ingress_rule}->NXM_NX_CT_LABEL[0..31],"
            f"load:{egress_rule}->NXM_NX_CT_LABEL[32..63])),NORMAL")


CONNTRACK_PIPELINE = [
    # Antrea-like: IP traffic through conntrack zone 65520, committed when new.
    "table=0,priority=10,ip,ct_state=-trk,actions=ct(table=1,zone=65520)",
    "table=1,priority=10,ip,ct_state=+trk+new,actions=ct(commit,zone=65520),NORMAL",
    "table=1,priority=10,ip,ct_state=+trk+est,actions=NORMAL",
    "table=1,priority=10,ip,ct_state=+trk+rel,actions=NORMAL",
    "table=0,priority=1,actions=NORMAL",
]
