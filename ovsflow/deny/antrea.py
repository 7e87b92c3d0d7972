"""`ovs.denySource: antrea`: Antrea's own NetworkPolicy packet-ins, received beside Antrea,
with nothing installed or changed on the bridge.

OVS sends a `controller(id=N)` packet-in to every connection whose controller id is N, so
ovsflow's service connection sets the id Antrea's agent uses (ofnet draws it at random when
the agent starts) and receives a copy of each; Antrea's own connection still gets all of
them. The id is learned from the NXAST_CONTROLLER2 actions with NetworkPolicy userdata of
Antrea's flows that send to the agent, and followed every `check_interval`, so a restarted
agent's new id is taken within a few seconds. Table names come from OVS (Antrea sets them
through OpenFlow table features, after it connects): they tell which table denied a
packet, hence the rule's direction.

What is read, from antrea-io/antrea (docs/antrea.md pins the version):
  - userdata byte 0 = packet-in category, NetworkPolicy = 1; byte 1 = the operations:
    logging 0b1, reject 0b10, store-deny 0b100 (pkg/agent/openflow/packetin.go)
  - reg0[10] = the deny mark, loaded by every Antrea-native drop or reject and by nothing
    else (fields.go APDenyRegMark; pipeline.go conjunctionActionDenyFlow); K8s default
    drops have none (pipeline.go defaultDropFlow)
  - reg0[11..12] = disposition: drop 0b01, reject 0b10 (fields.go APDispositionField),
    loaded only with logging or deny tracking: a Reject without either says so only in
    the operations, and may carry an earlier stage's disposition (Pass 0b11)
  - reg3 = the rule's conjunction id (fields.go APConjIDField) only under the deny mark:
    ServiceLB loads a Service Endpoint's IPv4 address into the same register
    (EndpointIPField; docs/design/ovs-pipeline.md, ServiceLB groups), which a default drop
    leaves there
  - reg2[0..7] = the table that sent the packet to the controller (PacketInTableField);
    the packet-in's own table is Output
  - direction: pkg/agent/controller/networkpolicy/packetin.go storeDenyConnectionParsed
  - what each rule denied, whatever reached the controller: the metric tables' flows
    `reg0=0x400/0x400,reg3=<rule> actions=drop`, one per Antrea-native drop or reject rule,
    which every packet the rule denied passes (pipeline.go denyRuleMetricFlow; md:1308,
    md:1832; Antrea reads the same counters for its NetworkPolicy stats: network_policy.go
    NetworkPolicyMetrics, parseDropFlow); Kubernetes default drops have no rule and no such
    flow: their own flows, one per Pod address (egress) or port (ingress) at priorityNormal
    in Egress/IngressDefaultRule, count them (pipeline.go defaultDropFlow; md:1282, md:1807)
"""

from __future__ import annotations

import logging
import time

from openflow import messages as m
from openflow.connection import OpenFlowConnection
from openflow.oxm import register, register_field

from ..filter import ConnectionFilter
from ..record import RULE_DROP, RULE_REJECT
from .packet import DeniedPacket
from .session import BridgeSession, entry_age
from .store import EGRESS, INGRESS, NEITHER, DenyStore
from .totals import Reading, TotalsKey

log = logging.getLogger(__name__)

NETWORK_POLICY = 1  # userdata byte 0: PacketInCategoryNP
REJECT_OPERATION, STORE_DENY_OPERATION = 0b10, 0b100  # userdata byte 1 (packetin.go)
DENY_MARK = 1 << 10  # APDenyRegMark, reg0[10]
DISPOSITION_DROP, DISPOSITION_REJECT = 0b01, 0b10  # APDispositionField, reg0[11..12]
# OutputToControllerRegMark, reg0[21..22] = 2: every flow that sends a NetworkPolicy
# packet-in to the agent matches it (network_policy.go initLoggingFlows); OVS returns the
# flows at least as specific, from the few classifier subtables whose mask has these bits
TO_CONTROLLER = (0x400000, 0x600000)
# Antrea's handler takes a rule's direction from AntreaPolicy{Ingress,Egress}Rule and the
# default-rule tables (pipeline.go GetAntreaPolicy{Ingress,Egress}Tables); the K8s rule and
# metric tables are of one direction as plainly.
INGRESS_TABLES = frozenset({"AntreaPolicyIngressRule", "IngressRule", "IngressDefaultRule",
                            "IngressMetric"})
