"""The trainer's Megatron ranks as Ray actors, one process per rank, placed by a ``ClusterPlan``.

    with ray_cluster(address, local_cpus=...) as nodes:        # join $RAY_ADDRESS, or a local Ray
        plan = plan_cluster(world_size=..., nodes=nodes, ...)  # refused before anything starts
        results = run_on_ranks(fn, args, plan=plan)            # fn(*args) on every rank

Each rank actor sits in a bundle of one placement group, pinned to its planned node, so trainer ranks
and the engines (placed by the pool in bundles of their own) draw from one Ray ledger. Every rank gets
torch.distributed's env:// variables: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR =
rank 0's node, MASTER_PORT free there, and the gloo interface that carries its node's address. The
same code runs on one machine (local Ray, every rank on it) and over a Slurm job's Ray cluster.

The driver watches the ranks: the first rank that raises or dies (its process, or its node) ends the
run at once with the rank and node named; the others are killed, and with rank 0 the engines it owns.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from typing import Any, Callable

from sage_megatron.cluster import ClusterPlan


def say(msg: str) -> None:
    print(f"[actor] {msg}", file=sys.stderr, flush=True)


class RankActor:
    """One trainer rank's process."""

    def where(self) -> dict[str, Any]:
        import ray

        from sage_megatron.procs import free_port

        ip = ray.util.get_node_ip_address()
        return {"hostname": socket.gethostname(), "ip": ip, "port": free_port(ip), "pid": os.getpid()}

    def run(self, fn: Callable, args: tuple, env: dict[str, str], threads: int) -> Any:
        os.environ.update(_resolve_iface(env))   # the interface is looked up on the rank's own node
        import torch

        torch.set_num_threads(threads)
        try:
            return fn(*args)
        finally:
            from sage_megatron.procs import reap_children

            reap_children()


@contextlib.contextmanager
def ray_cluster(address: str | None, *, local_cpus: int):
    """Join the Ray cluster at ``address`` (see ``ray_address_to_join``) or start a local one with
    ``local_cpus`` CPU slots; yields the alive nodes (head first); shuts down what it started."""
    import ray

    from sage_megatron.rollout.placement import alive_nodes, ray_address_to_join

    # Every rank's output reaches this process (log_to_driver; engines keep theirs in their own log file).
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")      # no colour codes in log files
    join = ray_address_to_join(address, os.environ)
    started = not ray.is_initialized()
    if started:
        if join:
            ray.init(address=join, log_to_driver=True)
        else:
            ray.init(address="local" if os.environ.get("RAY_ADDRESS") else None, num_cpus=local_cpus,
                     include_dashboard=False, log_to_driver=True)
    try:
        yield alive_nodes(ray.nodes())
    finally:
        if started:
            ray.shutdown()


def gloo_interface(ip: str) -> str | None:
    """The network interface that carries ``ip`` on this node (gloo pairs over it), if any."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def rank_env(plan: ClusterPlan, rank: int, *, master: dict, node_ip: str) -> dict[str, str]:
    """torch.distributed's env:// variables for ``rank`` (plus where it runs, for its start line)."""
    one_node = len(set(plan.rank_nodes)) == 1
    env = {"RANK": str(rank), "WORLD_SIZE": str(len(plan.rank_nodes)), "LOCAL_RANK": str(plan.local_rank(rank)),
           "LOCAL_WORLD_SIZE": str(plan.ranks_on(plan.rank_nodes[rank])),
           "MASTER_ADDR": "127.0.0.1" if one_node else master["ip"], "MASTER_PORT": str(master["port"]),
           "SAGE_NODE_IP": node_ip,
           "CUDA_DEVICE_MAX_CONNECTIONS": "1"}   # megatron-core's requirement for TP communication overlap
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        # One node: loopback (a bridge or namespace veth can hang gloo's pairing); several: the
        # interface of the node's Ray address, found on the rank's own node (see RankActor.run).
        env["GLOO_SOCKET_IFNAME"] = "lo" if one_node else f"@ip:{node_ip}"
    return env


def _resolve_iface(env: dict[str, str]) -> dict[str, str]:
    value = env.get("GLOO_SOCKET_IFNAME", "")
    if value.startswith("@ip:"):
        iface = gloo_interface(value[4:])
        env = {k: v for k, v in env.items() if k != "GLOO_SOCKET_IFNAME"}
        if iface:   # else gloo uses the address the hostname resolves to
            env["GLOO_SOCKET_IFNAME"] = iface
    return env


def run_on_ranks(fn: Callable, args: tuple, *, plan: ClusterPlan, ready_timeout_s: float = 300.0,
                 watch_interval_s: float = 2.0) -> list[Any]:
    """``fn(*args)`` on one Ray actor per rank; each rank's return value, in rank order."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    world = len(plan.rank_nodes)
    pg = placement_group(plan.rank_bundles(), strategy="PACK")
    actors: list[Any] = []
    try:
        try:
            ray.get(pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"Ray could not reserve the trainer's {world} rank bundle(s) {plan.rank_bundles()} "
                               f"within {ready_timeout_s:.0f} s (available: {ray.available_resources()})") from None
        gpus = plan.rank_bundle.get("GPU", 0)
        remote = ray.remote(RankActor)
        for r in range(world):
            actors.append(remote.options(
                num_cpus=plan.rank_bundle["CPU"], num_gpus=gpus, max_restarts=0, name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                     placement_group_bundle_index=r)).remote())
        where = ray.get([a.where.remote() for a in actors], timeout=ready_timeout_s)
        for r, w in enumerate(where):
            planned = plan.nodes[plan.rank_nodes[r]]["ip"]
            if w["ip"] != planned:
                raise RuntimeError(f"rank {r} landed on {w['ip']}, planned on {planned}")
        ncpu = os.cpu_count() or 1
        refs = {}
        for r, a in enumerate(actors):
            threads = max(1, ncpu // plan.ranks_on(plan.rank_nodes[r]))
            env = rank_env(plan, r, master=where[0], node_ip=where[r]["ip"])
            refs[a.run.remote(fn, args, env, threads)] = r
        return _watch(refs, where, plan, watch_interval_s)
    finally:
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(pg)


def _watch(refs: dict, where: list[dict], plan: ClusterPlan, interval_s: float) -> list[Any]:
    """Wait for every rank; the first failure (an exception, a dead actor, a dead node) ends the run."""
    import ray

    results: dict[int, Any] = {}
    pending = list(refs)
    rank_ips = {w["ip"] for w in where}
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=interval_s)
        for ref in done:
            r = refs[ref]
            try:
                results[r] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                raise RankFailed(f"rank {r} on {where[r]['hostname']} ({where[r]['ip']}) failed:\n"
                                 f"{exc.cause if exc.cause is not None else exc}") from None
            except ray.exceptions.RayError as exc:
                raise RankFailed(f"rank {r} on {where[r]['hostname']} ({where[r]['ip']}) died: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
        if pending and not done:
            dead = [n for n in ray.nodes() if not n.get("Alive") and n.get("NodeManagerAddress") in rank_ips]
            if dead:
                n = dead[0]
                ranks = [r for r, w in enumerate(where) if w["ip"] == n["NodeManagerAddress"]]
                raise RankFailed(f"node {n.get('NodeManagerHostname')} ({n['NodeManagerAddress']}) died with "
                                 f"rank(s) {ranks} on it")
    return [results[r] for r in range(len(where))]


class RankFailed(RuntimeError):
    """A trainer rank raised, died, or lost its node; the message names the rank and the node."""

