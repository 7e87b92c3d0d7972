"""The stores' export state across restarts: what each store has told the collectors, read
back from the previous agent's file at start and written every `SAVE_INTERVAL` and at
shutdown (the file and its format: state.py).

Each section names whose entries it holds, and is continued only by a store of the same:
the deny store's by the deny path of the same bridge; the connection store's by the same
conntrack source (`state_name`: the kernel's, or one ovs-vswitchd process's), known once
the first poll has opened it. Until then, a save writes the conntrack section as it was
read, so the next agent still continues those connections.
"""

from __future__ import annotations

import asyncio

from .deny.store import DenyStore
from .state import ExportState, Section
from .store import ConnectionStore


def _deny_state_name(bridge: str) -> str:
    return f"deny {bridge}"


class StateKeeper:
    def __init__(self, export_state: ExportState, store: ConnectionStore,
                 deny_store: DenyStore):
        self.export_state = export_state
        self.store = store
        self.deny_store = deny_store
        self.restoring = True  # until the conntrack source is known and its section taken

    async def load(self, bridge: str) -> None:
        """Read the previous agent's file; the deny store continues from it at once."""
        await asyncio.to_thread(self.export_state.load)
        section = self.export_state.take("deny", _deny_state_name(bridge))
        if section is not None:
            for keys, rows in section.parts:
                self.deny_store.restore(keys, rows)

    def restore_connections(self, source) -> None:
        """In the poll's worker thread, once the source is open: its kind says whose
        connections the state may continue."""
        section = self.export_state.take("conntrack", source.state_name)
        if section is not None:
            parts = section.parts
            while parts:  # each part freed once restored: never the whole table beside the store
                self.store.restore(*parts.pop(0), section.written_at)
        self.restoring = False

    def due(self) -> bool:
        return self.export_state.due()

    async def save(self, now: float, source, bridge: str) -> None:
        """The deny entries are read here, on the loop that adds to them; the connections
        and the write in the poll's worker thread, which alone changes the store."""
        deny = Section(_deny_state_name(bridge), *self.deny_store.snapshot())

        def save() -> None:
            sections = {"deny": deny}
            if source is not None and not self.restoring:
                sections["conntrack"] = self.store.snapshot(source.state_name)
            elif (carried := self.export_state.untaken("conntrack")) is not None:
                sections["conntrack"] = carried
            self.export_state.save(sections, now)
        await asyncio.to_thread(save)