EGRESS_TABLES = frozenset({"AntreaPolicyEgressRule", "EgressRule", "EgressDefaultRule",
                           "EgressMetric"})
NP_METER = 256  # PacketInMeterIDNP: Antrea's meter of NetworkPolicy packet-ins
# The tables whose deny-mark flows drop what a rule denied (pipeline.go denyRuleMetricFlow),
# and those whose priorityNormal flows are Kubernetes default drops (defaultDropFlow; the
# Baseline tier's rules sit there below that priority, and count in the metric tables)
METRIC_TABLES = {"EgressMetric": EGRESS, "IngressMetric": INGRESS,
                 "MulticastEgressMetric": EGRESS, "MulticastIngressMetric": INGRESS}
DEFAULT_RULE_TABLES = {"EgressDefaultRule": EGRESS, "IngressDefaultRule": INGRESS}
DEFAULT_DROP_PRIORITY = 200  # priorityNormal (pipeline.go)
MISS_SEND_LEN = 128  # as ofnet sets it; a service connection gets no packet-in without one
MAX_UNNAMED = 10_000  # packet-ins held while their table has no name yet
HOLD_SECONDS = 10.0  # at most, when Antrea names no table at all


def direction(table_name: str | None) -> int:
    """INGRESS, EGRESS, or NEITHER for a table that does not say."""
    if table_name in INGRESS_TABLES:
        return INGRESS
    if table_name in EGRESS_TABLES:
        return EGRESS
    return NEITHER


def verdict(reg0: int, operations: int) -> int | None:
    """RULE_REJECT or RULE_DROP for a denied packet; None for one a rule allowed or passed
    (Antrea logs those; their connections are in conntrack)."""
    disposition = reg0 >> 11 & 0b11
    if operations & REJECT_OPERATION or disposition == DISPOSITION_REJECT:
        return RULE_REJECT
    if disposition == DISPOSITION_DROP or reg0 & DENY_MARK or \
            operations & STORE_DENY_OPERATION:
        return RULE_DROP
    return None


def totals_key(entry: m.FlowEntry, table_name: str | None) -> TotalsKey | None:
    """What a flow of Antrea's that denies counts, for the deny totals: a rule's metric
    flow (its id and direction), or a default drop (its Pod's address, egress, or OpenFlow
    port, ingress); None for any other flow."""
    if table_name in METRIC_TABLES:
        rule_id = register(entry.match, 3)
        if not register(entry.match, 0) & DENY_MARK or not rule_id:
            return None
        return TotalsKey(direction=METRIC_TABLES[table_name], rule_id=rule_id)
    if table_name in DEFAULT_RULE_TABLES and entry.priority == DEFAULT_DROP_PRIORITY:
        if DEFAULT_RULE_TABLES[table_name] == INGRESS:
            return TotalsKey(direction=INGRESS, ofport=register(entry.match, 1))
        source = next((f for f in entry.match if f.name in ("ipv4_src", "ipv6_src")), None)
        if source is None or source.mask:
            return None  # not one Pod's address
        return TotalsKey(ip_version=4 if len(source.value) == 4 else 6, direction=EGRESS,
                         address=source.value)
    return None


def network_policy_controller_ids(flows: list[m.FlowEntry]) -> list[tuple[int, int, int]]:
    """(cookie, controller id, table) of every NetworkPolicy controller action in `flows`."""
    return [(flow.cookie, action.controller_id, flow.table_id) for flow in flows
            for action in flow.instructions.actions
            if isinstance(action, m.ControllerAction)
            and action.userdata[:1] == bytes((NETWORK_POLICY,))]


