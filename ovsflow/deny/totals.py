"""What the datapath denied, exactly: the packets and bytes Open vSwitch counted on the flows
that deny, per deny rule (Antrea mode) or per protocol flow (table mode), as records of
template 270 beside the per-connection deny records; no I/O.

Packet-ins pass a meter, so under a flood the deny records count only what reached the
controller. The switch itself counts every packet a flow matched, whatever the meter did.
The deny sources read those counters every second (`read`) and this room sums them per
key across the flows' lifetimes (`Lifetimes`): a key counts what its flows moved since this
process began watching it (`flowStartMilliseconds`). Records go out with the deny records,
at most one per key per active timeout and only when its flows moved, the last ones when
the agent stops.

Open vSwitch updates a flow's counters when its revalidators run (about every 500 ms), so
the counts lag the datapath by up to a second and a half with the reading interval.
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from itertools import accumulate

from ..ipfix.templates import DENY_TOTALS
from ..record import ACTIVE_TIMEOUT, FORCED_END, RULE_DROP, EncodedRecords
from .counters import Lifetimes
from .store import BOTH, EGRESS, INGRESS, DenyStore

ALL_PORTS = (0, 0xFFFF)


@dataclass(frozen=True)
class TotalsKey:
    """What one record counts, as template 270 describes it: a protocol flow (`ip_version`,
    `protocol`, destination ports), or a rule (`rule_id` in the `direction`'s elements), or
    a default drop (the Pod's `address` for egress, its OpenFlow port for ingress)."""

    ip_version: int = 0  # 0: either
    protocol: int = 0  # 0: any
    ports: tuple[int, int] = ALL_PORTS
    direction: int = BOTH
    rule_id: int = 0
    address: bytes = b""
    ofport: int = 0


# One flow as a deny source read it: its key, packets, bytes (its frames') and age in
# seconds, None for a counter the switch did not give.
Reading = tuple[TotalsKey, int | None, int | None, float | None]


FORGET_AFTER_READINGS = 3  # and the idle timeout: a flow reinstalled is missing from one


class _Key:
    __slots__ = ("start", "packets", "octets", "exported_packets", "exported_octets",
                 "last_record", "last_move", "last_seen", "missing")

    def __init__(self, now: float):
        self.start = self.last_record = self.last_move = self.last_seen = now
        self.packets = self.octets = self.exported_packets = self.exported_octets = 0
        self.missing = 0  # readings in a row without any of its flows


@dataclass(slots=True)
class TotalsRecord:
    """A record of template 270 (the attributes its fields name)."""

    start_ms: int
    end_ms: int
    end_reason: int
    ip_version: int
    protocol: int
    port_low: int
    port_high: int
    packets: int
    octets: int
    packet_delta: int
    octet_delta: int
    ofport: int
    source_pod_name: str = ""
    source_pod_namespace: str = ""
    destination_pod_name: str = ""
    destination_pod_namespace: str = ""
    ingress_rule_name: str = ""
    ingress_rule_action: int = 0
    egress_rule_name: str = ""
    egress_rule_action: int = 0


class DenyTotals:
    """The keys' counts, from the readings of one deny source; timeouts and Pods as the
    deny store has them (a reload changes its timeouts)."""

    def __init__(self, store: DenyStore):
        self.store = store
        self.packets = self.octets = 0  # every key's, since the start: for the metrics
        self.readings = 0
        self._keys: dict[TotalsKey, _Key] = {}
        self._flows: dict[tuple[Hashable, TotalsKey], Lifetimes] = {}
        self._actions: dict[tuple[int, int], int] = {}  # (direction, rule) -> its action
        self._last_read: float | None = None
        self._session: float | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def learn_action(self, direction: int, rule_id: int, action: int) -> None:
        """A rule's action, as its packet-ins tell it (a reject, or a drop)."""
        self._actions[direction, rule_id] = action

    def read(self, flows: Mapping[Hashable, Reading], now: float,
             session_start: float) -> None:
        """Every flow that counts, by an identity of the flow (its table, priority and
        match), read at `now` (wall clock) on the session that began at `session_start`.
        A flow younger than the time since the previous reading (since the session began,
        for the first) was created since: it counts from 0; an older one first seen counts
        from now. A flow missing from the reading is gone: what it counted stays. After a
        gap between two sessions (ovs-vswitchd restarted), a flow younger than the gap is a
        new one even if its counters did not go back."""
        reference = self._last_read if self._last_read is not None else session_start
        new_session = session_start != self._session
        self._last_read, self._session = now, session_start
        self.readings += 1
        for key_state in self._keys.values():
            key_state.missing += 1
        seen = set()
        for flow, (key, packets, octets, age) in flows.items():
            if packets is None or octets is None:
                continue  # a switch that keeps no counters for it: nothing to add
            identity = (flow, key)
            seen.add(identity)
            created_since = age is not None and age < now - reference
            life = self._flows.get(identity)
            if life is None:
                life = self._flows[identity] = Lifetimes()
            key_state = self._keys.get(key)
            if key_state is None:  # counting from the flow's creation, or from now
                key_state = self._keys[key] = _Key(now - age if created_since else now)
            key_state.missing, key_state.last_seen = 0, now
            before = life.total
            after = life.observe((packets, octets), new_life=new_session and created_since,
                                 from_zero=created_since)
            moved_packets, moved_octets = after[0] - before[0], after[1] - before[1]
            if moved_packets or moved_octets:
                key_state.packets += moved_packets
                key_state.octets += moved_octets
                key_state.last_move = now
                self.packets += moved_packets
                self.octets += moved_octets
        for identity in [i for i in self._flows if i not in seen]:
            del self._flows[identity]  # gone: a flow that comes back is a new one

    def end_lives(self) -> None:
        """Every flow read so far was deleted (the deny source installs its flows anew):
        their counts stay, and each flow read next is a new one."""
        self._flows.clear()

    def due(self, now: float) -> list[EncodedRecords]:
        """Records of the keys whose flows moved since their last record, once the active
        timeout has passed since it; keys whose flows are gone (from a few readings in a
        row, for the idle timeout) and have nothing left to export are forgotten."""
        active, idle = self.store.active_timeout, self.store.idle_timeout
        records = []
        for key, state in list(self._keys.items()):
            if state.packets > state.exported_packets or state.octets > state.exported_octets:
                if now - state.last_record >= active:
                    records.append(self._record(key, state, ACTIVE_TIMEOUT, now))
            elif state.missing >= FORGET_AFTER_READINGS and now - state.last_seen >= idle:
                del self._keys[key]
        return _encoded(records)

    def flush(self, now: float) -> list[EncodedRecords]:
        """The agent stops: a last record for every key with counts not yet exported."""
        return _encoded([self._record(key, state, FORCED_END, now)
                         for key, state in self._keys.items()
                         if state.packets > state.exported_packets
                         or state.octets > state.exported_octets])

    def _record(self, key: TotalsKey, state: _Key, reason: int, now: float) -> TotalsRecord:
        record = TotalsRecord(
            int(state.start * 1000), int(max(state.last_move, state.start) * 1000), reason,
            key.ip_version, key.protocol, key.ports[0], key.ports[1], state.packets,
            state.octets, state.packets - state.exported_packets,
            state.octets - state.exported_octets, key.ofport)
        state.exported_packets, state.exported_octets = state.packets, state.octets
        state.last_record = now
        action = self._actions.get((key.direction, key.rule_id), RULE_DROP)
        rule = str(key.rule_id) if key.rule_id else ""
        if key.direction in (INGRESS, BOTH):
            record.ingress_rule_name, record.ingress_rule_action = rule, action
        if key.direction in (EGRESS, BOTH):
            record.egress_rule_name, record.egress_rule_action = rule, action
        enricher = self.store.enricher
        if key.address and enricher is not None:
            pod = enricher.pods(key.address, b"")[0]
            if pod is not None:
                record.source_pod_name, record.source_pod_namespace = pod.name, pod.namespace
        return record


def _encoded(records: list[TotalsRecord]) -> list[EncodedRecords]:
    """The records as one batch for the exporter (they are few: one per key). The batch's
    `protocols` stays empty: `ovsflow_records_by_protocol_total` counts connections'
    records, and these are not one protocol's."""
    if not records:
        return []
    data = DENY_TOTALS.encode_many(records)
    return [EncodedRecords(groups=[(DENY_TOTALS.template, b"".join(data),
                                    array("I", accumulate(map(len, data), initial=0)))])]
