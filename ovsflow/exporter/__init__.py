"""The exporter (stage 4 of source -> filter -> store -> exporter -> transport): every
record to each collector, through one `Exporter` per collector (`collectors.py`), which
queues it (`queue.py`), numbers it into IPFIX messages (`session.py`), and sends them on
its transport, accounting for each in flight (`sender.py`, `flight.py`), and tells each
collector what it did not get (`ledger.py`). `encoding.py` writes `FlowRecord` objects as
the batches the exporter queues."""

from .collectors import IN_FLIGHT, Exporters
from .encoding import RecordEncoder, encode_in_batches, encode_records
from .sender import Exporter

__all__ = ["IN_FLIGHT", "Exporter", "Exporters", "RecordEncoder", "encode_in_batches",
           "encode_records"]
