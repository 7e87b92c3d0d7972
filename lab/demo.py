"""The demo: a small node, traffic of five protocols allowed and denied, ovsflow exporting
only tcp, udp and icmp, and the records as a collector received them.

    python -m lab.demo        (as root; scripts/demo installs what it needs first)

The world it builds, all in network namespaces it deletes at the end:
  - Open vSwitch with the userspace datapath (no kernel module) and three Pods (demo/pod1,
    demo/pod2, demo/pod3) on a bridge, their Ports carrying the external_ids Antrea's CNI
    writes; two more ports without them stand for a Pod on another node ("remote", inside the
    cluster's Pod CIDR 10.60.0.0/25) and an address outside the cluster ("external").
    An Antrea-like pipeline sends allowed IP traffic through ct(commit,zone=65520), with the
    allowing NetworkPolicy rules' ids in ct_label where Antrea puts them (ingress rule 12 of
    pod2, egress rules 11 and 13 of pod1); pod3's packets to pod2 are denied by "rule 7" and
    resubmitted to ovsflow's deny table.
  - A kernel-conntrack path on the same node (iptables CT zone 65520), so that records with
    real packet and byte counts appear too; its connections are labelled with egress rule 21
    (iptables connlabel, one bit per label).
  - Two agents (one per conntrack source; the first also runs the deny path) and
    `ovsflow collect`, all exporting to and listening on the node's loopback.
Then, briefly, the Antrea mode (`ovs.denySource: antrea`, docs/antrea.md): a second Open
vSwitch whose bridge speaks OpenFlow 1.0 and 1.5 only, as a real Antrea node's, an agent
that installs nothing and reads Antrea's own packet-ins, started first, and lab/antrea.py's
stand-in for Antrea's agent, which names its tables late and restarts once: Antrea-native
egress drops (IPv4 and IPv6, logged), a Reject without logging, an ingress drop after an
egress allow, and a Kubernetes NetworkPolicy's default drop of traffic to a DNS Service.

One file of a little over 400 lines on purpose: a newcomer reads the demo top to bottom as
the story of one node, and its pieces (lab/ovs_lab.py, lab/antrea.py) live elsewhere.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from .antrea import AntreaStandIn, route_services_via_gateway
from .antrea_pipeline import SCENARIO, SERVICE_IP
from .netns import LAB, PYTHON, Netns, veth_pair
from .ovs_lab import CONNTRACK_PIPELINE, OvsLab, commit_with_rules

OVSFLOW = shutil.which("ovsflow", path=str(Path(sys.executable).parent)) or "ovsflow"
PROTOCOLS = "[tcp, udp, 1]"
DENY_TABLE = 250
DENY_TOTALS = 270  # the deny totals' template (docs/ipfix.md)
NAMES = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 132: "sctp"}
REASONS = {1: "idle", 2: "active", 3: "end", 4: "shutdown"}
FLOW_TYPES = {1: "intra-node", 2: "inter-node", 3: "to-external", 4: "from-external"}
POD_NAMESPACE = "demo"
# (client, server, ingress rule id, egress rule id) committed into ct_label
ALLOWING_RULES = [("pod1", "pod2", 12, 11), ("pod1", "remote", 0, 11),
                  ("pod1", "external", 0, 13), ("external", "pod2", 12, 0)]
KERNEL_EGRESS_RULE = 21
ANTREA_PROTOCOLS = "[web, udp]"  # web, a predefined group: tcp/80, tcp/443, udp/443
ANTREA_PODS = [("10.62.0.1/24", "client", "shop"), ("10.62.0.2/24", "server", "shop"),
               ("10.62.0.3/24", "web", "shop"), ("10.62.0.4/24", "dns", "kube-system"),
               ("10.62.0.5/24", "vault", "vault"), ("fd00:62::1/64", "client6", "shop"),
               ("fd00:62::2/64", "server6", "shop")]


def agent_config(directory: Path, name: str, source: str, bridge: str, run_dir: str,
                 metrics: str = "", deny_source: str = "table",
                 protocols: str = PROTOCOLS) -> str:
    path = directory / f"{name}.yaml"
    path.write_text(f"""
flowExporter:
  flowCollectorAddr: "127.0.0.1:4739:udp"
  flowPollInterval: 1s
  activeFlowExportTimeout: 30s
  idleFlowExportTimeout: 30s
  protocols: {protocols}
