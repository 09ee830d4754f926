"""Stand-in for the trainer in Slurm launch tests: proves the job's Ray cluster spans its nodes.

    SAGE_TRAIN_CMD="python -m sage_megatron.testing.ray_probe --expect-nodes 2" sbatch -N 2 scripts/slurm/train.sbatch

Connects to the Ray cluster (RAY_ADDRESS, as train.sbatch exports it), runs one task pinned to
each alive node (NodeAffinitySchedulingStrategy, soft=False: the task must run on that node or
fail), and prints one line per node:

    RAY_PROBE node=<node_id> ip=<ip the task saw> hostname=<hostname the task saw>

then `RAY_PROBE_OK nodes=<n> distinct_ips=<k>`. Exits 1 if fewer than --expect-nodes nodes are
alive, if a task ran somewhere else than where it was pinned, or if the nodes do not have
--expect-nodes distinct IPs (two raylets on one address are not two nodes). `--fail-with N`
exits with status N after the probe (to test that a failing step fails the job).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys


def _where() -> dict:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"))
    ap.add_argument("--expect-nodes", type=int, default=int(os.environ.get("SAGE_NUM_NODES", "1")))
    ap.add_argument("--fail-with", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args(argv)

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=a.address, logging_level="WARNING", log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    where = ray.remote(num_cpus=0)(_where)
    refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False))
            .remote() for n in nodes]
    results = ray.get(refs, timeout=a.timeout)
    ok = True
    for n, r in zip(nodes, results):
        print(f"RAY_PROBE node={r['node_id']} ip={r['ip']} hostname={r['hostname']} "
              f"registered_ip={n['NodeManagerAddress']}", flush=True)
        if r["node_id"] != n["NodeID"]:
            print(f"RAY_PROBE_ERROR task pinned to {n['NodeID']} ran on {r['node_id']}", flush=True)
            ok = False
    ips = {r["ip"] for r in results}
    if len(nodes) < a.expect_nodes or len(ips) < a.expect_nodes:
        print(f"RAY_PROBE_ERROR expected {a.expect_nodes} nodes with distinct IPs, got {len(nodes)} nodes, "
              f"{len(ips)} distinct IPs {sorted(ips)}", flush=True)
        ok = False
    if ok:
        print(f"RAY_PROBE_OK nodes={len(nodes)} distinct_ips={len(ips)}", flush=True)
    ray.shutdown()
    if not ok:
        return 1
    return a.fail_with


if __name__ == "__main__":
    sys.exit(main())
