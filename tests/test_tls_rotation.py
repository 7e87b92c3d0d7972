"""TLS files rotated in place, as cert-manager and kubelet-mounted Secrets do it: new files
under the same paths, swapped in by renaming the `..data` symlink the paths go through
(issue 20). The CA, the client certificate and its key all change, and the collector then
trusts and shows only the new ones: what comes after the rotation can only arrive if the
exporter read the files again."""

import asyncio
import logging
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import trustme

from collecting import Output
from helpers import OVSFLOW, Collector, agent_config, filled_namespace
from ovsflow.config import TlsSettings
from ovsflow.exporter import Exporter
from ovsflow.ipfix.messages import MessageDecoder, MessageStream
from ovsflow.record import CONNTRACK, FlowRecord
from ovsflow.transport import StreamTransport, TlsFiles

SERVER_NAME = "collector.test"


class Generation:
    """One CA with a collector certificate and an exporter (client) certificate of it."""

    def __init__(self, name: str):
        self.name = name
        self.ca = trustme.CA(organization_name=name)
        self.server = self.ca.issue_cert(SERVER_NAME)
        self.client = self.ca.issue_cert(f"exporter.{name}.test")

    def write_collector_files(self, directory: Path) -> dict[str, str]:
        directory.mkdir(parents=True, exist_ok=True)
        files = {"cert": directory / "server.pem", "key": directory / "server-key.pem",
                 "client_ca": directory / "client-ca.pem"}
        self.server.cert_chain_pems[0].write_to_path(files["cert"])
        self.server.private_key_pem.write_to_path(files["key"])
        self.ca.cert_pem.write_to_path(files["client_ca"])
        return {name: str(path) for name, path in files.items()}

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(context)
        self.ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
        return context


class SecretVolume:
    """A directory laid out as the kubelet mounts a Secret: ca.crt, tls.crt and tls.key are
    symlinks through `..data`, which points at a timestamped directory and is swapped
    atomically (rename) to publish new contents."""

    FILES = ("ca.crt", "tls.crt", "tls.key")

    def __init__(self, directory: Path):
        self.directory = directory
        self.versions = 0

    def publish(self, generation: Generation, *, key_of: Generation | None = None) -> None:
        """The CA, client certificate and key of `generation` (the key of `key_of`: a
        rotation caught half way)."""
        self.versions += 1
        version = self.directory / f"..2026_12_03_{self.versions}"
        version.mkdir(parents=True)
        generation.ca.cert_pem.write_to_path(version / "ca.crt")
        generation.client.cert_chain_pems[0].write_to_path(version / "tls.crt")
        (key_of or generation).client.private_key_pem.write_to_path(version / "tls.key")
        new_link = self.directory / "..data_tmp"
        new_link.symlink_to(version.name)
        os.replace(new_link, self.directory / "..data")
        for name in self.FILES:
            if not (self.directory / name).is_symlink():
                (self.directory / name).symlink_to(Path("..data") / name)

    def settings(self) -> TlsSettings:
        ca, cert, key = (str(self.directory / name) for name in self.FILES)
        return TlsSettings(ca_file=ca, cert_file=cert, key_file=key, server_name=SERVER_NAME)


class RotatingCollector:
    """A TLS collector (own socket, threads) that requires a client certificate. Each new
    connection is served with the `generation` current when it comes: its certificate,
    and trust in its CA only. Records each connection's client certificate issuer and flow ids."""

    def __init__(self, generation: Generation):
        self.generation = generation
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sessions: list[tuple[str, list[int]]] = []  # (client certificate's CA, flow ids)
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection, self.generation),
                             daemon=True).start()

    def _serve(self, connection: socket.socket, generation: Generation) -> None:
        try:
            connection = generation.server_context().wrap_socket(connection, server_side=True)
        except (ssl.SSLError, OSError):
            self.refused += 1
            connection.close()
            return
        issuer = dict(item[0] for item in connection.getpeercert()["issuer"])
        flow_ids: list[int] = []
        self.sessions.append((issuer["organizationName"], flow_ids))
        stream, decoder = MessageStream(), MessageDecoder()
        with connection:
            while True:
                try:
                    data = connection.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                for message in stream.feed(data):
                    flow_ids += [record["flowId"] for _, record in decoder.decode(message).records]

    def received(self) -> list[int]:
        return [flow_id for _, flow_ids in self.sessions for flow_id in flow_ids]

    def close(self) -> None:
        self.server.close()


