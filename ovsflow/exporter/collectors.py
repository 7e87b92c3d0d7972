"""Several collectors at once (`ipfix.collectors`; Antrea's one `flowCollectorAddr` is the
list of one): every record goes to each, through an `Exporter` of its own — its transport,
TLS, queue bound, health and metrics.

A collector that is away holds back no other and costs only its own queue: its exporter
keeps records up to its bound and then drops its oldest (counted per collector), while the
others send everything. Backpressure waits for the slowest collector that takes records:
a poll goes on once each reachable collector has taken all but its share of the queue, so
nothing is dropped for a collector that takes records, however slowly.
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
                        supervisor=self._supervisor, metering=self.metering)

    @property
    def queued(self) -> int:
        """The longest queue of a collector that takes records (the others' do not hold a
        poll back)."""
        return max((e.queued for e in self.by_collector.values() if e.reachable), default=0)

    @property
    def delivered(self) -> bool:
        return any(e.delivered for e in self.by_collector.values())

    def enqueue(self, batch: EncodedRecords) -> None:
        for exporter, own in zip(self.by_collector.values(), self._copies([batch])):
            exporter.enqueue(own[0])

    def submit_encoded(self, batches: Iterable[EncodedRecords]) -> None:
        for exporter, own in zip(self.by_collector.values(), self._copies(list(batches))):
            exporter.submit_encoded(own)

    def _copies(self, batches: list[EncodedRecords]) -> list[list[EncodedRecords]]:
        """The batches for the first exporter, a copy for each other, all made before any
        exporter has them: an exporter leaves out what it dropped or sent by replacing a
        batch's groups (`drop_oldest`)."""
        return [batches] + [[_copy(batch) for batch in batches]
                            for _ in range(len(self.by_collector) - 1)]

    async def wait_for_room(self, limit: int | None = None) -> None:
        await asyncio.gather(*(e.wait_for_room(limit) for e in self.by_collector.values()))

    def start(self) -> None:
        for exporter in self.by_collector.values():
            exporter.start()

    async def close(self, timeout: float) -> bool:
        """Send what is queued to each collector (`Exporter.close`), all at once."""
        results = await asyncio.gather(*(e.close(timeout) for e in self.by_collector.values()))
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
        listed = {str(c.address) for c in new.collectors}
        added = [str(c.address) for c in new.collectors if str(c.address) not in old]
        removed = [address for address in old if address not in listed]
        taking_over = dict(zip(added, removed))
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
            exporter.template_refresh = new.ipfix.template_refresh
            self.by_collector[address] = exporter
        self._config = new
        for address, exporter in old.items():
            log.info("reload: collector %s removed; sending what it has queued", address)
            await exporter.close(close_timeout)


def _copy(batch: EncodedRecords) -> EncodedRecords:
    return dataclasses.replace(batch, groups=list(batch.groups), rejected=list(batch.rejected))
