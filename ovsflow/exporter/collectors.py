"""Several collectors at once (`ipfix.collectors`; Antrea's one `flowCollectorAddr` is the
list of one): every record goes to each, through an `Exporter` of its own — its transport,
TLS, queue bound, health and metrics.

A collector that is away holds back no other and costs only its own queue: its exporter
keeps one record per connection (queue.py), and past its bound drops the oldest end
records of ended connections (counted per collector), while the others send everything.
Backpressure waits for the slowest collector that takes records: a poll goes on once each
reachable collector has taken all but its share of the queue, so nothing is dropped for a
collector that takes records, however slowly. Every exporter queues the same batches: a
queue never changes a batch it is given (its own changes are copies, see backlog.py).

A collector that takes the place of one no longer configured (as a changed
`flowCollectorAddr`) takes over what the other had not received, on a reload (its exporter
and queue) as across a restart (the previous agent's records, from the export state):
`successors` pairs them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable

from ..config import CollectorConfig, Config
from ..record import BATCH, EncodedRecords
from ..supervisor import Supervisor
from ..transport import transport_for
from .ledger import Metering
from .sender import Exporter

log = logging.getLogger(__name__)

IN_FLIGHT = 2 * BATCH  # records a poll lets wait for the collectors before it waits itself


def _transport(collector: CollectorConfig, config: Config):
    return transport_for(collector.address, dataclasses.replace(config.ipfix,
                                                                tls=collector.tls))


class Exporters:
    def __init__(self, config: Config, supervisor: Supervisor | None = None):
        self._config, self._supervisor = config, supervisor
        self.metering = Metering()  # what every collector's ledger says of the agent (agent.py)
        # collector (HOST:PORT:PROTO) -> its exporter, in the configuration's order
        self.by_collector = {str(c.address): self._exporter(c, _transport(c, config), config)
                             for c in config.collectors}

    def _exporter(self, collector: CollectorConfig, transport, config: Config) -> Exporter:
        return Exporter(transport, config.ipfix.observation_domain_id,
                        max_buffered=collector.max_buffered_records,
                        template_refresh=config.ipfix.template_refresh,
                        max_waiting_live=_live_bound(config), supervisor=self._supervisor,
                        metering=self.metering)

    @property
    def queued(self) -> int:
        """The longest queue of a collector that takes records (the others' do not hold a
        poll back)."""
        return max((e.queued for e in self.by_collector.values() if e.reachable), default=0)

    @property
    def delivered(self) -> bool:
        return any(e.delivered for e in self.by_collector.values())

    def new_poll(self) -> None:
        """A poll begins (see `ExportQueue.new_poll`)."""
        for exporter in self.by_collector.values():
            exporter.queue.new_poll()

    def enqueue(self, batch: EncodedRecords) -> None:
        for exporter in self.by_collector.values():
            exporter.enqueue(batch)

    def submit_encoded(self, batches: Iterable[EncodedRecords]) -> None:
        batches = list(batches)
        for exporter in self.by_collector.values():
            exporter.submit_encoded(batches)

    async def wait_for_room(self, limit: int | None = None) -> None:
        await asyncio.gather(*(e.wait_for_room(limit) for e in self.by_collector.values()))

    def start(self) -> None:
        for exporter in self.by_collector.values():
            exporter.start()

    async def close(self, timeout: float, carry: bool = False) -> bool:
        """Send what is queued to each collector (`Exporter.close`), all at once; `carry`:
        keep what is left for the export state."""
        results = await asyncio.gather(*(e.close(timeout, carry)
                                         for e in self.by_collector.values()))
        return all(results)

    def problems(self, grace: float) -> dict[str, str]:
        """Collector -> why its exporter has been unable to do its job (`Exporter.problem`)."""
        found = {}
        for collector, exporter in self.by_collector.items():
            problem = exporter.problem(grace)
            if problem is not None:
                found[collector] = problem
        return found

    def renew_tls(self) -> None:
        for exporter in self.by_collector.values():
            exporter.renew_tls()

    def prepare(self, new: Config) -> dict[str, object]:
        """The transports a reload needs (a new collector, or new TLS or MTU settings), built
        before anything changes: reading TLS files can fail, and then nothing changes."""
        old = {str(c.address): c for c in self._config.collectors}
        return {str(c.address): _transport(c, new) for c in new.collectors
                if old.get(str(c.address)) is None
                or (old[str(c.address)].tls, self._config.ipfix.path_mtu) != (
                    c.tls, new.ipfix.path_mtu)}

    async def apply(self, new: Config, transports: dict[str, object],
                    close_timeout: float) -> None:
        """Swap to `new`'s collectors with the `transports` of `prepare`. A collector in
        place of one no longer listed (as a changed `flowCollectorAddr`) takes over its
        exporter and queue; one with new settings reconnects with them; an added one
        starts; one removed with none in its place sends what it has queued (for at most
        `close_timeout` seconds without progress)."""
        old = self.by_collector
        taking_over = successors(list(old), [str(c.address) for c in new.collectors])
        self.by_collector = {}
        for collector in new.collectors:
            address = str(collector.address)
            previous = taking_over.get(address, address)
            exporter = old.pop(previous, None)
            if exporter is None:
                exporter = self._exporter(collector, transports[address], new)
                exporter.start()
                log.info("reload: collector %s added", address)
            elif address in transports:
                await exporter.retarget(transports[address])
                if previous != address:
                    log.info("reload: collector %s -> %s", previous, address)
                else:
                    log.info("reload: collector %s: new TLS or path MTU settings", address)
            exporter.max_buffered = collector.max_buffered_records
            exporter.queue.max_waiting_live = _live_bound(new)
            exporter.template_refresh = new.ipfix.template_refresh
            self.by_collector[address] = exporter
        self._config = new
        for address, exporter in old.items():
            log.info("reload: collector %s removed; sending what it has queued", address)
            await exporter.close(close_timeout)


def successors(previous: list[str], listed: list[str]) -> dict[str, str]:
    """Collector -> the collector no longer listed whose place it takes: the collectors
    added, in order, take the places of those removed, in order."""
    added = [address for address in listed if address not in previous]
    removed = [address for address in previous if address not in listed]
    return dict(zip(added, removed))


def _live_bound(config: Config) -> int:
    """Records of live connections a queue keeps at most: one per connection the stores
    can track (they fold into one another, see queue.py)."""
    return config.conntrack.max_connections + config.ovs.max_deny_connections
