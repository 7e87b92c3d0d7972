"""A stand-in for Antrea's agent in the lab: the part of Antrea's pipeline a denied packet
passes, and a small controller process playing the agent's OpenFlow side.

    python -m lab.antrea --run-dir R --bridge br0 --status FILE --egress-deny SRC DST \
        --isolated ADDR [--stale-after SECONDS]

Built from antrea-io/antrea at fc70f2bb7037f398196fd42210d34800cb6aa398 (v2.8 development;
the layout is the same in v2.x): docs/design/ovs-pipeline.md (the flows, as "md:LINE"
below), pkg/agent/openflow/ (fields.go: registers; pipeline.go: tables, dispositions;
network_policy.go: logging flows and groups; client.go: initialize; cookie/allocator.go) and
antrea-io/ofnet (ofctrl: the controller id).

What the controller does at start, as the agent does at each connect:
  - draws a random 16-bit controller id (ofnet ofctrl.go NewController), sets it with
    NXT_SET_CONTROLLER_ID, miss_send_len 128 and NXT_PACKET_IN2 (ofctrl_bridge.go
    SwitchConnected, setPacketInFormatTo2);
  - takes the next round number from Bridge external_ids:roundNum (agent.go), deletes the
    flows of that round (client.go Initialize), then every group and meter (client.go
    initialize: DeleteGroupAll, DeleteMeterAll: OVS deletes the flows that use them);
  - names its tables through OpenFlow table features: reads every table's features and
    sends them all back with its names, each part as it came (ofctrl_bridge.go
    queryTableFeatures, processTableFeatures);
  - adds meter 256, the logging groups and the flows, with cookies round<<48 | category<<40;
  - after `--stale-after` seconds deletes the previous round's flows (DeleteStaleFlows) and
    saves the round.
It counts the NetworkPolicy packet-ins it receives and writes its state (pid, controller
id, round, packet-ins) as JSON to the status file. "Restarting" it is a new process: a new
id, a new round, its flows replaced.

Differences from Antrea, for the lab: OpenFlow 1.3 (Antrea speaks 1.5), the table ids of a
default IPv4 agent with AntreaPolicy on (client.go generatePipelines: other features shift
them), and the tables between the root and the policy stages reduced to goto_table: Pods are
matched by address where Antrea matches reg1 (their OpenFlow port, from L2ForwardingCalc),
and allowed packets end with NORMAL where Antrea outputs to reg1's port.
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
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openflow import messages as m  # noqa: E402
from openflow.connection import OpenFlowConnection  # noqa: E402

# A default IPv4 Linux agent's tables (pipeline.go:111-196, numbered by generatePipelines)
TABLES = dict(enumerate([
    "PipelineRootClassifier", "ARPSpoofGuard", "ARPResponder", "Classifier", "SpoofGuard",
    "UnSNAT", "ConntrackZone", "ConntrackState", "PreRoutingClassifier", "SessionAffinity",
    "ServiceLB", "EndpointDNAT", "AntreaPolicyEgressRule", "EgressRule", "EgressDefaultRule",
    "EgressMetric", "L3Forwarding", "EgressMark", "L3DecTTL", "SNATMark", "SNAT",
    "L2ForwardingCalc", "IngressSecurityClassifier", "AntreaPolicyIngressRule", "IngressRule",
    "IngressDefaultRule", "IngressMetric", "ConntrackCommit", "Output"]))
TABLE = {name: table for table, name in TABLES.items()}

# cookie/allocator.go: round (16 bits) | category (8 bits) | reserved | object id
ROUND_MASK = 0xFFFF << 48
CATEGORY_DEFAULT, CATEGORY_NETWORK_POLICY = 0, 2

# fields.go and pipeline.go
DENY_MARK = "0x400/0x400"  # APDenyRegMark, reg0[10]
DISPOSITION_DROP = "0x800/0x1800"  # APDispositionField reg0[11..12] = 0b01
OUTPUT_TO_CONTROLLER = "0x400000/0x600000"  # OutputToControllerRegMark, reg0[21..22] = 2
LOGGING = 0b1  # PacketInNPLoggingOperation (packetin.go); StoreDeny 0b100, Reject 0b10
NP_METER, NP_RATE = 256, 5000  # PacketInMeterIDNP; packetInRate (options.go)
NETWORK_POLICY = 1  # packet-in category (userdata byte 0)
# initGroups: one group per table a logged packet goes on to, allocated from 1
GROUPS = {"EgressRule": 1, "EgressMetric": 2, "IngressRule": 3, "IngressMetric": 4}


def operations(ops: int) -> str:
    """PacketInOperationField reg0[25..31] (the flows use mask 0xfe000000)."""
    return f"{ops << 25:#x}/0xfe000000"


def pipeline(controller_id: int, round_number: int, rule_id: int, source: str,
             destination: str, isolated: list[str]) -> tuple[list[str], list[str]]:
    """(groups, flows) as ovs-ofctl -O OpenFlow13 text: an Antrea-native egress rule with
    logging that drops `source` -> `destination` (conjunction `rule_id`), and a Kubernetes
    NetworkPolicy isolating each address of `isolated` for ingress, with logging (a
    namespace annotated policy.antrea.io/enable-np-logging)."""
    np_cookie = f"{round_number << 48 | CATEGORY_NETWORK_POLICY << 40 | 1:#x}"
    default_cookie = f"{round_number << 48 | CATEGORY_DEFAULT << 40:#x}"
    t = TABLE

    def flow(table: str, rest: str, cookie: str = default_cookie) -> str:
        return f"cookie={cookie},table={t[table]},{rest}"

    groups = [  # network_policy.go initGroups: bucket 0 goes on, bucket 1 to the controller
        f"group_id={group},type=all,bucket=actions=resubmit(,{t[table]}),"
        f"bucket=actions=set_field:{OUTPUT_TO_CONTROLLER}->reg0,resubmit(,{t['Output']})"
        for table, group in GROUPS.items()]
    flows = [
        # md:PipelineRootClassifier "priority=200,ip actions=goto_table:Classifier"; the
        # lab skips Classifier .. EndpointDNAT. ARP: Antrea's ARP pipeline, here NORMAL.
        flow("PipelineRootClassifier", f"priority=200,ip,actions=goto_table:"
                                       f"{t['AntreaPolicyEgressRule']}"),
        flow("PipelineRootClassifier", "priority=0,actions=NORMAL"),
        # md:1193-1195 (priority 14499, conj 5), with logging on: pipeline.go
        # conjunctionActionDenyFlow loads reg3, the deny mark, the disposition, the
        # packet-in operations and PacketInTableField (reg2[0..7]), then the group of
        # EgressMetric (client_test.go:2947 shows the same for IngressRule)
        flow("AntreaPolicyEgressRule", f"priority=14499,ip,nw_src={source},"
                                       f"actions=conjunction({rule_id},1/2)", np_cookie),
        flow("AntreaPolicyEgressRule", f"priority=14499,ip,nw_dst={destination},"
                                       f"actions=conjunction({rule_id},2/2)", np_cookie),
        flow("AntreaPolicyEgressRule",
             f"priority=14499,conj_id={rule_id},ip,actions=set_field:{rule_id:#x}->reg3,"
             f"set_field:{DENY_MARK}->reg0,set_field:{DISPOSITION_DROP}->reg0,"
             f"set_field:{operations(LOGGING)}->reg0,"
             f"set_field:{t['AntreaPolicyEgressRule']:#x}/0xff->reg2,"
             f"group:{GROUPS['EgressMetric']}", np_cookie),
        flow("AntreaPolicyEgressRule", f"priority=0,actions=goto_table:{t['EgressRule']}"),
        flow("EgressRule", f"priority=0,actions=goto_table:{t['EgressDefaultRule']}"),
        flow("EgressDefaultRule", f"priority=0,actions=goto_table:{t['EgressMetric']}"),
        # md:1309 the rule's metric flow drops what the rule denied
        flow("EgressMetric", f"priority=200,reg0={DENY_MARK},reg3={rule_id:#x},actions=drop",
             np_cookie),
        # md:1310 goes on to L3Forwarding; the lab skips to the ingress stage
        flow("EgressMetric", f"priority=0,actions=goto_table:{t['AntreaPolicyIngressRule']}"),
        flow("AntreaPolicyIngressRule", f"priority=0,actions=goto_table:{t['IngressRule']}"),
        flow("IngressRule", f"priority=0,actions=goto_table:{t['IngressDefaultRule']}"),
        flow("IngressDefaultRule", f"priority=0,actions=goto_table:{t['IngressMetric']}"),
        flow("IngressMetric", f"priority=0,actions=goto_table:{t['ConntrackCommit']}"),
        flow("ConntrackCommit", f"priority=0,actions=goto_table:{t['Output']}"),
        # md:1891 "priority=0 actions=drop"; md:1887 outputs to reg1's port: here NORMAL
        flow("Output", "priority=0,actions=NORMAL"),
    ]
    for address in isolated:
        # md:1806 "priority=200,reg1=0x25 actions=drop", with logging: client_test.go:2948
        # (disposition, operations, OutputToController, PacketInTableField, Output). No
        # deny mark and no reg3: a K8s NetworkPolicy default drop has no rule id.
        flows.append(flow(
            "IngressDefaultRule",
            f"priority=200,ip,nw_dst={address},actions=set_field:{DISPOSITION_DROP}->reg0,"
            f"set_field:{operations(LOGGING)}->reg0,set_field:{OUTPUT_TO_CONTROLLER}->reg0,"
            f"set_field:{t['IngressDefaultRule']:#x}/0xff->reg2,goto_table:{t['Output']}",
            np_cookie))
    # network_policy.go initLoggingFlows / loggingNPPacketFlowWithOperations, md:1888-1889:
    # one flow per operations value 1..7, meter 256 then the controller with userdata 01.ops
    for ops in range(1, 8):
        flows.append(flow(
            "Output", f"priority=200,reg0={ops << 25 | 0x400000:#x}/0xfe600000,actions="
            f"meter:{NP_METER},controller(reason=no_match,id={controller_id},"
            f"userdata={NETWORK_POLICY:02x}.{ops:02x})", np_cookie))
    return groups, flows


class AntreaAgent:
    """The controller process's state and OpenFlow work."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.mgmt = f"{args.run_dir}/{args.bridge}.mgmt"
        self.controller_id = random.choice(
            [i for i in range(1, 0x10000) if i != 0x6F66])  # not ovsflow's own id
        self.round = 0
        self.packet_ins = 0
        self.ready = False

    def vsctl(self, *words: str) -> str:
        return subprocess.run(["ovs-vsctl", f"--db=unix:{self.args.run_dir}/db.sock", *words],
                              capture_output=True, text=True, check=True).stdout.strip()

    def ofctl(self, command: str, lines: list[str]) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as file:
            file.write("\n".join(lines) + "\n")
            file.flush()
            subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", command, self.mgmt, file.name],
                           capture_output=True, text=True, check=True)

    def write_status(self) -> None:
        path = Path(self.args.status)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({
            "pid": os.getpid(), "controller_id": self.controller_id, "round": self.round,
            "packet_ins": self.packet_ins, "ready": self.ready}))
        temporary.replace(path)

    async def run(self) -> None:
        connection = await OpenFlowConnection.open_unix(self.mgmt, versions=(m.OFP13,))
        v = connection.version
        await connection.transact([
            lambda xid: m.set_config(xid, miss_send_len=128, version=v),
            lambda xid: m.set_controller_id(xid, self.controller_id, version=v),
            lambda xid: m.set_packet_in_format(xid, m.NXPIF_NXT_PACKET_IN2, version=v)])
        saved = self.vsctl("--if-exists", "get", "Bridge", self.args.bridge,
                           "external_ids:roundNum").strip('"')
        previous = int(saved) if saved else 0
        self.round = previous % 0xFFFF + 1
        await connection.transact([  # Initialize: this round's flows, if any, go first
            lambda xid: m.flow_mod(xid, version=v, command=m.OFPFC_DELETE,
                                   table_id=m.OFPTT_ALL, cookie=self.round << 48,
                                   cookie_mask=ROUND_MASK)])
        await connection.transact([  # initialize: DeleteGroupAll, DeleteMeterAll
            lambda xid: m.group_mod(xid, version=v, command=m.OFPGC_DELETE,
                                    group_id=m.OFPG_ALL),
            lambda xid: m.meter_mod(xid, version=v, command=m.OFPMC_DELETE,
                                    meter_id=m.OFPM_ALL, flags=0, bands=[])])
        await self.name_tables(connection)
        await connection.transact([  # client.go initialize: the packet-in meters
            lambda xid: m.meter_mod(xid, version=v, command=m.OFPMC_ADD, meter_id=NP_METER,
                                    flags=m.OFPMF_PKTPS | m.OFPMF_BURST,
                                    bands=[(m.OFPMBT_DROP, NP_RATE, 2 * NP_RATE)])])
        groups, flows = pipeline(self.controller_id, self.round, self.args.rule_id,
                                 *self.args.egress_deny, self.args.isolated)
        self.ofctl("add-groups", groups)
        self.ofctl("add-flows", flows)
        self.ready = True
        self.write_status()
        stale = asyncio.get_running_loop().call_later(
            self.args.stale_after, lambda: asyncio.ensure_future(
                self.delete_stale_flows(connection, previous)))
        loop, pending = asyncio.get_running_loop(), None
        try:
            while (message := await connection.events.get()) is not None:
                if isinstance(message, m.PacketIn) and message.userdata[:1] == bytes(
                        (NETWORK_POLICY,)):
                    self.packet_ins += 1
                    if pending is None or pending.cancelled() or pending.when() < loop.time():
                        # the count is written 50 ms after a packet-in, not for each one
                        pending = loop.call_later(0.05, self.write_status)
        finally:
            stale.cancel()

    async def delete_stale_flows(self, connection: OpenFlowConnection, previous: int) -> None:
        """agent.go: the previous round's flows go, then the round is saved."""
        if previous:
            await connection.transact([
                lambda xid: m.flow_mod(xid, version=connection.version,
                                       command=m.OFPFC_DELETE, table_id=m.OFPTT_ALL,
                                       cookie=previous << 48, cookie_mask=ROUND_MASK)])
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


