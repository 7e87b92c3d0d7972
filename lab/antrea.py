"""A stand-in for Antrea's agent in the lab: its OpenFlow side and the flows its pipeline
installs for the Pods on the bridge and a few policies and Services.

    python -m lab.antrea --run-dir R --bridge br0 --status FILE --scenario JSON \
        [--name-tables-after SECONDS] [--stale-after SECONDS] [--packet-in-rate N]

Built from antrea-io/antrea at fc70f2bb7037f398196fd42210d34800cb6aa398 (v2.8 development;
v2.7.0 and v2.6.3 agree on all of it): the flows are docs/design/ovs-pipeline.md's dumps
("md:LINE" below) with this lab's addresses, ports and ids; pkg/agent/openflow/ (fields.go:
registers; pipeline.go: tables, dispositions, conjunctionActionDenyFlow, defaultDropFlow,
ipv6Flows; network_policy.go: logging flows and groups; client.go: initialize, ReplayFlows;
cookie/allocator.go), pkg/ovs/ (ovsconfig/ovs_client.go: the bridge's protocols;
openflow/ofctrl_bridge.go: SwitchConnected, table names) and antrea-io/ofnet (ofctrl: the
controller id, OpenFlow 1.5, reconnecting every second).

What the agent does, as antrea-agent does:
  - at start, sets the bridge's protocols to OpenFlow10,OpenFlow15 (ovs_client.go) and
    draws a random 16-bit controller id (ofnet ofctrl.go NewController);
  - connects speaking OpenFlow 1.5 only (ofnet NewHello(6)), sets miss_send_len 128, the
    controller id and NXT_PACKET_IN2 (ofSwitch.go switchConnected, SwitchConnected);
  - takes the next round number from Bridge external_ids:roundNum (agent.go), deletes the
    flows of that round (client.go Initialize);
  - names its tables through OpenFlow table features, each part as it came
    (ofctrl_bridge.go queryTableFeatures, processTableFeatures); `--name-tables-after`
    names them that many seconds after its flows are in, to play the race in which a
    listener reads the names before Antrea has set them;
  - deletes every group and meter, adds meters 256-258, then its groups and flows
    (client.go initialize, ReplayFlows), with cookies round<<48 | category<<40; the meters'
    rate is the agent's `packetInRate` (`--packet-in-rate`, 5000 by default: options.go),
    their burst twice that (client.go:906-914);
  - when the connection is lost (ovs-vswitchd restarted) connects again every second with
    the same id and replays all of it (ofnet, client.go ReplayFlows);
  - after `--stale-after` seconds deletes the previous round's flows (DeleteStaleFlows)
    and saves the round.
It counts the NetworkPolicy packet-ins it receives and writes its state as JSON to the
status file. "Restarting" it is a new process: a new id, a new round, its flows replaced.

The Pods are the bridge's Ports with Antrea's external_ids (pod-name, ip-address,
attached-mac; pkg/agent/cniserver) and their Interfaces' ofport, as the agent's interface
store holds them. The scenario (JSON) says which policies and Services exist:
  {"rules": [{"id": 5, "direction": "egress", "action": "drop", "from": ["client"],
              "to": ["server"], "logging": true}, ...],   # Antrea-native, by priority
   "isolated": [{"pod": "client", "direction": "egress", "logging": true}, ...],
   "services": [{"ip": "10.96.0.10", "protocol": "udp", "port": 53,
                 "endpoints": ["dns"]}],
   "denyTracking": false}
Rule actions: allow, drop, reject. "isolated" is a Kubernetes NetworkPolicy's default
drop for the Pod; its "logging" stands for the Namespace annotation
networkpolicy.antrea.io/enable-logging (pkg/controller/networkpolicy/
networkpolicy_controller.go EnableNPLoggingAnnotationKey). "denyTracking" is Antrea's
FlowExporter on (client.go enableDenyTracking).

The pipeline's flows are `lab/antrea_pipeline.py`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openflow import messages as m  # noqa: E402
from lab.antrea_pipeline import (  # noqa: E402
    DENY_BIT, DNS_METER, GATEWAY_MAC, NETWORK_POLICY, NP_METER, PACKET_IN_RATE, PROTOCOLS,
    ROUND_MASK, SERVICE_CIDR, TABLES, TF_METER, Pipeline, Pod,
)
from openflow.connection import OpenFlowConnection  # noqa: E402


def pods_of(run_dir: str, bridge: str) -> dict[str, Pod]:
    """The bridge's Pods as the agent's interface store has them: Ports with Antrea's
    external_ids (pkg/agent/cniserver/pod_configuration.go BuildOVSPortExternalIDs) and their
    Interfaces' ofport."""
    def rows(table: str, columns: str) -> list[list]:
        text = subprocess.run(
            ["ovs-vsctl", f"--db=unix:{run_dir}/db.sock", "--format=json", "--data=json",
             f"--columns={columns}", "list", table], capture_output=True, text=True,
            check=True).stdout
        return json.loads(text)["data"]

    ofports = {name: ofport for name, ofport in rows("Interface", "name,ofport")
               if isinstance(ofport, int)}
    bridge_ports = set(subprocess.run(
        ["ovs-vsctl", f"--db=unix:{run_dir}/db.sock", "list-ports", bridge],
        capture_output=True, text=True, check=True).stdout.split())
    pods = {}
    for name, external_ids in rows("Port", "name,external_ids"):
        ids = dict(external_ids[1])
        if name in bridge_ports and ids.get("pod-name") and name in ofports:
            pods[ids["pod-name"]] = Pod(ids["pod-name"], ids.get("pod-namespace", ""),
                                        tuple(ids["ip-address"].split(",")),
                                        ids["attached-mac"], ofports[name])
    return pods


