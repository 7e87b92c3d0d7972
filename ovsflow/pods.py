"""The Pods of this node, by address, kept live from OVSDB.

Antrea's CNI writes each Pod's identity into the `external_ids` of the Pod's Port row
(antrea-io/antrea, pkg/agent/cniserver/pod_configuration.go, BuildOVSPortExternalIDs):
`antrea-type=container`, `pod-name`, `pod-namespace`, `ip-address` (comma-separated, IPv4 and
IPv6), `attached-mac`, `container-id`. So the node knows its Pods without the Kubernetes API.

One python-ovs IDL replica monitors only Port's `name` and `external_ids`; the server sends
changes as they happen, so nothing is re-read per poll. The IDL runs in a thread of its own:
python-ovs drives its session (reconnect with backoff, resync after an OVSDB restart) with its
own poll loop, and parsing a large initial dump in pure Python would otherwise stall the
agent's event loop. The loop's side only reads a dict.

OVSDB stores values of any length (ovsdb-server takes a 70,000-byte external_ids value), and
whatever the map takes ends up in every record of the Pod's connections. So each value it
reads has a bound, `MAX_VALUE_BYTES`; a longer one is not what Antrea's CNI writes and is left
out (the records carry "" for that name; a Port without its addresses names no connection),
counted in `PodMap.values_cut` and logged, once per Port and key (not at every re-read of the
row). A prefix would be worse than nothing: cut, a name can be another Pod's and an address
list another address.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from dataclasses import dataclass

import ovs.db.idl
import ovs.poller

log = logging.getLogger(__name__)

POD_PORT = "container"  # external_ids:antrea-type of a Pod's Port
# Bytes (UTF-8) of the values the map reads. Kubernetes names a Pod with a DNS subdomain (at
# most 253) in a namespace named with a DNS label (at most 63), and gives it at most one
# address per family: "IPv4,IPv6" is at most 61 bytes, 255 leaves room. With names at these
# bounds (and a node name, a DNS subdomain too, of 253), the longest record, IPv6 conntrack,
# is 1319 bytes: it fits a UDP message on a 1500-byte path MTU (1429 bytes for records).
MAX_VALUE_BYTES = {"pod-name": 253, "pod-namespace": 63, "ip-address": 255}

# Just the part of the Open_vSwitch schema the replica reads: the Port table's name and
# external_ids, unchanged since OVS 1.x. Embedded, so that the map can start (and wait for
# OVSDB) without fetching the schema first.
_SCHEMA = {
    "name": "Open_vSwitch", "version": "8.0.0",
    "tables": {"Port": {"columns": {
        "name": {"type": "string"},
        "external_ids": {"type": {"key": "string", "value": "string",
                                  "min": 0, "max": "unlimited"}},
    }}},
}


@dataclass(frozen=True, slots=True)
class PodRef:
    """A Pod's identity. Immutable and shared by every address of its Port, so a store can
    keep one per connection at the cost of a pointer: the connection keeps the names it had
    even after the Pod (and its Port) is gone."""

    namespace: str
    name: str


def _size(value: str) -> int:
    """Its bytes in UTF-8, without raising for a lone surrogate (JSON can escape one)."""
    return len(value.encode(errors="replace"))


def pod_addresses(port_name: str, external_ids: dict[str, str]
                  ) -> tuple[PodRef | None, list[bytes], frozenset[str]]:
    """A Port's Pod, its packed addresses and the keys of the values left out for being over
    their bound (`MAX_VALUE_BYTES`); (None, [], frozenset()) for a Port that is not a Pod's.
    An address that does not parse is logged with the Port's name and left out."""
    if external_ids.get("antrea-type") != POD_PORT:
        return None, [], frozenset()
    values, cut = {}, []
    for key, bound in MAX_VALUE_BYTES.items():
        value = external_ids.get(key, "")
        if _size(value) > bound:
            cut.append(key)
            value = ""
        values[key] = value
    pod = PodRef(values["pod-namespace"], values["pod-name"])
    addresses = []
    for text in filter(None, (part.strip() for part in values["ip-address"].split(","))):
        try:
            addresses.append(ipaddress.ip_address(text).packed)
        except ValueError:
            log.warning("OVSDB Port %.64s: external_ids:ip-address has %r, not an IP address; "
                        "ignored", port_name, text)
    return pod, addresses, frozenset(cut)


class _PortReplica(ovs.db.idl.Idl):
    """An IDL that reports row changes to the map while it is monitoring. During an initial
    dump (first connection, or after a reconnect) it reports nothing: the map rebuilds from
    the complete table once the dump is in."""

    def __init__(self, remote: str, pods: PodMap):
        helper = ovs.db.idl.SchemaHelper(schema_json=_SCHEMA)
        helper.register_columns("Port", ["name", "external_ids"])
        super().__init__(remote, helper)
        self._map = pods

    def notify(self, event, row, updates=None):
        if self.state != self.IDL_S_MONITORING:
            return
        if event == ovs.db.idl.ROW_DELETE:
            self._map._forget(row.uuid)
        else:
            self._map._learn(row.uuid, row.name, row.external_ids)