class AntreaStandIn:
    """The stand-in's process, for tests and the demo; `restart()` plays an agent restart."""

    def __init__(self, run_dir: str, bridge: str, status: Path, rule_id: int, source: str,
                 destination: str, isolated: list[str], stale_after: float = 0.0):
        self.status_path = status
        self.command = [sys.executable, "-m", "lab.antrea", "--run-dir", run_dir, "--bridge",
                        bridge, "--status", str(status), "--rule-id", str(rule_id),
                        "--egress-deny", source, destination, "--stale-after",
                        str(stale_after), "--isolated", *isolated]
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self, timeout: float = 20.0) -> dict:
        self.status_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(self.command, cwd=Path(__file__).resolve().parent.parent,
                                        stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while not (self.status_path.exists() and self.status()["ready"]):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Antrea stand-in did not start: "
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
    parser.add_argument("--rule-id", type=int, default=5, help="the egress rule's conj_id")
    parser.add_argument("--egress-deny", nargs=2, metavar=("SRC", "DST"), required=True)
    parser.add_argument("--isolated", nargs="*", default=[],
                        help="addresses a K8s NetworkPolicy isolates for ingress")
    parser.add_argument("--stale-after", type=float, default=0.0,
                        help="seconds until the previous round's flows go (Antrea: >= 10)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(AntreaAgent(args).run())


if __name__ == "__main__":
    main()