def route_services_via_gateway(pod) -> None:
    """The Pod reaches Services through the gateway's MAC, as an Antrea Pod does through its
    default route to antrea-gw0 (the lab has no gateway port: a static neighbour)."""
    pod.run("ip", "neigh", "replace", "169.254.0.1", "lladdr", GATEWAY_MAC, "dev", "eth0",
            "nud", "permanent")
    pod.run("ip", "route", "replace", SERVICE_CIDR, "via", "169.254.0.1", "dev", "eth0",
            "onlink")


class AntreaAgent:
    """The controller process's state and OpenFlow work."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.scenario = json.loads(args.scenario)
        self.mgmt = f"{args.run_dir}/{args.bridge}.mgmt"
        self.controller_id = random.choice(
            [i for i in range(1, 0x10000) if i != 0x6F66])  # not ovsflow's own id
        self.round = self.previous_round = 0
        self.packet_ins = 0  # NetworkPolicy packet-ins received, on every connection
        self.endpoint_in_reg3 = 0  # of them, with reg3 set and no deny mark (a Service's)
        self.connections = 0
        self.connection: OpenFlowConnection | None = None  # the current one
        self.ready = self.named = False  # on the current connection
        self._pending: asyncio.TimerHandle | None = None

    def vsctl(self, *words: str) -> str:
        return subprocess.run(["ovs-vsctl", f"--db=unix:{self.args.run_dir}/db.sock", *words],
                              capture_output=True, text=True, check=True).stdout.strip()

    def ofctl(self, command: str, lines: list[str]) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as file:
            file.write("\n".join(lines) + "\n")
            file.flush()
            subprocess.run(["ovs-ofctl", "-O", "OpenFlow15", command, self.mgmt, file.name],
                           capture_output=True, text=True, check=True)

    def write_status(self) -> None:
        path = Path(self.args.status)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({
            "pid": os.getpid(), "controller_id": self.controller_id, "round": self.round,
            "packet_ins": self.packet_ins, "endpoint_in_reg3": self.endpoint_in_reg3,
            "connections": self.connections, "ready": self.ready, "named": self.named}))
        temporary.replace(path)

    async def run(self) -> None:
        self.vsctl("set", "bridge", self.args.bridge, f"protocols={PROTOCOLS}")
        saved = self.vsctl("--if-exists", "get", "Bridge", self.args.bridge,
                           "external_ids:roundNum").strip('"')
        self.previous_round = int(saved) if saved else 0
        self.round = self.previous_round % 0xFFFF + 1
        asyncio.get_running_loop().call_later(
            self.args.stale_after, lambda: asyncio.ensure_future(self.delete_stale_flows()))
        while True:  # ofnet: reconnect every second, with the same id
            try:
                connection = await OpenFlowConnection.open_unix(self.mgmt, versions=(m.OFP15,))
            except (OSError, ConnectionError, TimeoutError):
                await asyncio.sleep(1)
                continue
            self.connections += 1
            try:
                await self.switch_connected(connection)
                await self.receive(connection)
            except (OSError, ConnectionError, TimeoutError, m.OpenFlowError) as err:
                print(f"antrea stand-in: connection lost: {err}", file=sys.stderr)
            finally:
                self.ready = self.named = False
                self.write_status()
                await connection.close()
            await asyncio.sleep(1)

    async def switch_connected(self, connection: OpenFlowConnection) -> None:
        v = connection.version
        self.connection = connection
        await connection.transact([
            lambda xid: m.set_config(xid, miss_send_len=128, version=v),
            lambda xid: m.set_controller_id(xid, self.controller_id, version=v),
            lambda xid: m.set_packet_in_format(xid, m.NXPIF_NXT_PACKET_IN2, version=v)])
        await connection.transact([  # Initialize: this round's flows, if any, go first
            lambda xid: m.flow_mod(xid, version=v, command=m.OFPFC_DELETE,
                                   table_id=m.OFPTT_ALL, cookie=self.round << 48,
                                   cookie_mask=ROUND_MASK)])
        if not self.args.name_tables_after:
            await self.name_tables(connection)
        await connection.transact([  # initialize: DeleteGroupAll, DeleteMeterAll
            lambda xid: m.group_mod(xid, version=v, command=m.OFPGC_DELETE,
                                    group_id=m.OFPG_ALL),
            lambda xid: m.meter_mod(xid, version=v, command=m.OFPMC_DELETE,
                                    meter_id=m.OFPM_ALL, flags=0, bands=[])])
        await connection.transact([  # client.go initialize: the packet-in meters
            lambda xid, meter=meter: m.meter_mod(
                xid, version=v, command=m.OFPMC_ADD, meter_id=meter,
                flags=m.OFPMF_PKTPS | m.OFPMF_BURST,
                bands=[(m.OFPMBT_DROP, self.args.packet_in_rate,
                        2 * self.args.packet_in_rate)])
            for meter in (NP_METER, TF_METER, DNS_METER)])
        pipeline = Pipeline(self.controller_id, self.round,
                            pods_of(self.args.run_dir, self.args.bridge),
                            self.scenario).build()
        await asyncio.to_thread(self.ofctl, "add-groups", pipeline.groups)
        await asyncio.to_thread(self.ofctl, "add-flows", pipeline.flows)
        self.ready = True
        self.write_status()
        if self.args.name_tables_after:
            await asyncio.sleep(self.args.name_tables_after)
            await self.name_tables(connection)
        self.write_status()

    async def receive(self, connection: OpenFlowConnection) -> None:
        loop = asyncio.get_running_loop()
        while (message := await connection.events.get()) is not None:
            if isinstance(message, m.PacketIn) and message.userdata[:1] == bytes(
                    (NETWORK_POLICY,)):
                self.packet_ins += 1
                if message.register(3) and not message.register(0) & DENY_BIT:
                    self.endpoint_in_reg3 += 1
                if self._pending is None or self._pending.when() < loop.time():
                    # the count is written 50 ms after a packet-in, not for each one
                    self._pending = loop.call_later(0.05, self.write_status)

    async def delete_stale_flows(self) -> None:
        """agent.go: the previous round's flows go, then the round is saved."""
        connection = self.connection
        if self.previous_round and connection is not None and not connection.closed:
            await connection.transact([
                lambda xid: m.flow_mod(xid, version=connection.version,
                                       command=m.OFPFC_DELETE, table_id=m.OFPTT_ALL,
                                       cookie=self.previous_round << 48,
                                       cookie_mask=ROUND_MASK)])
        self.vsctl("set", "Bridge", self.args.bridge, f"external_ids:roundNum={self.round}")

    async def name_tables(self, connection: OpenFlowConnection) -> None:
        """ofctrl_bridge.go processTableFeatures: every table's features back, Antrea's
        tables renamed, each part with its reply's flags, all under one xid."""
        v = connection.version
        parts = await connection.request_all(
            lambda xid: m.table_features_request(xid, version=v))
        xid = connection.next_xid()
        for part in parts:
            connection.send(m.table_features_request(
                xid, [t.renamed(TABLES[t.table_id]) if t.table_id in TABLES else t.raw
                      for t in part.tables], m.OFPMPF_MORE if part.more else 0, version=v))
        await connection.transact([])  # the barrier: OVS has taken them (or said why not)
        self.named = True