conntrack:
  source: {source}
  zones: [65520]
ovs:
  runDir: {run_dir}
  bridge: "{bridge}"
  denyTable: {DENY_TABLE}
  denySource: {deny_source}
ipfix:
  nodeName: {name}
  clusterPodCIDRs: ["10.60.0.0/25"]
metrics:
  bindAddress: "{metrics}"
state:
  directory: "{directory}/state"
""")
    return str(path)


def build_world(run_dir: Path) -> tuple[OvsLab, Netns, Netns]:
    """OVS (run directory `run_dir`) with pods and the Antrea-like pipeline, and the kernel
    path: (lab, node, peer). The node is the namespace OVS runs in; pod3 > pod2 is denied by
    rule 7. lab.pods: pod1, pod2, pod3, remote, external."""
    lab = OvsLab(run_dir)
    peer = None
    try:
        for index in (1, 2, 3):
            lab.add_pod(f"10.60.0.{index}/24", namespace=POD_NAMESPACE)
        lab.add_pod("10.60.0.50/24", pod=False)
        lab.add_pod("10.60.0.200/24", pod=False)
        pod1, pod2, pod3, remote, external = lab.pods
        ends = {"pod1": pod1, "pod2": pod2, "remote": remote, "external": external}
        for flow in CONNTRACK_PIPELINE:
            lab.ofctl("add-flow", flow)
        for client, server, ingress, egress in ALLOWING_RULES:
            lab.ofctl("add-flow", commit_with_rules(
                f"nw_src={ends[client].address},nw_dst={ends[server].address}", ingress,
                egress))
        lab.ofctl("add-flow", f"table=0,priority=100,ip,in_port={lab.ofport(pod3)},"
                              f"nw_dst={pod2.address},actions=load:7->NXM_NX_REG3[],"
                              f"resubmit(,{DENY_TABLE})")
        node = lab.host
        peer = Netns("peer")
        veth_pair(node, peer, "10.61.0.1/24", "10.61.0.2/24")
        node.address, peer.address = "10.61.0.1", "10.61.0.2"
        # Track the node's traffic in zone 65520, but not loopback: that is where the agents
        # send their IPFIX, and the demo should not export its own export.
        node.run("iptables", "-t", "raw", "-A", "OUTPUT", "!", "-o", "lo", "-j", "CT",
                 "--zone", "65520")
        node.run("iptables", "-t", "raw", "-A", "PREROUTING", "!", "-i", "lo", "-j", "CT",
                 "--zone", "65520")
        # Antrea's egress rule id in ct_label bits 32-63: connlabel sets one bit per label
        for bit in range(KERNEL_EGRESS_RULE.bit_length()):
            if KERNEL_EGRESS_RULE >> bit & 1:
                node.run("iptables", "-t", "mangle", "-A", "OUTPUT", "!", "-o", "lo", "-m",
                         "connlabel", "--label", str(32 + bit), "--set")
        return lab, node, peer
    except BaseException:
        if peer is not None:
            peer.delete()
        lab.stop()
        raise


def traffic(lab: OvsLab, node: Netns, peer: Netns) -> None:
    pod1, pod2, pod3, remote, external = lab.pods
    for client, server, port in ((pod1, pod2, 8080), (node, peer, 8081)):
        listener = server.popen(PYTHON, "-u", str(LAB / "traffic.py"), "tcp-server", str(port),
                                "20000", stdout=subprocess.PIPE, text=True)
        listener.stdout.readline()
        client.traffic("tcp-client", server.address, str(port), "30000", "1", "0")
        listener.wait(timeout=30)
    for client, server in ((pod1, pod2), (pod3, pod2), (node, peer)):
        client.traffic("udp", server.address, "5353", "4", "200")
        client.run("ping", "-c", "3", "-i", "0.2", "-W", "1", server.address, check=False)
        client.traffic("sctp-init", client.address, server.address, "5000", "6000")
        client.traffic("gre", client.address, server.address)
    pod3.traffic("tcp-syn", pod2.address, "80")
    for client, server in ((pod1, remote), (pod1, external), (external, pod2)):
        client.traffic("udp", server.address, "5353", "2", "100")


def conntrack_protocols(directory: Path, source: str, bridge: str, run_dir: str,
                        node: Netns) -> dict[str, int]:
    """What the conntrack source held, every protocol: `ovsflow conntrack` unfiltered."""
    config = Path(agent_config(directory, f"all-{source}", source, bridge, run_dir))
    config.write_text(config.read_text().replace(f"protocols: {PROTOCOLS}", "protocols: []"))
    output = node.run(OVSFLOW, "conntrack", "--config", str(config), "--log-level",
                      "error").stdout
    counts: dict[str, int] = {}
    for line in output.splitlines():
        entry = json.loads(line)
        if entry["destination"].startswith("127."):
            continue
        name = NAMES.get(entry["protocol"], str(entry["protocol"]))
        counts[name] = counts.get(name, 0) + 1
    return counts


def rules(record: dict) -> str:
    """The NetworkPolicy rules named in a record, e.g. `in:12,out:11`; `-` for none."""
    named = [f"{direction}:{record[f'{key}NetworkPolicyRuleName']}"
             for direction, key in (("in", "ingress"), ("out", "egress"))
             if record.get(f"{key}NetworkPolicyRuleName")]
    return ",".join(named) or "-"


def pod(record: dict, end: str) -> str:
    """`namespace/name@node` of the record's source or destination Pod; `-` if not a Pod's."""
    name = record.get(f"{end}PodName")
    if not name:
        return "-"
    return f"{record.get(f'{end}PodNamespace')}/{name}@{record.get(f'{end}NodeName')}"


def show(records: list[dict], domains: dict[int, str], drops: int,
         held: dict[str, dict[str, int]]) -> None:
    totals = [r for r in records if r["_templateId"] == DENY_TOTALS]
    records = [r for r in records if r["_templateId"] != DENY_TOTALS]
    rows = []
    for r in records:
        template = r["_templateId"]
        verdict = "deny" if template in (260, 261) else "allow"
        layer = "deny path" if verdict == "deny" else f"conntrack ({domains.get(r['_observationDomainId'], '?')})"
        src = r.get("sourceIPv4Address") or r.get("sourceIPv6Address")
        dst = r.get("destinationIPv4Address") or r.get("destinationIPv6Address")
        protocol = r["protocolIdentifier"]
        ports = (f"type {r.get('icmpTypeIPv4', 0)}" if protocol == 1
                 else f"{r['sourceTransportPort']} > {r['destinationTransportPort']}")
        packets = r.get("packetTotalCount", "-")
        octets = r.get("octetTotalCount", "-")
        rows.append((layer, NAMES.get(protocol, str(protocol)), f"{src} > {dst}", ports,
                     str(packets), str(octets), REASONS.get(r["flowEndReason"], "?"), verdict,
                     rules(r), FLOW_TYPES.get(r.get("flowType", 0), "-"),
                     pod(r, "source"), pod(r, "destination")))
    header = ("layer", "proto", "addresses", "ports", "packets", "bytes", "end", "verdict",
              "rules", "flow-type", "source-pod", "destination-pod")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    seen = sorted({NAMES.get(r["protocolIdentifier"], "?") for r in records})
    print(f"\n{len(records)} records; protocols configured: {PROTOCOLS}; exported: "
          f"{', '.join(seen)}.")
    for source, counts in held.items():
        held_text = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
        left_out = sorted(set(counts) - set(seen))
        print(f"Conntrack layer ({source}): the table held {held_text}; filtered out: "
              f"{', '.join(left_out) or 'nothing'}"
              + (" (the kernel's dumps were filtered by protocol)" if source == "kernel" else
                 " (by the poller's filter)"))
    print(f"Deny layer: {drops} denied packets of other protocols were dropped by the deny "
          "table's flows in the datapath and never reached ovsflow as packet-ins.")
    denied = {}
    for r in totals:
        name = NAMES.get(r["protocolIdentifier"], str(r["protocolIdentifier"]))
        key = f"{name}{'6' if r['ipVersion'] == 6 else ''}"
        denied[key] = denied.get(key, 0) + r["packetDeltaCount"]
    print("Deny totals (template 270, every packet the deny flows matched, meter or not): "
          + (", ".join(f"{key} {count}" for key, count in sorted(denied.items()))
             or "none") + ".")
    print("OVS userspace conntrack keeps no counters: its records show '-' for packets and "
          "bytes.")
    print("Rules: the NetworkPolicy rule ids of allowed connections come from the conntrack "
          "labels the pipeline committed; denied ones from the deny flow (reg3). Pods: from "
          "the Ports' external_ids in OVSDB.")


def antrea_mode(workdir: Path) -> bool:
    """The second act: ovsflow beside the stand-in for Antrea on a node's bridge (OpenFlow
    1.0 and 1.5 only); ovsflow starts first, Antrea names its tables late and later
    restarts; True if the records came and ovsflow did its part."""
    lab = antrea = None
    try:
        lab = OvsLab(workdir / "antrea")  # OpenFlow10,OpenFlow15, as antrea-agent sets br-int
        pods = {name: lab.add_pod(address, name=name, namespace=namespace)
                for address, name, namespace in ANTREA_PODS}
        route_services_via_gateway(pods["client"])
        node = lab.host
        collector = node.popen(OVSFLOW, "collect", "--listen", "udp://127.0.0.1:4739",
                               "--timeout", "90", stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        collector.stderr.readline()
        config = agent_config(workdir, "node-antrea", "ovs", lab.bridge, lab.run_dir,
                              deny_source="antrea", protocols=ANTREA_PROTOCOLS)
        agent = node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.PIPE,
                           text=True)
        time.sleep(1)  # ovsflow is connected first, as at a node's boot
        antrea = AntreaStandIn(lab.run_dir, lab.bridge, workdir / "antrea.json",
                               SCENARIO, name_tables_after=2)
        first = antrea.wait_until("named")
        time.sleep(1.5)  # ovsflow learns Antrea's id from its flows, then the names
        antrea_traffic(pods, 5353)
        time.sleep(0.5)
        counted = antrea.status()
        lab.appctl("revalidator/wait")  # the datapath's counters reach the flows
        sent = sum(int(n) for n in re.findall(r"n_packets=(\d+),.*userdata=01\.",
                                               lab.ofctl("dump-flows")))
        restarted = antrea.restart()
        antrea.wait_until("named")
        time.sleep(2)
        pods["client"].traffic("udp", pods["server"].address, "5354", "1", "100")
        time.sleep(0.5)
        installed = "cookie=0x6f7673666c6f7700" in lab.ofctl("dump-flows")
        agent.send_signal(signal.SIGTERM)
        log = agent.communicate(timeout=30)[1]
        time.sleep(0.5)
        collector.terminate()
        records = [record for line in collector.communicate(timeout=30)[0].splitlines()
                   if (record := json.loads(line))["_templateId"] in (260, 261)]  # denied
    finally:
        if antrea is not None:
            antrea.stop()
        if lab is not None:
            lab.stop()
    print("\nAntrea mode (ovs.denySource: antrea), beside a stand-in for Antrea's agent on a "
          "bridge at OpenFlow 1.0+1.5:")
    header = ("proto", "addresses", "ports", "packets", "ingress", "egress", "source-pod",
              "destination-pod")
    rows = [header]
    action = {2: "drop", 3: "reject"}
    for r in records:
        source = r.get("sourceIPv4Address") or r.get("sourceIPv6Address")
        destination = r.get("destinationIPv4Address") or r.get("destinationIPv6Address")
        rows.append((NAMES.get(r["protocolIdentifier"], "?"), f"{source} > {destination}",
                     f"{r['sourceTransportPort']} > {r['destinationTransportPort']}",
                     str(r["packetTotalCount"]),
                     *(f"{action[r[f'{d}NetworkPolicyRuleAction']]}:"
                       f"{r[f'{d}NetworkPolicyRuleName'] or 'k8s-default'}"
                       if r.get(f"{d}NetworkPolicyRuleAction") else "-"
                       for d in ("ingress", "egress")),
                     pod(r, "source"), pod(r, "destination")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    followed = (f"Antrea's controller id is {restarted['controller_id']} (was "
                f"{first['controller_id']})") in log
    taken = re.search(r"deny path: (\d+) packet-ins taken", log)
    print(f"ovsflow started first and spoke OpenFlow "
          f"{'1.5' if '(OpenFlow 1.5)' in log else '?'}; Antrea named its tables 2 s after "
          f"its flows. Antrea's controller took {counted['packet_ins']} NetworkPolicy "
          f"packet-ins in its first run, every one its flows sent ({sent}); ovsflow took its "
          f"own copies ({taken.group(1) if taken else '?'} denied packets in both runs), "
          + ("installed flows (it should not)" if installed else "installed nothing")
          + ", and " + (f"followed the restarted agent to controller id "
                        f"{restarted['controller_id']}." if followed
                        else "did NOT follow the restarted agent."))
    print(f"Protocols configured: {ANTREA_PROTOCOLS}: the icmp pings were denied too, and "
          "filtered out in userspace. Rule ids are Antrea's conjunction ids; k8s-default: "
          "a Kubernetes NetworkPolicy's default drop, here of traffic to the DNS Service "
          f"{SERVICE_IP} (recorded with its Endpoint, kube-system/dns: the packet was "
          "DNAT-ed before the policy stages); 9 is a Reject without logging, 4 an ingress "
          "drop after the egress rule 7 allowed and committed the connection.")
    return bool(records) and followed and not installed


def antrea_traffic(pods: dict, port: int) -> None:
    client = pods["client"]
    client.traffic("udp", pods["server"].address, str(port), "3", "100")  # egress drop
    client.traffic("udp", pods["web"].address, "8080", "2", "100")  # allowed, then ingress
    client.traffic("udp", SERVICE_IP, "53", "2", "100")  # K8s default drop
    client.traffic("udp", pods["vault"].address, "5355", "2", "100")  # reject
    client.run("ping", "-c", "2", "-i", "0.2", "-W", "1", pods["server"].address,
               check=False)
    pods["client6"].run(PYTHON, "-c", "import socket; s = socket.socket(socket.AF_INET6, "
                        "socket.SOCK_DGRAM); [s.sendto(b'u' * 100, ('fd00:62::2', 5356)) "
                        "for _ in range(2)]")


def main() -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="ovsflow-demo-"))
    lab = node_peer = collector = None
    agents: list[subprocess.Popen] = []
    try:
        print("Building the lab: Open vSwitch (userspace datapath), 3 pods, a kernel path ...")
        lab, node, node_peer = build_world(workdir / "ovs")
        collector = node.popen(OVSFLOW, "collect", "--listen", "udp://127.0.0.1:4739",
                               "--timeout", "120", stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        collector.stderr.readline()
        for name, source, bridge, metrics in (
                ("node-ovs", "ovs", lab.bridge, "127.0.0.1:9495"),
                ("node-kernel", "kernel", "", "127.0.0.1:9496")):
            config = agent_config(workdir, name, source, bridge, lab.run_dir, metrics)
            agents.append(node.popen(OVSFLOW, "run", "--config", config,
                                     stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 20
        while "cookie=0x6f7673666c6f7700" not in lab.ofctl("dump-flows", f"table={DENY_TABLE}"):
            if time.monotonic() > deadline:
                raise RuntimeError("ovsflow did not install its deny flows")
            time.sleep(0.2)
        time.sleep(1)  # the kernel agent has switched conntrack accounting on

        print("Sending tcp, udp, icmp, sctp and gre: allowed (pod1 > pod2, node > peer) and "
              "denied (pod3 > pod2); udp between the pods, 'remote' and 'external' ...")
        traffic(lab, node, node_peer)
        time.sleep(2.5)  # a couple of polls
        held = {source: conntrack_protocols(workdir, source, bridge, lab.run_dir, node)
                for source, bridge in (("kernel", ""), ("ovs", lab.bridge))}
        drop_flow = [line for line in lab.ofctl("dump-flows", f"table={DENY_TABLE}")
                     .splitlines() if "priority=0" in line and "cookie=0x6f7673" in line]
        drops = int(re.search(r"n_packets=(\d+)", drop_flow[0]).group(1)) if drop_flow else 0
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
        for agent in agents:
            agent.wait(timeout=30)
        time.sleep(0.5)
        collector.terminate()
        output, _ = collector.communicate(timeout=30)
        records = [record for line in output.splitlines()
                   if not (record := json.loads(line)).get("_options")]  # flow records
        domains = {zlib.crc32(name.encode()): source for name, source in
                   (("node-ovs", "ovs"), ("node-kernel", "kernel"))}
        print()
        show(records, domains, drops, held)
        antrea_ok = antrea_mode(workdir)
        print(f"\nDone in {time.monotonic() - started:.0f}s; cleaning up.")
        return 0 if records and antrea_ok else 1
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
        if collector is not None and collector.poll() is None:
            collector.kill()
        if node_peer is not None:
            node_peer.delete()
        if lab is not None:
            lab.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