def records(first: int, count: int) -> list[FlowRecord]:
    return [FlowRecord(CONNTRACK, socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"),
                       17, 1000, 53, flow_id=i) for i in range(first, first + count)]


async def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


def test_rotated_ca_certificate_and_key_are_used_for_the_next_session(tmp_path, caplog):
    old, new = Generation("old"), Generation("new")
    volume = SecretVolume(tmp_path / "secret")
    volume.publish(old)
    collector = RotatingCollector(old)

    async def scenario():
        transport = StreamTransport("127.0.0.1", collector.port, TlsFiles(volume.settings()),
                                    SERVER_NAME)
        exporter = Exporter(transport, 1, max_backoff=0.2)
        exporter.start()
        exporter.submit(records(0, 100))
        await wait_until(lambda: len(collector.received()) == 100)
        unchanged = exporter.renew_tls()

        # half way: the new certificate, still the old key, which does not belong to it
        volume.publish(new, key_of=old)
        half_done = [exporter.renew_tls(), exporter.renew_tls()]
        exporter.submit(records(100, 100))  # the session with the old files goes on
        await wait_until(lambda: len(collector.received()) == 200)

        collector.generation = new  # the collector now trusts and shows only the new CA
        volume.publish(new)
        renewed = exporter.renew_tls()
        exporter.submit(records(200, 100))
        await wait_until(lambda: len(collector.received()) == 300)
        again = exporter.renew_tls()
        assert await exporter.close(5)
        return exporter.stats, unchanged, half_done, renewed, again

    try:
        with caplog.at_level(logging.INFO):
            stats, unchanged, half_done, renewed, again = asyncio.run(scenario())
    finally:
        collector.close()
    assert (unchanged, half_done, renewed, again) == (False, [False, False], True, False)
    assert caplog.text.count("TLS files changed but do not load") == 1  # once per content
    assert [(organization, sorted(ids)) for organization, ids in collector.sessions] == [
        ("old", list(range(200))), ("new", list(range(200, 300)))]
    assert collector.refused == 0
    assert stats.records_exported == 300 and stats.connections == 2


def test_files_rewritten_in_place_or_missing_for_a_moment(tmp_path):
    """Not every rotation swaps a symlink: a file may be rewritten under its inode, or be
    absent for a moment (removed, then written again)."""
    old, new = Generation("old"), Generation("new")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "tls.crt", "key": tmp_path / "tls.key"}
    old.ca.cert_pem.write_to_path(files["ca"])
    old.client.cert_chain_pems[0].write_to_path(files["cert"])
    old.client.private_key_pem.write_to_path(files["key"])
    tls = TlsFiles(TlsSettings(ca_file=str(files["ca"]), cert_file=str(files["cert"]),
                               key_file=str(files["key"])))
    first_context, key_inode = tls.context, files["key"].stat().st_ino
    old.ca.cert_pem.write_to_path(files["ca"])  # the same content again
    assert not tls.renew() and tls.context is first_context
    files["ca"].unlink()
    assert not tls.renew() and tls.context is first_context
    new.ca.cert_pem.write_to_path(files["ca"])
    new.client.cert_chain_pems[0].write_to_path(files["cert"])
    with open(files["key"], "r+b") as key:  # in place: same inode
        key.truncate(0)
        key.write(new.client.private_key_pem.bytes())
    assert tls.renew() and tls.context is not first_context
    assert not tls.renew()
    issuers = {dict(item[0] for item in cert["issuer"])["organizationName"]
               for cert in tls.context.get_ca_certs()}
    assert issuers == {"new"} and files["key"].stat().st_ino == key_inode