class AntreaStandIn:
    """The stand-in's process, for tests and the demo; `restart()` plays an agent restart
    (a new process: a new controller id and round)."""

    def __init__(self, run_dir: str, bridge: str, status: Path, scenario: dict,
                 name_tables_after: float = 0.0, stale_after: float = 0.0,
                 packet_in_rate: int = PACKET_IN_RATE):
        self.status_path = status
        self.command = [sys.executable, "-m", "lab.antrea", "--run-dir", run_dir, "--bridge",
                        bridge, "--status", str(status), "--scenario", json.dumps(scenario),
                        "--name-tables-after", str(name_tables_after), "--stale-after",
                        str(stale_after), "--packet-in-rate", str(packet_in_rate)]
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self, timeout: float = 30.0) -> dict:
        self.status_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(self.command, cwd=Path(__file__).resolve().parent.parent,
                                        stderr=subprocess.PIPE, text=True)
        return self.wait_until("ready", timeout)

    def wait_until(self, condition: str | Callable[[dict], bool],
                   timeout: float = 30.0) -> dict:
        """Until the status says `condition` (ready: its flows are in; named: its tables on
        the current connection), or meets it; the status then."""
        met = condition if callable(condition) else (lambda status: status[condition])
        deadline = time.monotonic() + timeout
        while not (self.status_path.exists() and met(self.status())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Antrea stand-in is not {condition}: "
                                   f"{self.process.stderr.read()}")
            time.sleep(0.05)
        return self.status()

    def status(self) -> dict:
        return json.loads(self.status_path.read_text())

    def restart(self) -> dict:
        self.stop()
        return self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--bridge", required=True)
    parser.add_argument("--status", required=True, help="JSON state written here")
    parser.add_argument("--scenario", required=True, help="policies and Services, as JSON")
    parser.add_argument("--name-tables-after", type=float, default=0.0,
                        help="seconds after its flows to name the tables (0: before them)")
    parser.add_argument("--stale-after", type=float, default=0.0,
                        help="seconds until the previous round's flows go (Antrea: >= 10)")
    parser.add_argument("--packet-in-rate", type=int, default=PACKET_IN_RATE,
                        help="packet-ins per second its meters let through (packetInRate)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(AntreaAgent(args).run())


if __name__ == "__main__":
    main()
