"""`ovs.denySource: antrea`: Antrea's own NetworkPolicy packet-ins, received beside Antrea,
with nothing installed or changed on the bridge.

OVS sends a `controller(id=N)` packet-in to every connection whose controller id is N, so
ovsflow's service connection sets the id Antrea's agent uses (ofnet draws it at random when
the agent starts) and receives a copy of each; Antrea's own connection still gets all of
them. The id is learned from the NXAST_CONTROLLER2 actions with NetworkPolicy userdata in
Antrea's Output table (flow stats) and followed every `check_interval`, so a restarted
agent's new id is taken within a few seconds. Table names come from OVS (Antrea sets them
through OpenFlow table features): they tell which table denied a packet, hence the rule's
direction.

What is read, from antrea-io/antrea (docs/antrea.md pins the version):
  - userdata byte 0 = packet-in category, NetworkPolicy = 1 (pkg/agent/openflow/packetin.go)
  - reg0[11..12] = disposition: drop 0b01, reject 0b10 (fields.go APDispositionField,
    pipeline.go DispositionDrop/DispositionRej)
  - reg3 = the rule's conjunction id (fields.go APConjIDField); absent for a Kubernetes
    NetworkPolicy default drop (OVS leaves zero registers out of the packet-in)
  - reg2[0..7] = the table that sent the packet to the controller (PacketInTableField);
    the packet-in's own table is Output
  - direction: pkg/agent/controller/networkpolicy/packetin.go storeDenyConnectionParsed
"""

from __future__ import annotations

import logging
import time

from openflow import messages as m
from openflow.connection import OpenFlowConnection

from ..filter import ConnectionFilter
from ..record import RULE_DROP, RULE_REJECT
from .session import BridgeSession
from .store import DenyStore

log = logging.getLogger(__name__)

NETWORK_POLICY = 1  # userdata byte 0: PacketInCategoryNP
ACTIONS = {0b01: RULE_DROP, 0b10: RULE_REJECT}  # disposition -> the record's rule action
# Antrea's handler takes a rule's direction from AntreaPolicy{Ingress,Egress}Rule and the
# default-rule tables (pipeline.go GetAntreaPolicy{Ingress,Egress}Tables); the K8s rule and
# metric tables are of one direction as plainly.
INGRESS_TABLES = frozenset({"AntreaPolicyIngressRule", "IngressRule", "IngressDefaultRule",
                            "IngressMetric"})
EGRESS_TABLES = frozenset({"AntreaPolicyEgressRule", "EgressRule", "EgressDefaultRule",
                           "EgressMetric"})
OUTPUT_TABLE = "Output"  # where every NetworkPolicy packet-in leaves (pipeline.go)
NP_METER = 256  # PacketInMeterIDNP: Antrea's meter of NetworkPolicy packet-ins
MISS_SEND_LEN = 128  # as ofnet sets it; a service connection gets no packet-in without one


def direction(table_name: str | None) -> bool | None:
    """True: ingress, False: egress, None: a table that does not say."""
    if table_name in INGRESS_TABLES:
        return True
    if table_name in EGRESS_TABLES:
        return False
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
        self.controller_id: int | None = None  # Antrea's, shared by our connection
        self.controller_id_changes = 0  # ids taken (the first, then one per Antrea restart)
        self.table_names: dict[int, str] | None = None  # None: to be read
        self._output_table: int | None = None  # where Antrea's logging flows are; None: all
        self._said_unnamed = False

    async def _session(self) -> None:
        connection = await self._open()
        v = connection.version
        config = await connection.request(lambda xid: m.get_config_request(xid, version=v))
        # The switch's fragment handling is kept as it is (SET_CONFIG carries it too).
        await connection.transact([
            lambda xid: m.set_config(xid, miss_send_len=MISS_SEND_LEN, flags=config.flags,
                                     version=v),
            lambda xid: m.set_packet_in_format(xid, m.NXPIF_NXT_PACKET_IN2, version=v)])
        self.controller_id = None  # a new connection has id 0 until we set it
        self.table_names = None  # a restarted switch may hold other names
        await self._check(connection)
        await self._receive(connection)

    async def _check(self, connection: OpenFlowConnection) -> None:
        """Learn Antrea's controller id from its flows; set it on our connection when it
        changed (Antrea restarted: its table ids may have changed too)."""
        if self.table_names is None:
            await self._read_table_names(connection)
        v = connection.version
        replies = await connection.request_all(
            lambda xid: m.flow_stats_request(
                xid, m.OFPTT_ALL if self._output_table is None else self._output_table,
                version=v))
        found = network_policy_controller_ids([f for reply in replies for f in reply.flows])
        if not found:
            # Antrea is away or between two starts; a new start may number tables anew
            self._output_table = None
            self.connected_since = None
            self.failing_since = self.failing_since or time.monotonic()
            self.last_error = (f"no NetworkPolicy packet-in action (controller userdata 01.xx)"
                               f" in the flows of {self.socket_path}: is antrea-agent running?")
            return
        # The newest round's flows (the round is the cookie's top 16 bits) are the running
        # agent's; an older round's linger until Antrea deletes its stale flows.
        _, controller_id, self._output_table = max(found)
        if controller_id != self.controller_id:
            if self.controller_id is not None:
                await self._read_table_names(connection)
            await connection.transact(
                [lambda xid: m.set_controller_id(xid, controller_id, version=v)])
            log.info("deny path: Antrea's controller id is %d%s; listening to its NetworkPolicy"
                     " packet-ins on %s", controller_id,
                     "" if self.controller_id is None else f" (was {self.controller_id})",
                     self.socket_path)
            self.controller_id = controller_id
            self.controller_id_changes += 1
        if self.connected_since is None:
            self.connected_since, self.failing_since, self.last_error = \
                time.monotonic(), None, ""

    async def _read_table_names(self, connection: OpenFlowConnection) -> None:
        v = connection.version
        replies = await connection.request_all(
            lambda xid: m.table_features_request(xid, version=v))
        self.table_names = {t.table_id: t.name for reply in replies for t in reply.tables
                            if t.name}
        self._output_table = next((table for table, name in self.table_names.items()
                                   if name == OUTPUT_TABLE), None)
        if self._output_table is None and not self._said_unnamed:
            self._said_unnamed = True
            log.warning("deny path: no table of %s is named %s (Antrea names its tables "
                        "through OpenFlow table features): rule directions are unknown",
                        self.socket_path, OUTPUT_TABLE)

    def _packet_in(self, message: m.PacketIn) -> None:
        if message.userdata[:1] != bytes((NETWORK_POLICY,)):
            self.ignored += 1  # Traceflow, DNS, IGMP, Service reject: not a policy's
            return
        disposition = message.register(0) >> 11 & 0b11
        action = ACTIONS.get(disposition)
        if action is None:
            self.allowed += 1  # an allowed (logged) packet: its connection is in conntrack
            return
        packet = self._denied_packet(message)
        if packet is None:
            return
        table = message.register(2) & 0xFF or message.table_id
        self.store.add(packet, message.register(3), time.time(),
                       ingress=direction((self.table_names or {}).get(table)),
                       action=action)