def test_rotation_while_records_flow_loses_and_repeats_nothing(tmp_path):
    """A rotation in the middle of a stream of batches: the session ends between two
    batches (templates withdrawn), the next starts with the new files."""
    old, new = Generation("old"), Generation("new")
    volume = SecretVolume(tmp_path / "secret")
    volume.publish(old)
    collector = RotatingCollector(old)

    async def scenario():
        transport = StreamTransport("127.0.0.1", collector.port, TlsFiles(volume.settings()),
                                    SERVER_NAME)
        exporter = Exporter(transport, 1, max_backoff=0.2)
        exporter.start()
        for first in range(0, 50_000, 1000):
            exporter.submit(records(first, 1000))
            if first == 20_000:
                collector.generation = new
                volume.publish(new)
                assert exporter.renew_tls()
            await asyncio.sleep(0.01)
        await wait_until(lambda: len(collector.received()) >= 50_000, timeout=30)
        assert await exporter.close(5)
        return exporter.stats

    try:
        stats = asyncio.run(scenario())
    finally:
        collector.close()
    [(first, before), (second, after)] = collector.sessions
    assert (first, second) == ("old", "new") and before and after
    assert sorted(before + after) == list(range(50_000))  # each once, none lost
    assert stats.records_exported == 50_000 and stats.connections == 2


def test_agent_follows_tls_files_rotated_under_it(tmp_path):
    """`ovsflow run` exporting over mutual TLS to `ovsflow collect`; the collector is
    replaced by one of a new CA, and the agent's Secret volume is swapped to that CA and a
    client certificate and key of it. Records reach the new collector only if the agent
    read its files again (it checks them at every poll)."""
    old, new = Generation("old"), Generation("new")
    volume = SecretVolume(tmp_path / "secret")
    volume.publish(old)
    with filled_namespace("tlsrot", 100) as node:
        collectors = []

        def start_collector(generation, port):
            files = generation.write_collector_files(tmp_path / generation.name)
            collector = Collector(f"tls://127.0.0.1:{port}", timeout=120, prefix=node.prefix(),
                                  extra=("--cert", files["cert"], "--key", files["key"],
                                         "--client-ca", files["client_ca"]))
            collectors.append(collector)
            return collector, Output(collector)

        try:
            first, first_output = start_collector(old, 0)
            settings = volume.settings()
            config = agent_config(tmp_path, first.port, ["udp"], flowExporter={
                "flowCollectorAddr": f"127.0.0.1:{first.port}:tls",
                # the heartbeat: the namespace's entries do not move
                "idleFlowExportTimeout": "10m", "heartbeatFlowExportTimeout": "1s"},
                ipfix={"tls": {
                    "caFile": settings.ca_file, "certFile": settings.cert_file,
                    "keyFile": settings.key_file, "serverName": SERVER_NAME}})
            agent = node.popen(OVSFLOW, "run", "--config", config, stderr=subprocess.PIPE,
                               text=True)
            wait_for_records(first_output, agent, 200)  # two waves of the 1 s active timeout
            first_output.stop()
            second, second_output = start_collector(new, first.port)
            volume.publish(new)
            wait_for_records(second_output, agent, 200)
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=60) == 0
            log = agent.stderr.read()
            records = second_output.until_disconnected()
        finally:
            for collector in collectors:
                collector.stop()
    assert "TLS files for the collector 127.0.0.1" in log and "changed" in log
    sources = Counter(r["sourceIPv4Address"] for r in records)
    assert len(sources) == 100 and min(sources.values()) >= 2


def wait_for_records(output: Output, agent: subprocess.Popen, count: int,
                     timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(output.lines) < count:
        if agent.poll() is not None:
            raise AssertionError(f"the agent exited: {agent.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(output.lines)} records of {count} in {timeout}s")
        time.sleep(0.1)
