"""The export state across restarts: what each store has made and what each collector has
not received, read back from the previous agent's file at start and written every
`SAVE_INTERVAL` and at shutdown (the file and its format: state_file.py, state.py).

Each section names whose entries it holds, and is continued only by the same: the deny
store's by the deny path of the same bridge; the connection store's by the same conntrack
source (`state_name`: the kernel's, or one ovs-vswitchd process's), known once the first
poll has opened it (until then a save writes the conntrack section as it was read, so the
next agent still continues those connections); a collector's records by that collector, or
by the one that takes its place (`successors`, as a reload does). The records of a
collector no longer configured are said, counted and left out.

A save is consistent: it runs on the event loop between two polls (the agent's poll lock
held), so every record the store has made is either delivered or in a queue's snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from .deny.store import DenyStore
from .exporter import Exporters
from .exporter.carried import PREFIX, batches, section
from .exporter.collectors import successors
from .state import SAVE_INTERVAL, Section
from .state_file import ExportState
from .store import ConnectionStore

log = logging.getLogger(__name__)


def _deny_state_name(bridge: str) -> str:
    return f"deny {bridge}"


class StateKeeper:
    def __init__(self, export_state: ExportState, store: ConnectionStore,
                 deny_store: DenyStore, exporters: Exporters):
        self.export_state = export_state
        self.store = store
        self.deny_store = deny_store
        self.exporters = exporters
        self.restoring = True  # until the conntrack source is known and its section taken
        # collector no longer configured -> the previous agent's records for it, left out
        self.discarded: Counter[str] = Counter()

    async def load(self, bridge: str) -> None:
        """Read the previous agent's file; the deny store and the collectors' queues
        continue from it at once (before the exporters start: those records go first)."""
        await asyncio.to_thread(self.export_state.load)
        state = self.export_state
        deny = state.take("deny", _deny_state_name(bridge))
        if deny is not None:
            for keys, rows in deny.parts:
                self.deny_store.restore(keys, rows)
        carried = state.take_all(PREFIX)
        by_collector = self.exporters.by_collector
        taking_over = successors(list(carried), list(by_collector))
        for collector, exporter in by_collector.items():
            previous = taking_over.get(collector, collector)
            parts = carried.pop(previous, None)
            if parts is None or not parts.count:
                continue
            made, left_out = batches(parts)
            for batch in made:
                exporter.queue.enqueue(batch, restored=True)
            log.warning("export state: %d records the previous agent could not deliver to "
                        "%s are queued again for %s%s", parts.count - left_out, previous,
                        collector, f" ({left_out} unreadable, left out)" if left_out else "")
            if left_out:
                self.discarded[previous] += left_out
        for collector, parts in carried.items():
            if parts.count:
                self.discarded[collector] += parts.count
                log.error("export state: %d records the previous agent could not deliver to "
                          "%s are lost: that collector is no longer configured, and none "
                          "takes its place", parts.count, collector)

    def restore_connections(self, source) -> None:
        """In the poll's worker thread, once the source is open: its kind says whose
        connections the state may continue."""
        section = self.export_state.take("conntrack", source.state_name)
        if section is not None:
            parts = section.parts
            while parts:  # each part freed once restored: never the whole table beside the store
                self.store.restore(*parts.pop(0), section.written_at)
        self.restoring = False

    async def keep(self, lock: asyncio.Lock, source: Callable[[], object],
                   bridge: str) -> None:
        """Save every SAVE_INTERVAL, counted from the start of the previous save, between
        two polls (`lock` is the one a poll holds)."""
        due = time.monotonic() + SAVE_INTERVAL
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            async with lock:
                due = max(due + SAVE_INTERVAL, time.monotonic())
                await self.save(source(), bridge)

    async def save(self, source, bridge: str, final: bool = False) -> bool:
        """The deny entries and the queues are read here, on the loop that changes them; the
        connections and the write in the poll's worker thread, which alone changes the
        store. `final`: at shutdown, after the queues' last flush."""
        deny = Section(_deny_state_name(bridge), *self.deny_store.snapshot())
        queues = {collector: exporter.queue.snapshot()
                  for collector, exporter in self.exporters.by_collector.items()}

        def save() -> bool:
            sections = {"deny": deny}
            if source is not None and not self.restoring:
                sections["conntrack"] = self.store.snapshot(source.state_name)
            elif (carried := self.export_state.untaken("conntrack")) is not None:
                sections["conntrack"] = carried
            for collector, snapshot in queues.items():
                sections[PREFIX + collector] = section(collector, snapshot)
            return self.export_state.save(sections, time.time(), final)
        return await asyncio.to_thread(save)
