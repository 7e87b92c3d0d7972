"""What ovsflow's check in Antrea mode costs Open vSwitch on a large node: the lab stand-in's
pipeline (lab/antrea.py, Output table included) plus --flows policy flows (conjunction
clauses in AntreaPolicyEgressRule and AntreaPolicyIngressRule, as a node with many Pods and
rules has) and, for each of their rules, its metric table's deny flow (EgressMetric or
IngressMetric `reg0=0x400/0x400,reg3=<rule> actions=drop`), on a bridge at OpenFlow
1.0+1.5, read over one OpenFlow 1.5 session.

Timed in one run, interleaved (A B C D E F A B ...), median and p99 of --runs round trips:
- A: the check: one flow stats request over every table, loosely matched on
     OutputToControllerRegMark (reg0=0x400000/0x600000): Antrea's controller flows only
- B: the earlier check once the Output table was known: every flow of that table
- C: the earlier check while no NetworkPolicy flow was found: every flow of every table
- D: a read of every table's name (OFPMP_TABLE_FEATURES)
- E: the deny totals' read of the rules' counters: every table, loosely matched on the
     deny mark (reg0=0x400/0x400): the metric tables' deny flows only
- F: the deny totals' read of the default drops: every flow of EgressDefaultRule (and as
     much again for IngressDefaultRule)

Needs root and Open vSwitch. Run: python bench/bench_antrea_check.py [--flows 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.antrea_pipeline import SCENARIO, TABLE, Pipeline, Pod  # noqa: E402
from lab.ovs_lab import OvsLab  # noqa: E402
from openflow import messages as m  # noqa: E402
from openflow.connection import OpenFlowConnection  # noqa: E402
from openflow.oxm import register_field  # noqa: E402

PODS = {name: Pod(name, "bench", (f"10.58.0.{i}",), f"02:00:00:00:00:{i:02x}", i)
        for i, name in enumerate(("client", "server", "web", "dns", "vault", "client6"), 1)}
PODS["server6"] = Pod("server6", "bench", ("fd00:58::2",), "02:00:00:00:00:07", 7)


def policy_flows(count: int) -> list[str]:
    """Conjunction clauses of many rules: source addresses in the egress table, destination
    ports (reg1) in the ingress table; each rule's deny flow in its metric table."""
    flows = []
    for index in range(count):
        rule = 1000 + index // 50
        if index % 50 == 0:
            metric = TABLE["EgressMetric" if rule % 2 else "IngressMetric"]
            flows.append(f"table={metric},priority=200,reg0=0x400/0x400,reg3={rule:#x},"
                         "actions=drop")
        if index % 2:
            flows.append(f"table={TABLE['AntreaPolicyEgressRule']},priority={10000 + rule % 4000},"
                         f"ip,nw_src=10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255},"
                         f"actions=conjunction({rule},1/2)")
        else:
            flows.append(f"table={TABLE['AntreaPolicyIngressRule']},priority="
                         f"{10000 + rule % 4000},reg1={index + 100:#x},"
                         f"actions=conjunction({rule},2/2)")
    return flows


async def timings(path: str, runs: int) -> dict[str, list[float]]:
    connection = await OpenFlowConnection.open_unix(path)
    v = connection.version
    output = TABLE["Output"]
    requests = {
        "A check (loose match on the controller reg mark)": lambda xid: m.flow_stats_request(
            xid, match=[register_field(0, 0x400000, 0x600000, version=v)], version=v),
        "B the Output table's flows": lambda xid: m.flow_stats_request(xid, output, version=v),
        "C every flow of every table": lambda xid: m.flow_stats_request(xid, version=v),
        "D every table's name": lambda xid: m.table_features_request(xid, version=v),
        "E totals: loose match on the deny mark": lambda xid: m.flow_stats_request(
            xid, match=[register_field(0, 0x400, 0x400, version=v)], version=v),
        "F totals: EgressDefaultRule's flows": lambda xid: m.flow_stats_request(
            xid, TABLE["EgressDefaultRule"], version=v),
    }
    found = {}
    times: dict[str, list[float]] = {name: [] for name in requests}
    try:
        for _ in range(runs):
            for name, build in requests.items():
                started = time.perf_counter()
                parts = await connection.request_all(build, timeout=60)
                times[name].append(time.perf_counter() - started)
                found[name] = sum(len(getattr(p, "flows", getattr(p, "tables", [])))
                                  for p in parts)
    finally:
        await connection.close()
    return {f"{name} ({found[name]} entries)": values for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-antrea-") as directory:
        lab = OvsLab(Path(directory) / "ovs")
        try:
            pipeline = Pipeline(62373, 1, PODS, SCENARIO).build()
            flows = Path(directory) / "flows.txt"
            lines = pipeline.flows + policy_flows(args.flows)
            flows.write_text("\n".join(lines) + "\n")
            groups = Path(directory) / "groups.txt"
            groups.write_text("\n".join(pipeline.groups) + "\n")
            lab.ofctl("add-meter", "meter=256,pktps,burst,band=type=drop,rate=5000,"
                                   "burst_size=10000")
            lab.ofctl("add-groups", str(groups))
            lab.ofctl("add-flows", str(flows))
            results = asyncio.run(timings(f"{lab.run_dir}/{lab.bridge}.mgmt", args.runs))
        finally:
            lab.stop()
    print(f"{len(lines)} flows on the bridge, OpenFlow 1.5, "
          f"{args.runs} runs interleaved")
    for name, values in results.items():
        values.sort()
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        print(f"  {name}: median {statistics.median(values) * 1000:.2f} ms, "
              f"p99 {p99 * 1000:.2f} ms")


if __name__ == "__main__":
    main()
