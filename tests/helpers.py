"""Test helpers that run real programs: the `ovsflow` console script and tshark.

Every process started here is stopped by its own PID when the helper is done with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

OVSFLOW = shutil.which("ovsflow", path=str(Path(sys.executable).parent))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StreamReceiver:
    """A TCP server of its own (a thread) that keeps every byte of the one connection it
    takes; `stream()` returns them once that connection has ended."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        connection, _ = self.server.accept()
        with connection:
            while chunk := connection.recv(65536):
                self.received.extend(chunk)

    def stream(self, timeout: float = 30) -> bytes:
        self._reader.join(timeout)
        self.server.close()
        return bytes(self.received)


class Collector:
    """`ovsflow collect` as a subprocess; `records()` waits for it and parses its lines."""

    def __init__(self, url: str, *, count: int | None = None, timeout: float = 30,
                 extra: tuple[str, ...] = (), prefix: list[str] | None = None):
        """`prefix` runs it elsewhere, e.g. in a network namespace (`ip netns exec NS`)."""
        assert OVSFLOW, "the ovsflow console script is not installed next to this Python"
        args = [*(prefix or []), OVSFLOW, "collect", "--listen", url, "--timeout",
                str(timeout), *extra]
        if count is not None:
            args += ["--count", str(count)]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        line = self.process.stderr.readline()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"ovsflow collect did not start: {line}"
                               f"{self.process.stderr.read()}")
        self.port = int(line.rsplit(":", 1)[1])

    def records(self, timeout: float = 60) -> list[dict]:
        """Its flow records; the options records it printed go to `options`."""
        out, self.errors = self.process.communicate(timeout=timeout)
        lines = [json.loads(line) for line in out.splitlines()]
        self.options = [line for line in lines if line.get("_options")]
        return [line for line in lines if not line.get("_options")]

    def stop_and_read(self) -> list[dict]:
        """Stop it now (by PID) and parse what it printed: every line is flushed as printed."""
        if self.process.poll() is None:
            self.process.terminate()
        return self.records()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