class PodMap:
    """Address (packed, 4 or 16 bytes) -> the local Pod it belongs to.

    `start()` connects (and keeps reconnecting) to OVSDB at `remote`, e.g.
    `unix:/var/run/openvswitch/db.sock`; `lookup()` may be called from any thread at any time
    and returns None until the first dump has arrived."""

    def __init__(self, remote: str):
        self.remote = remote
        self._pods: dict[bytes, PodRef] = {}
        self._owners: dict[bytes, object] = {}  # address -> uuid of the Port that claims it
        self._row_addresses: dict[object, list[bytes]] = {}
        self.synced = threading.Event()  # set once the first complete dump is in
        self.resyncs = 0  # complete dumps loaded: 1 + reconnects
        self.changes = 0  # counted after each change of the map: users may cache lookups
        self.values_cut = 0  # values left out for being over their bound (MAX_VALUE_BYTES)
        self._cut: dict[object, frozenset[str]] = {}  # Port uuid -> its keys left out now
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._wake_read = self._wake_write = -1

    def lookup(self, address: bytes) -> PodRef | None:
        return self._pods.get(address)

    def __len__(self) -> int:
        """How many addresses belong to local Pods."""
        return len(self._pods)

    def start(self) -> None:
        self._wake_read, self._wake_write = os.pipe()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ovsflow-pods", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        os.write(self._wake_write, b"x")
        self._thread.join()
        self._thread = None
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _run(self) -> None:
        replica = _PortReplica(self.remote, self)
        try:
            while not self._stopping:
                was_monitoring = replica.state == replica.IDL_S_MONITORING
                try:
                    replica.run()
                    monitoring = replica.state == replica.IDL_S_MONITORING
                    if monitoring and not was_monitoring:
                        self._rebuild(replica)
                    elif was_monitoring and not monitoring:
                        log.warning("OVSDB Pod map: the connection to %s was lost; reloading "
                                    "(lookups use the last known Pods meanwhile)", self.remote)
                except Exception:  # one bad update must not end the map
                    log.exception("OVSDB Pod map: update failed; reconnecting")
                    replica.force_reconnect()
                poller = ovs.poller.Poller()
                replica.wait(poller)
                poller.fd_wait(self._wake_read, ovs.poller.POLLIN)
                poller.block()
        finally:
            replica.close()

    def _rebuild(self, replica: _PortReplica) -> None:
        """From the complete Port table; swapped in whole so that lookups never see a half
        of it."""
        pods: dict[bytes, PodRef] = {}
        owners: dict[bytes, object] = {}
        row_addresses: dict[object, list[bytes]] = {}
        rows = replica.tables["Port"].rows
        self._cut = {uuid: keys for uuid, keys in self._cut.items() if uuid in rows}
        for row in rows.values():
            pod, addresses = self._read(row.uuid, row.name, row.external_ids)
            if pod is None:
                continue
            row_addresses[row.uuid] = addresses
            for address in addresses:
                pods[address], owners[address] = pod, row.uuid
        self._pods, self._owners, self._row_addresses = pods, owners, row_addresses
        self.changes += 1
        self.resyncs += 1
        self.synced.set()
        log.info("OVSDB Pod map loaded: %d Pod addresses", len(pods))

    def _learn(self, uuid, port_name: str, external_ids: dict[str, str]) -> None:
        """A Port created or changed: its addresses point to its Pod first, then the ones it
        no longer has are released, so that a lookup never misses in between."""
        pod, addresses = self._read(uuid, port_name, external_ids)
        for address in addresses:
            self._pods[address], self._owners[address] = pod, uuid
        previous = self._row_addresses.pop(uuid, [])
        if pod is not None:
            self._row_addresses[uuid] = addresses
        self._release(uuid, set(previous).difference(addresses))
        self.changes += 1

    def _forget(self, uuid) -> None:
        self._release(uuid, self._row_addresses.pop(uuid, []))
        self._cut.pop(uuid, None)
        self.changes += 1

    def _read(self, uuid, port_name: str, external_ids: dict[str, str]
              ) -> tuple[PodRef | None, list[bytes]]:
        """`pod_addresses`, with the values it left out counted and logged once per Port and
        key: a Port is read again at each of its changes and after each reconnect."""
        pod, addresses, cut = pod_addresses(port_name, external_ids)
        new = cut - self._cut.get(uuid, frozenset())
        if cut:
            self._cut[uuid] = cut
        else:
            self._cut.pop(uuid, None)
        if new:
            self.values_cut += len(new)
            log.warning("OVSDB Port %.64s: %s: not what Antrea writes; left out (%d so far)",
                        port_name, "; ".join(
                            f"external_ids:{key} has {_size(external_ids[key])} bytes, "
                            f"over {MAX_VALUE_BYTES[key]}" for key in sorted(new)),
                        self.values_cut)
        return pod, addresses

    def _release(self, uuid, addresses) -> None:
        for address in addresses:
            if self._owners.get(address) == uuid:  # not taken over by a newer Port since
                del self._pods[address], self._owners[address]
