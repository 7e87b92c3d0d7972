"""The flows a stand-in Antrea agent (`lab/antrea.py`) installs: Antrea's pipeline, its
registers, marks and cookies, for the Pods on the bridge and a scenario's policies and
Services.

Built from antrea-io/antrea at fc70f2bb7037f398196fd42210d34800cb6aa398 (v2.8 development;
v2.7.0 and v2.6.3 agree on all of it): the flows are docs/design/ovs-pipeline.md's dumps
("md:LINE" below) with this lab's addresses, ports and ids; pkg/agent/openflow/ (fields.go:
registers; pipeline.go: tables, dispositions, conjunctionActionDenyFlow, defaultDropFlow,
ipv6Flows; network_policy.go: logging flows and groups; cookie/allocator.go).

The tables are those of a dual-stack Linux agent with AntreaPolicy and AntreaProxy (no
proxyAll), numbered as client.go generatePipelines does. Differences from Antrea, for the
lab: ARP is switched NORMAL at the root (Antrea's ARP pipeline ends in NORMAL too,
md:729); there is no gateway, tunnel or uplink port, so the routing tables between
L3Forwarding and L2ForwardingCalc are skipped and Pods reach a Service through a static
neighbour for the gateway's MAC (`antrea.route_services_via_gateway`); Services are IPv4 only;
the agent itself sends no reject responses.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


# A dual-stack Linux agent's tables (pipeline.go:111-196, numbered by generatePipelines):
# IPv6 follows SpoofGuard when IPv6 is on (pipeline.go IPv6Table, ipv6Flows)
TABLES = dict(enumerate([
    "PipelineRootClassifier", "ARPSpoofGuard", "ARPResponder", "Classifier", "SpoofGuard",
    "IPv6", "UnSNAT", "ConntrackZone", "ConntrackState", "PreRoutingClassifier",
    "SessionAffinity", "ServiceLB", "EndpointDNAT", "AntreaPolicyEgressRule", "EgressRule",
    "EgressDefaultRule", "EgressMetric", "L3Forwarding", "EgressMark", "L3DecTTL", "SNATMark",
    "SNAT", "L2ForwardingCalc", "IngressSecurityClassifier", "AntreaPolicyIngressRule",
    "IngressRule", "IngressDefaultRule", "IngressMetric", "ConntrackCommit", "Output"]))
TABLE = {name: table for table, name in TABLES.items()}
PROTOCOLS = "OpenFlow10,OpenFlow15"  # ovs_client.go: the bridge's Protocols

# cookie/allocator.go: round (16 bits) | category (8 bits) | reserved | object id
ROUND_MASK = 0xFFFF << 48
CATEGORY_DEFAULT, CATEGORY_POD, CATEGORY_NETWORK_POLICY, CATEGORY_SERVICE = 0, 1, 2, 3

# fields.go and pipeline.go
FROM_POD = "0x3/0xf"  # FromPodRegMark, reg0[0..3]
FROM_LOCAL = "0x10000000/0x10000000"  # FromLocalRegMark, reg4[28]
REWRITE_MAC = "0x200/0x200"  # RewriteMACRegMark, reg0[9]
DENY_BIT = 1 << 10  # APDenyRegMark, reg0[10]
DENY_MARK = f"{DENY_BIT:#x}/{DENY_BIT:#x}"
DISPOSITIONS = {"drop": "0x800/0x1800", "reject": "0x1000/0x1800"}  # APDispositionField
OUTPUT_TO_PORT = "0x200000/0x600000"  # OutputToOFPortRegMark, reg0[21..22] = 1
OUTPUT_TO_CONTROLLER = "0x400000/0x600000"  # OutputToControllerRegMark, reg0[21..22] = 2
EP_TO_SELECT, EP_SELECTED = "0x10000/0x70000", "0x20000/0x70000"  # ServiceEPStateField
SERVICE_CT_MARK = "0x10/0x10"  # ServiceCTMark
CT_ZONES = {4: 65520, 6: 65510}  # CtZone, CtZoneV6
# packetin.go: the operations in userdata byte 1 and reg0[25..31]
LOGGING, REJECT, STORE_DENY = 0b1, 0b10, 0b100
NETWORK_POLICY = 1  # packet-in category (userdata byte 0)
NP_METER, TF_METER, DNS_METER = 256, 257, 258  # client.go:906-914
PACKET_IN_RATE = 5000  # packetInRate's default (cmd/antrea-agent/options.go:65)
GATEWAY_MAC = "ba:5e:d1:55:aa:c0"  # the local gateway's in md's dumps (md:1342)
SERVICE_CIDR = "10.96.0.0/12"
# network_policy.go initGroups: one group per table a logged packet goes on to, from 1
GROUPS = {"EgressRule": 1, "EgressMetric": 2, "IngressRule": 3, "IngressMetric": 4}
FIRST_SERVICE_GROUP = 10
SERVICE_IP = "10.96.0.10"  # a ClusterIP, as kube-dns's
# The demo's and the tests' node: an Application-tier policy's rules by priority, a
# Kubernetes NetworkPolicy isolating shop/client for egress in a Namespace annotated for
# logging, and a DNS Service whose Endpoint is kube-system/dns
SCENARIO = {
    "rules": [
        {"id": 7, "direction": "egress", "action": "allow", "from": ["client"], "to": ["web"]},
        {"id": 5, "direction": "egress", "action": "drop", "from": ["client"],
         "to": ["server"], "logging": True},
        {"id": 9, "direction": "egress", "action": "reject", "from": ["client"],
         "to": ["vault"]},
        {"id": 6, "direction": "egress", "action": "drop", "from": ["client6"],
         "to": ["server6"], "logging": True},
        {"id": 4, "direction": "ingress", "action": "drop", "from": ["client"],
         "to": ["web"], "logging": True}],
    "isolated": [{"pod": "client", "direction": "egress", "logging": True}],
    "services": [{"ip": SERVICE_IP, "protocol": "udp", "port": 53, "endpoints": ["dns"]}],
}


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    addresses: tuple[str, ...]
    mac: str
    ofport: int

    def of_family(self, family: int) -> list[str]:
        return [a for a in self.addresses if ipaddress.ip_address(a).version == family]


def operations(ops: int) -> str:
    """PacketInOperationField reg0[25..31] (the flows use mask 0xfe000000)."""
    return f"{ops << 25:#x}/0xfe000000"


def ip_match(family: int, end: str, address: str) -> str:
    return (f"ip,nw_{end}={address}" if family == 4 else f"ipv6,ipv6_{end}={address}")


class Pipeline:
    """The groups and flows (ovs-ofctl -O OpenFlow15 text) of one round of the agent."""

    def __init__(self, controller_id: int, round_number: int, pods: dict[str, Pod],
                 scenario: dict):
        self.controller_id, self.round, self.pods = controller_id, round_number, pods
        self.scenario = scenario
        self.deny_tracking = bool(scenario.get("denyTracking"))
        self.groups: list[str] = []
        self.flows: list[str] = []

    def flow(self, table: str, rest: str, category: int = CATEGORY_DEFAULT,
             object_id: int = 0) -> None:
        cookie = self.round << 48 | category << 40 | object_id
        self.flows.append(f"cookie={cookie:#x},table={TABLE[table]},{rest}")

    def build(self) -> Pipeline:
        self.root_and_validation()
        self.conntrack_and_services()
        self.network_policy()
        self.forwarding()
        self.output()
        return self

    def root_and_validation(self) -> None:
        t = TABLE
        # md:684-686; ARP: md:729 (the lab skips ARPSpoofGuard and ARPResponder)
        self.flow("PipelineRootClassifier", "priority=200,arp,actions=NORMAL")
        for proto in ("ip", "ipv6"):
            self.flow("PipelineRootClassifier",
                      f"priority=200,{proto},actions=goto_table:{t['Classifier']}")
        self.flow("PipelineRootClassifier", "priority=0,actions=drop")
        for pod in self.pods.values():
            # md:779-781 Pods' ports; md:844-846 their addresses
            self.flow("Classifier", f"priority=190,in_port={pod.ofport},actions=set_field:"
                      f"{FROM_POD}->reg0,set_field:{FROM_LOCAL}->reg4,"
                      f"goto_table:{t['SpoofGuard']}", CATEGORY_POD)
            for address in pod.addresses:
                family = ipaddress.ip_address(address).version
                self.flow("SpoofGuard", f"priority=200,{ip_match(family, 'src', address)},"
                          f"in_port={pod.ofport},dl_src={pod.mac},actions=goto_table:"
                          f"{t['IPv6'] if family == 6 else t['UnSNAT']}", CATEGORY_POD)
        self.flow("Classifier", "priority=0,actions=drop")  # md:782
        self.flow("SpoofGuard", "priority=0,actions=drop")  # md:847
        # pipeline.go ipv6Flows: link-local sources, neighbour discovery and multicast
        self.flow("SpoofGuard", f"priority=200,ipv6,ipv6_src=fe80::/10,"
                                f"actions=goto_table:{t['IPv6']}", CATEGORY_POD)
        for icmp_type in (135, 136):
            self.flow("IPv6", f"priority=200,icmp6,icmp_type={icmp_type},icmp_code=0,"
                              "actions=NORMAL", CATEGORY_POD)
        self.flow("IPv6", "priority=200,ipv6,ipv6_dst=ff00::/8,actions=NORMAL", CATEGORY_POD)
        self.flow("IPv6", f"priority=0,actions=goto_table:{t['UnSNAT']}")

    def conntrack_and_services(self) -> None:
        t = TABLE
        self.flow("UnSNAT", f"priority=0,actions=goto_table:{t['ConntrackZone']}")  # md:883
        for family, proto in ((4, "ip"), (6, "ipv6")):
            zone = CT_ZONES[family]
            # md:912; md:937-939
            self.flow("ConntrackZone", f"priority=200,{proto},actions=ct(table="
                                       f"{t['ConntrackState']},zone={zone},nat)")
            self.flow("ConntrackState", f"priority=200,ct_state=+inv+trk,{proto},actions=drop")
            self.flow("ConntrackState", f"priority=190,ct_state=-new+trk,ct_mark=0/0x10,{proto},"
                                        f"actions=goto_table:{t['AntreaPolicyEgressRule']}")
            self.flow("ConntrackState", f"priority=190,ct_state=-new+trk,ct_mark=0x10/0x10,"
                                        f"{proto},actions=set_field:{REWRITE_MAC}->reg0,"
                                        f"goto_table:{t['AntreaPolicyEgressRule']}")
        self.flow("ConntrackZone", f"priority=0,actions=goto_table:{t['ConntrackState']}")
        self.flow("ConntrackState", f"priority=0,actions=goto_table:{t['PreRoutingClassifier']}")
        # md:966-967 without NodePortMark (proxyAll off)
        for proto in ("ip", "ipv6"):
            self.flow("PreRoutingClassifier", f"priority=200,{proto},actions=resubmit(,"
                      f"{t['SessionAffinity']}),resubmit(,{t['ServiceLB']})")
        self.flow("PreRoutingClassifier", f"priority=0,actions=goto_table:"
                                          f"{t['SessionAffinity']}")
        # md:1013
        self.flow("SessionAffinity", f"priority=0,actions=set_field:{EP_TO_SELECT}->reg4")
        for index, service in enumerate(self.scenario.get("services", [])):
            self.service(FIRST_SERVICE_GROUP + index, service)
        self.flow("ServiceLB", f"priority=0,actions=goto_table:{t['EndpointDNAT']}")  # md:1061
        # md:1142-1143
        self.flow("EndpointDNAT", f"priority=190,reg4={EP_SELECTED},actions=set_field:"
                                  f"{EP_TO_SELECT}->reg4,resubmit(,{t['ServiceLB']})")
        self.flow("EndpointDNAT", f"priority=0,actions=goto_table:"
                                  f"{t['AntreaPolicyEgressRule']}")

    def service(self, group: int, service: dict) -> None:
        """A ClusterIP Service: ServiceLB picks an Endpoint in a select group that loads its
        address into reg3 (EndpointIPField) and its port into reg4; EndpointDNAT commits
        the connection with the Endpoint as destination (md:1051, md:1108-1110,
        md:1140-1141)."""
        t, proto, port = TABLE, service["protocol"], service["port"]
        target = service.get("targetPort", port)
        buckets = []
        for index, name in enumerate(service["endpoints"]):
            [address] = self.pods[name].of_family(4)
            endpoint = int(ipaddress.ip_address(address))
            buckets.append(f"bucket=bucket_id:{index},weight:100,actions=set_field:"
                           f"{endpoint:#x}->reg3,set_field:{target:#x}/0xffff->reg4,"
                           f"resubmit(,{t['EndpointDNAT']})")
            self.flow("EndpointDNAT", f"priority=200,{proto},reg3={endpoint:#x},"
                      f"reg4={0x20000 | target:#x}/0x7ffff,actions=ct(commit,table="
                      f"{t['AntreaPolicyEgressRule']},zone={CT_ZONES[4]},nat(dst={address}:"
                      f"{target}),exec(set_field:{SERVICE_CT_MARK}->ct_mark))", CATEGORY_SERVICE)
        self.groups.append(f"group_id={group},type=select,{','.join(buckets)}")
        self.flow("ServiceLB", f"priority=200,{proto},reg4={EP_TO_SELECT},nw_dst={service['ip']},"
                  f"tp_dst={port},actions=set_field:{REWRITE_MAC}->reg0,set_field:{EP_SELECTED}"
                  f"->reg4,set_field:{group:#x}->reg7,group:{group}", CATEGORY_SERVICE)

    def network_policy(self) -> None:
        t = TABLE
        for direction in ("Egress", "Ingress"):  # md:1188-1189, md:1691-1692
            for state in ("-new+est", "-new+rel"):
                for proto in ("ip", "ipv6"):
                    self.flow(f"AntreaPolicy{direction}Rule", f"priority=64990,ct_state={state},"
                              f"{proto},actions=goto_table:{t[f'{direction}Metric']}")
        priorities = {"egress": 14500, "ingress": 14600}
        for rule in self.scenario.get("rules", []):
            priorities[rule["direction"]] -= 1
            self.rule(rule, priorities[rule["direction"]])
        for isolated in self.scenario.get("isolated", []):
            self.default_drop(isolated)
        for table, following in (("AntreaPolicyEgressRule", "EgressRule"),
                                 ("EgressRule", "EgressDefaultRule"),
                                 ("EgressDefaultRule", "EgressMetric"),
                                 ("EgressMetric", "L3Forwarding"),
                                 ("AntreaPolicyIngressRule", "IngressRule"),
                                 ("IngressRule", "IngressDefaultRule"),
                                 ("IngressDefaultRule", "IngressMetric"),
                                 ("IngressMetric", "ConntrackCommit")):
            # md:1197, 1255, 1283, 1309, 1704, 1779, 1808, 1833
            self.flow(table, f"priority=0,actions=goto_table:{t[following]}")
        for table, group in GROUPS.items():
            # network_policy.go initGroups: bucket 0 goes on, bucket 1 to the controller
            self.groups.append(
                f"group_id={group},type=all,bucket=bucket_id:0,actions=resubmit(,{t[table]}),"
                f"bucket=bucket_id:1,actions=set_field:{OUTPUT_TO_CONTROLLER}->reg0,"
                f"resubmit(,{t['Output']})")

    def rule(self, rule: dict, priority: int) -> None:
        """An Antrea-native rule of an Application-tier policy, a conjunction of its
        sources and destinations (md:1190-1196 egress, md:1697-1703 ingress: the
        destination there is the Pod's port in reg1)."""
        t, conj, action = TABLE, rule["id"], rule["action"]
        direction = rule["direction"].capitalize()
        table, metric = f"AntreaPolicy{direction}Rule", f"{direction}Metric"
        families = set()
        for name in rule["from"]:
            for address in self.pods[name].addresses:
                family = ipaddress.ip_address(address).version
                families.add(family)
                self.flow(table, f"priority={priority},{ip_match(family, 'src', address)},"
                          f"actions=conjunction({conj},1/2)", CATEGORY_NETWORK_POLICY, conj)
        for name in rule["to"]:
            pod = self.pods[name]
            if direction == "Ingress":
                self.flow(table, f"priority={priority},reg1={pod.ofport:#x},actions="
                          f"conjunction({conj},2/2)", CATEGORY_NETWORK_POLICY, conj)
                continue
            for address in pod.addresses:
                self.flow(table, f"priority={priority},"
                          f"{ip_match(ipaddress.ip_address(address).version, 'dst', address)},"
                          f"actions=conjunction({conj},2/2)", CATEGORY_NETWORK_POLICY, conj)
        if action == "allow":
            # md:1193 (egress) and md:1700 (ingress): the rule id in reg5/reg6 and ct_label
            register, label = (("reg5", f"{conj << 32:#x}/0xffffffff00000000")
                               if direction == "Egress" else ("reg6", f"{conj:#x}/0xffffffff"))
            for family in sorted(families):
                proto = "ip" if family == 4 else "ipv6"
                self.flow(table, f"priority={priority},conj_id={conj},{proto},actions=set_field:"
                          f"{conj:#x}->{register},ct(commit,table={t[metric]},zone="
                          f"{CT_ZONES[family]},exec(set_field:{label}->ct_label))",
                          CATEGORY_NETWORK_POLICY, conj)
                for state in ("+new", "-new"):  # md:1306-1307, md:1830-1831
                    self.flow(metric, f"priority=200,ct_state={state},ct_label={label},{proto},"
                              f"actions=goto_table:{t[following(metric)]}",
                              CATEGORY_NETWORK_POLICY, conj)
            return
        # pipeline.go conjunctionActionDenyFlow: md:1196 with what logging, reject and deny
        # tracking add (client_test.go:2947)
        loads = f"set_field:{conj:#x}->reg3,set_field:{DENY_MARK}->reg0"
        ops = (STORE_DENY if self.deny_tracking else 0) | (
            LOGGING if rule.get("logging") else 0) | (REJECT if action == "reject" else 0)
        if ops & (STORE_DENY | LOGGING):
            loads += f",set_field:{DISPOSITIONS[action]}->reg0"
        if ops:
            actions = (f"{loads},set_field:{operations(ops)}->reg0,set_field:{t[table]:#x}/0xff"
                       f"->reg2,group:{GROUPS[metric]}")
        else:
            actions = f"{loads},goto_table:{t[metric]}"
        self.flow(table, f"priority={priority},conj_id={conj},actions={actions}",
                  CATEGORY_NETWORK_POLICY, conj)
        # md:1308, md:1832: the metric table drops what the rule denied
        self.flow(metric, f"priority=200,reg0={DENY_MARK},reg3={conj:#x},actions=drop",
                  CATEGORY_NETWORK_POLICY, conj)

    def default_drop(self, isolated: dict) -> None:
        """A Kubernetes NetworkPolicy's default drop for a Pod (md:1282 egress, md:1807
        ingress), as pipeline.go defaultDropFlow builds it: with logging or deny tracking it
        goes to the controller, with no deny mark and no reg3."""
        t, pod = TABLE, self.pods[isolated["pod"]]
        table = "EgressDefaultRule" if isolated["direction"] == "egress" else \
            "IngressDefaultRule"
        ops = (STORE_DENY if self.deny_tracking else 0) | (
            LOGGING if isolated.get("logging") else 0)
        actions = "drop"
        if ops:
            actions = (f"set_field:{DISPOSITIONS['drop']}->reg0,set_field:{operations(ops)}"
                       f"->reg0,set_field:{OUTPUT_TO_CONTROLLER}->reg0,set_field:"
                       f"{t[table]:#x}/0xff->reg2,goto_table:{t['Output']}")
        if table == "IngressDefaultRule":
            matches = [f"reg1={pod.ofport:#x}"]
        else:
            matches = [ip_match(ipaddress.ip_address(a).version, "src", a)
                       for a in pod.addresses]
        for match in matches:
            self.flow(table, f"priority=200,{match},actions={actions}",
                      CATEGORY_NETWORK_POLICY, pod.ofport)

    def forwarding(self) -> None:
        t = TABLE
        for pod in self.pods.values():
            for address in pod.addresses:
                family = ipaddress.ip_address(address).version
                # md:1344 (the Pod subnet, here each Pod's address) and md:1346-1348: a
                # Service's packet gets the gateway's and the Pod's MACs; the lab skips
                # L3DecTTL .. SNAT (no gateway, tunnel or uplink here)
                self.flow("L3Forwarding", f"priority=200,{ip_match(family, 'dst', address)},"
                          f"reg0=0/0x200,actions=goto_table:{t['L2ForwardingCalc']}",
                          CATEGORY_POD)
                self.flow("L3Forwarding", f"priority=200,{ip_match(family, 'dst', address)},"
                          f"reg0={REWRITE_MAC},actions=set_field:{GATEWAY_MAC}->eth_src,"
                          f"set_field:{pod.mac}->eth_dst,goto_table:{t['L2ForwardingCalc']}",
                          CATEGORY_POD)
            # md:1586-1588, to IngressSecurityClassifier (no TrafficControl table)
            self.flow("L2ForwardingCalc", f"priority=200,dl_dst={pod.mac},actions=set_field:"
                      f"{pod.ofport:#x}->reg1,set_field:{OUTPUT_TO_PORT}->reg0,"
                      f"goto_table:{t['IngressSecurityClassifier']}", CATEGORY_POD)
        self.flow("L3Forwarding", f"priority=0,actions=goto_table:{t['L2ForwardingCalc']}")
        self.flow("L2ForwardingCalc", f"priority=0,actions=goto_table:"
                                      f"{t['IngressSecurityClassifier']}")
        self.flow("IngressSecurityClassifier", f"priority=0,actions=goto_table:"
                                               f"{t['AntreaPolicyIngressRule']}")  # md:1652

    def output(self) -> None:
        t = TABLE
        for family, proto in ((4, "ip"), (6, "ipv6")):  # md:1856
            self.flow("ConntrackCommit", f"priority=200,ct_state=+new+trk,ct_mark=0x0/0x20,"
                      f"{proto},actions=ct(commit,table={t['Output']},zone={CT_ZONES[family]},"
                      "exec(move:NXM_NX_REG0[0..3]->NXM_NX_CT_MARK[0..3]))")
        self.flow("ConntrackCommit", f"priority=0,actions=goto_table:{t['Output']}")  # md:1857
        self.flow("Output", f"priority=200,reg0={OUTPUT_TO_PORT},"
                            "actions=output:NXM_NX_REG1[]")  # md:1887
        # network_policy.go initLoggingFlows / loggingNPPacketFlowWithOperations, md:1888-1889:
        # one flow per operations value 1..7, meter 256 then the controller with userdata
        for ops in range(1, 8):
            self.flow("Output", f"priority=200,reg0={ops << 25 | 0x400000:#x}/0xfe600000,"
                      f"actions=meter:{NP_METER},controller(reason=no_match,id="
                      f"{self.controller_id},userdata={NETWORK_POLICY:02x}.{ops:02x})",
                      CATEGORY_NETWORK_POLICY, 1)
        self.flow("Output", "priority=0,actions=drop")  # md:1890


def following(metric: str) -> str:
    """Where a metric table's allowed packets go on (md:1306, md:1830)."""
    return "L3Forwarding" if metric == "EgressMetric" else "ConntrackCommit"
