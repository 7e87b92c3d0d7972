"""The connection store (stage 3 of source -> filter -> store -> exporter -> transport):
the tracked connections, and the records each poll makes due. `connections.py` says how
its rooms fit together."""

from .connections import ConnectionStore
from .poll import EXPIRY_SLACK
from .spans import MAX_SPANS
from .state_parts import STATE_ROW

__all__ = ["EXPIRY_SLACK", "MAX_SPANS", "STATE_ROW", "ConnectionStore"]