class AntreaDenySource(BridgeSession):
    stats_meter_id = NP_METER  # Antrea's meter: its drops cost Antrea's copies and ours

    def __init__(self, run_dir: str, bridge: str, connection_filter: ConnectionFilter,
                 store: DenyStore, check_interval: float = 1.0, **backoff):
        super().__init__(run_dir, bridge, connection_filter, store, **backoff)
        self.check_interval = check_interval  # seconds between reads of Antrea's flows
        self.controller_id: int | None = None  # Antrea's, on our connection (None: none)
        self.controller_id_changes = 0  # ids taken (the first, then one per Antrea restart)
        self.table_names: dict[int, str] = {}  # as OVS last said: named tables only
        self._output_table: int | None = None  # where Antrea's controller flows are
        self.directionless = 0  # denied packets whose table tells no direction
        self._last_id: int | None = None  # the id of the previous session too, for the log
        self._unnamed: list[tuple[DeniedPacket, int, int, int, float]] = []
        self._said_directionless = False

    async def _session(self) -> None:
        connection = await self._open()
        v = connection.version
        config = await connection.request(lambda xid: m.get_config_request(xid, version=v))
        # The switch's fragment handling is kept as it is (SET_CONFIG carries it too).
        await connection.transact([
            lambda xid: m.set_config(xid, miss_send_len=MISS_SEND_LEN, flags=config.flags,
                                     version=v),
            lambda xid: m.set_packet_in_format(xid, m.NXPIF_NXT_PACKET_IN2, version=v)])
        await self._check(connection)
        await self._receive(connection)

    async def _end_session(self) -> float:
        self._name_held_packets(final=True)  # as far as the names go: the switch is gone
        self.controller_id = self._output_table = None  # a new connection has id 0
        self.table_names = {}  # a restarted switch may hold other names
        return await super()._end_session()

    async def _check(self, connection: OpenFlowConnection) -> None:
        """Learn Antrea's controller id from its flows; set it on our connection when it
        changed (Antrea restarted: its table ids may have changed too); read the table
        names whenever they are missing."""
        v = connection.version
        replies = await connection.request_all(lambda xid: m.flow_stats_request(
            xid, match=[register_field(0, *TO_CONTROLLER, version=v)], version=v))
        found = network_policy_controller_ids([f for reply in replies for f in reply.flows])
        if not found:
            # Antrea is away or between two starts
            self.connected_since = None
            self.failing_since = self.failing_since or time.monotonic()
            self.last_error = (f"no NetworkPolicy packet-in action (controller userdata 01.xx)"
                               f" in the flows of {self.socket_path}: is antrea-agent running?")
            return
        # The newest round's flows (the round is the cookie's top 16 bits) are the running
        # agent's; an older round's linger until Antrea deletes its stale flows.
        _, controller_id, self._output_table = max(found)
        if controller_id != self.controller_id:
            # names first: no packet-in of the new id meets the previous agent's names
            await self._read_table_names(connection)
            await connection.transact(
                [lambda xid: m.set_controller_id(xid, controller_id, version=v)])
            log.info("deny path: Antrea's controller id is %d%s; listening to its NetworkPolicy"
                     " packet-ins on %s (OpenFlow %s)", controller_id,
                     "" if self._last_id in (None, controller_id) else f" (was {self._last_id})",
                     self.socket_path, m.VERSION_NAMES[v])
            if controller_id != self._last_id:
                self.controller_id_changes += 1
            self.controller_id = self._last_id = controller_id
        elif self._unnamed or self._output_table not in self.table_names:
            # Antrea names its tables after it connects: we may have read before it did
            await self._read_table_names(connection)
        if self.connected_since is None:
            self.connected_since, self.failing_since, self.last_error = \
                time.monotonic(), None, ""

    async def _read_totals(self, connection: OpenFlowConnection) -> None:
        """What Antrea's denying flows counted: the metric tables' deny flows in one loose
        request on the deny mark (OVS returns the flows whose match is at least that
        specific, from the classifier subtables whose mask has the bit), and the default
        rule tables' flows. Only once the tables have names: they say which is which."""
        names = self.table_names
        if not self.healthy or self._output_table not in names:
            return
        v = connection.version
        tables = [table for table, name in names.items() if name in DEFAULT_RULE_TABLES]
        requests = [lambda xid: m.flow_stats_request(
            xid, match=[register_field(0, DENY_MARK, DENY_MARK, version=v)], version=v)]
        requests += [lambda xid, t=t: m.flow_stats_request(xid, t, version=v) for t in tables]
        readings: dict[tuple, Reading] = {}
        for request in requests:
            for reply in await connection.request_all(request, timeout=2.0):
                for entry in reply.flows:
                    name = names.get(entry.table_id)
                    key = totals_key(entry, name)
                    if key is not None:
                        readings[name, entry.priority, tuple(entry.match)] = (
                            key, entry.packet_count, entry.byte_count, entry_age(entry))
        self.totals.read(readings, time.time(), self.session_started)

    async def _read_table_names(self, connection: OpenFlowConnection) -> None:
        v = connection.version
        replies = await connection.request_all(
            lambda xid: m.table_features_request(xid, version=v))
        self.table_names = {t.table_id: t.name for reply in replies for t in reply.tables
                            if t.name}
        self._name_held_packets(final=self._output_table in self.table_names)

    def _packet_in(self, message: m.PacketIn) -> None:
        if message.userdata[:1] != bytes((NETWORK_POLICY,)):
            self.ignored += 1  # Traceflow, DNS, IGMP, Service reject: not a policy's
            return
        reg0 = message.register(0)
        action = verdict(reg0, message.userdata[1] if len(message.userdata) > 1 else 0)
        if action is None:
            self.allowed += 1  # an allowed (logged) packet: its connection is in conntrack
            return
        packet = self._denied_packet(message)
        if packet is None:
            return
        rule_id = message.register(3) if reg0 & DENY_MARK else 0
        table = message.register(2) & 0xFF or message.table_id
        if table not in self.table_names and len(self._unnamed) < MAX_UNNAMED:
            self._unnamed.append((packet, rule_id, table, action, time.time()))
            return  # until its table has a name (`_name_held_packets`)
        self._store(packet, rule_id, table, action, time.time())

    def _name_held_packets(self, final: bool) -> None:
        """Store the held packets whose table now has a name; `final` (Antrea has named its
        tables: one without a name keeps none), or held for HOLD_SECONDS: all of them."""
        held, self._unnamed, now = self._unnamed, [], time.time()
        for packet, rule_id, table, action, when in held:
            if table in self.table_names or final or now - when >= HOLD_SECONDS:
                self._store(packet, rule_id, table, action, when)
            else:
                self._unnamed.append((packet, rule_id, table, action, when))

    def _store(self, packet: DeniedPacket, rule_id: int, table: int, action: int,
               when: float) -> None:
        name = self.table_names.get(table)
        rule_direction = direction(name)
        if rule_direction == NEITHER:
            self.directionless += 1
            if not self._said_directionless:
                self._said_directionless = True
                log.warning("deny path: a packet denied in table %d (%s) of %s: that table "
                            "tells no direction, so its records name the rule (%s) in "
                            "neither element; counted in ovsflow_deny_direction_unknown_total "
                            "(said once)", table, f"named {name}" if name else "no name",
                            self.socket_path, rule_id or "none")
        if rule_id:
            self.totals.learn_action(rule_direction, rule_id, action)
        self.store.add(packet, rule_id, when, direction=rule_direction, action=action)
