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


def pod_addresses(port_name: str, external_ids: dict[str, str]
                  ) -> tuple[PodRef | None, list[bytes]]:
    """A Port's Pod and its packed addresses, or (None, []) for a Port that is not a Pod's.
    An address that does not parse is logged with the Port's name and left out."""
    if external_ids.get("antrea-type") != POD_PORT:
        return None, []
    pod = PodRef(external_ids.get("pod-namespace", ""), external_ids.get("pod-name", ""))
    addresses = []
    for text in filter(None, (part.strip() for part in
                              external_ids.get("ip-address", "").split(","))):
        try:
            addresses.append(ipaddress.ip_address(text).packed)
        except ValueError:
            log.warning("OVSDB Port %s: external_ids:ip-address has %r, not an IP address; "
                        "ignored", port_name, text)
    return pod, addresses


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
        for row in replica.tables["Port"].rows.values():
            pod, addresses = pod_addresses(row.name, row.external_ids)
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
        pod, addresses = pod_addresses(port_name, external_ids)
        for address in addresses:
            self._pods[address], self._owners[address] = pod, uuid
        previous = self._row_addresses.pop(uuid, [])
        if pod is not None:
            self._row_addresses[uuid] = addresses
        self._release(uuid, set(previous).difference(addresses))
        self.changes += 1

    def _forget(self, uuid) -> None:
        self._release(uuid, self._row_addresses.pop(uuid, []))
        self.changes += 1

    def _release(self, uuid, addresses) -> None:
        for address in addresses:
            if self._owners.get(address) == uuid:  # not taken over by a newer Port since
                del self._pods[address], self._owners[address]