@contextmanager
def tshark_capture(capture_filter: str, directory: Path):
    """Capture loopback traffic into a pcap in `directory` while the block runs; yields the
    pcap's path, complete once the block has ended.

    The capture stops only once a marker datagram sent after the block is in the file: dumpcap
    writes packets in the order it reads them and flushes the file every 100 ms, so every
    packet of the block is written by then. A fixed wait lost the tail of a TCP export once,
    on a loaded machine."""
    path = directory / "capture.pcap"
    marker, marker_port = os.urandom(16).hex().encode(), free_port(socket.SOCK_DGRAM)
    process = subprocess.Popen(
        ["tshark", "-i", "lo", "-f", f"({capture_filter}) or (udp dst port {marker_port})",
         "-w", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while "Capture started" not in process.stderr.readline():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tshark did not start capturing")
        time.sleep(0.5)  # the capture filter is being applied as the message is printed
        yield str(path)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(marker, ("127.0.0.1", marker_port))
        deadline = time.monotonic() + 30
        while marker not in path.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tshark did not capture the marker sent after the block")
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tshark_fields(pcap: str, decode_as: str, fields: list[str]) -> list[dict[str, list[str]]]:
    """Per packet that tshark decoded as IPFIX (cflow), each field's values."""
    result = subprocess.run(
        ["tshark", "-r", pcap, "-d", decode_as, "-Y", "cflow", "-T", "fields",
         "-E", "occurrence=a", "-E", "aggregator=|", "-E", "separator=\t",
         *[arg for f in fields for arg in ("-e", f)]],
        capture_output=True, text=True, timeout=60, check=True)
    packets = []
    for line in result.stdout.splitlines():
        values = line.split("\t")
        packets.append({f: (v.split("|") if v else []) for f, v in zip(fields, values)})
    return packets


def agent_config(directory: Path, port: int, protocols, **sections) -> str:
    """An agent configuration for the tests, written to directory/ovsflow.yaml: UDP export
    to 127.0.0.1:port, 500 ms polls, a 1 s active timeout, kernel conntrack in zone 65520, no
    bridge, no metrics server, no export state (the tests of restarts set one: each agent
    of another test starts anew). `sections` override keys, e.g. ovs={"bridge": "br0"}."""
    config = {
        "flowExporter": {"flowCollectorAddr": f"127.0.0.1:{port}:udp",
                         "flowPollInterval": "500ms", "activeFlowExportTimeout": "1s",
                         "idleFlowExportTimeout": "30s", "protocols": protocols},
        "conntrack": {"source": "kernel", "zones": [65520]},
        "ovs": {"bridge": ""},
        "ipfix": {},
        "metrics": {"bindAddress": ""},
        "state": {"directory": ""},
    }
    for section, values in sections.items():
        config[section].update(values)
    path = Path(directory) / "ovsflow.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@contextmanager
def filled_namespace(name: str, udp_entries: int):
    """A network namespace whose kernel conntrack holds `udp_entries` UDP entries in zone
    65520 (lab/ctfill.py); deleted afterwards."""
    from lab.netns import PYTHON, Netns

    ns = Netns(name)
    try:
        ns.run(PYTHON, "-m", "lab.ctfill", "udp", str(udp_entries))
        yield ns
    finally:
        ns.delete()


# Antrea's elements (PEN 56506) for the PyPI `ipfix` package, as go-ipfix's registry has them
# (tests/data/go_ipfix_registry.csv): the package then decodes them by name.
ANTREA_SPECS = [
    "sourcePodNamespace(56506/100)<string>", "sourcePodName(56506/101)<string>",
    "destinationPodNamespace(56506/102)<string>", "destinationPodName(56506/103)<string>",
    "sourceNodeName(56506/104)<string>", "destinationNodeName(56506/105)<string>",
    "tcpState(56506/136)<string>", "flowType(56506/137)<unsigned8>",
    "ingressNetworkPolicyRuleAction(56506/139)<unsigned8>",
    "egressNetworkPolicyRuleAction(56506/140)<unsigned8>",
    "ingressNetworkPolicyRuleName(56506/141)<string>",
    "egressNetworkPolicyRuleName(56506/142)<string>",
]


def use_antrea_information_model() -> None:
    import ipfix.ie

    ipfix.ie.use_iana_default()
    ipfix.ie.use_5103_default()
    for spec in ANTREA_SPECS:
        ipfix.ie.for_spec(spec)


def ipfix_package_records(buffer, options: bool = False) -> list[dict]:
    """The flow records (with `options`, the options records: ovsflow's ledger) of the
    message last read into the PyPI `ipfix` package's MessageBuffer, by element name."""
    return [dict(r) for r in buffer.record_iterator(
        tmplaccept_fn=lambda template: bool(template.scopecount) == options)]


def flow_records(batches) -> list:
    """The records of `EncodedRecords` batches as `FlowRecord`s, read back with ovsflow's
    IPFIX decoder (the interop tests check it against tshark, nfdump and others): how tests
    of the connection store, which writes records straight as IPFIX rows, see its records.
    Within a batch, records come grouped by template and span length."""
    from ovsflow.ipfix.templates import RECORD_TEMPLATES, template_fields
    from ovsflow.record import FlowRecord
    records = []
    for batch in batches:
        for template, data, _ in batch.groups:
            [(kind, ipv6)] = [key for key, t in RECORD_TEMPLATES.items()
                              if t.template is template]
            attributes = dict(template_fields(kind, ipv6))
            family = socket.AF_INET6 if ipv6 else socket.AF_INET
            for values in template.decode_records(data):
                record = FlowRecord(kind, b"", b"", 0)
                for element_name, value in values.items():
                    attribute = attributes[element_name]
                    if attribute.endswith("_address"):
                        value = socket.inet_pton(family, value)
                    if attribute != "icmp_type_code":  # a property: type and code
                        setattr(record, attribute, value)
                records.append(record)
    return records

