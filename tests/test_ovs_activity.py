"""Activity on the OVS userspace datapath, which keeps no counters: the remaining `timeout=`
it prints is refreshed by each packet. A quiet connection gets its first record, its
idle-timeout record and then nothing; a busy one beside it gets its active-timeout records
and never an idle one.
Real Open vSwitch (lab/ovs_lab.py), `ovsflow run`, records decoded by the PyPI `ipfix`
package."""

from __future__ import annotations

import signal
import subprocess
import time
from datetime import timezone

from helpers import OVSFLOW, agent_config
from ipfix_sink import DatagramSink
from lab.ovs_lab import CONNTRACK_PIPELINE, OvsLab
from ovsflow.record import ACTIVE_TIMEOUT, FORCED_END, IDLE_TIMEOUT

QUIET_PORT, BUSY_PORT = 6001, 6002


def test_a_quiet_connection_ends_idle_and_a_busy_one_stays_active(tmp_path):
    lab = OvsLab(tmp_path / "ovs")
    sink = DatagramSink(tmp_path / "datagrams")
    agent = None
    try:
        client = lab.add_pod("10.69.0.1/24", name="client")
        server = lab.add_pod("10.69.0.2/24", name="server")
        for flow in CONNTRACK_PIPELINE:
            lab.ofctl("add-flow", flow)
        config = agent_config(
            tmp_path, sink.port, ["udp"],
            flowExporter={"flowPollInterval": "500ms", "activeFlowExportTimeout": "1s",
                          "idleFlowExportTimeout": "3s"},
            conntrack={"source": "ovs", "zones": [65520]},
            ovs={"runDir": lab.run_dir, "bridge": lab.bridge})
        agent = subprocess.Popen([OVSFLOW, "run", "--config", config], stderr=subprocess.PIPE,
                                 text=True)
        time.sleep(2)
        client.traffic("udp", server.address, str(QUIET_PORT), "1", "50", "5001")
        started = time.time()
        while time.time() - started < 10:
            client.traffic("udp", server.address, str(BUSY_PORT), "1", "50", "5002")
            time.sleep(0.3)
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=60) == 0, agent.stderr.read()
        time.sleep(0.5)
        records = sink.records()
        sink.stop()
        lab.stop()

    def reasons(port):
        return [(r["flowEndReason"], r["flowEndMilliseconds"].replace(
            tzinfo=timezone.utc).timestamp()) for r in records
            if r.get("destinationTransportPort") == port]

    quiet, busy = reasons(QUIET_PORT), reasons(BUSY_PORT)
    # quiet: its first record, its idle record once it has been quiet for the idle timeout,
    # then nothing for the remaining ~6 s until the forced end of SIGTERM (no export state
    # here). An earlier rule sent an active record every second until the idle one; the
    # one before that, every second after it too.
    assert [reason for reason, _ in quiet] == [ACTIVE_TIMEOUT, IDLE_TIMEOUT, FORCED_END], quiet
    idle_at = next(end for reason, end in quiet if reason == IDLE_TIMEOUT)
    assert idle_at - started < 5
    # busy: never idle, and an active record whenever its activity was seen since the
    # previous one: a packet shows once the remaining timeout has moved on by more than
    # 1.5 s (the whole seconds OVS prints), so with 500 ms polls about every 1.5-2 s, and
    # never an active record without activity before it
    assert {reason for reason, _ in busy} <= {ACTIVE_TIMEOUT, FORCED_END}, busy
    assert [reason for reason, _ in busy].count(ACTIVE_TIMEOUT) >= 5, busy
    ends = [end for reason, end in busy if reason == ACTIVE_TIMEOUT]
    assert all(later - earlier >= 0.9 for earlier, later in zip(ends, ends[1:])), busy
