"""The OVS source's unixctl read of a large dump: it is read, decoded and parsed in a worker
thread; the event loop's own thread only awaits it.

ovs-vswitchd is stood in for by a unix socket server in a thread that answers one
dpctl/dump-conntrack with a 100k-entry reply: a userspace conntrack table that large cannot
be made in test time here (tests/test_conntrack_ovs.py reads a real, small one)."""

import asyncio
import json
import os
import socket
import threading
import time

from ovsflow.filter import ConnectionFilter
from ovsflow.protocols import ALL_PROTOCOLS
from ovsflow.source.ovs import OvsSource

ENTRY = ("tcp,orig=(src=10.98.{a}.{b},dst=10.98.0.2,sport={port},dport=8080),reply=(src="
         "10.98.0.2,dst=10.98.{a}.{b},sport=8080,dport={port}),id={i},zone=65520,status=0,"
         "timeout=29,protoinfo=(state_orig=ESTABLISHED,state_reply=ESTABLISHED)")
ENTRIES = 100_000


def fake_vswitchd(run_dir, text: str) -> threading.Thread:
    """Answer one JSON-RPC request on <run_dir>/ovs-vswitchd.<pid>.ctl, as vswitchd does:
    the reply written as fast as the socket takes it, the connection left open."""
    pid = 4_000_000 + os.getpid() % 100_000
    (run_dir / "ovs-vswitchd.pid").write_text(f"{pid}\n")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(run_dir / f"ovs-vswitchd.{pid}.ctl"))
    server.listen()
    reply = json.dumps({"error": None, "id": 0, "result": text}).encode()

    def serve():
        with server:
            connection, _ = server.accept()
            with connection:
                request = json.loads(connection.recv(65536))
                assert request["method"] == "dpctl/dump-conntrack"
                for start in range(0, len(reply), 65536):
                    connection.sendall(reply[start:start + 65536])
                connection.recv(1)  # until the client closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_100k_entry_dump_is_read_and_decoded_off_the_event_loop(tmp_path):
    text = "\n".join(ENTRY.format(a=i >> 8 & 255, b=i & 255, port=1024 + i % 60000, i=i)
                     for i in range(ENTRIES)) + "\n"
    server = fake_vswitchd(tmp_path, text)
    source = OvsSource(ConnectionFilter(frozenset(), ALL_PROTOCOLS), str(tmp_path))

    async def poll():
        start = time.thread_time()  # CPU of this thread alone: the event loop's
        connections = await source.poll()
        return connections, time.thread_time() - start

    connections, loop_cpu = asyncio.run(poll())
    server.join(timeout=30)
    assert len(connections) == ENTRIES and source.parse_errors == 0
    assert [c.id for c in connections[:3]] == [0, 1, 2]
    assert connections[-1].source_port == 1024 + (ENTRIES - 1) % 60000
    # ~30 MB arrive. Read on the loop (`buffer += chunk`, json.loads) this cost the loop's
    # thread 0.16 s of CPU here; read on the loop and decoded in a worker, 0.03 s.
    assert loop_cpu < 0.02, f"the event loop's thread spent {loop_cpu:.3f} s of CPU"
