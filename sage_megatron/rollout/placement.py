"""Where the pool's engines go: placement plans over Ray's nodes, CPU core binding, cluster lines."""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PLACEMENTS = ("auto", "pack", "spread")


@dataclass(frozen=True)
class PlacementPlan:
    """The placement group to ask Ray for, and which node each engine is pinned to (if any)."""

    placement: str                  # resolved: "pack" | "spread" | "planned" (nodes given by the trainer's plan)
    strategy: str                   # Ray placement-group strategy
    bundles: list[dict[str, float]]
    engine_nodes: list[dict | None]  # per engine: the node it is pinned to (None = Ray chooses)

    @property
    def nodes(self) -> list[dict]:
        """The distinct nodes engines are pinned to, in engine order."""
        out: list[dict] = []
        for n in self.engine_nodes:
            if n is not None and n not in out:
                out.append(n)
        return out


def ray_address_to_join(configured: str | None, environ: Mapping[str, str]) -> str | None:
    """The Ray cluster the pool joins: ``configured``; None -> ``$RAY_ADDRESS`` (None when unset:
    start a local Ray); "local" -> None (start a local Ray even when ``$RAY_ADDRESS`` is set)."""
    if configured == "local":
        return None
    return configured or environ.get("RAY_ADDRESS") or None


def ray_cluster_device() -> str:
    """"cuda" when the joined Ray cluster has GPUs, else "cpu" (the one device check over Ray)."""
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def alive_nodes(ray_nodes: Sequence[dict]) -> list[dict]:
    """``ray.nodes()`` -> the alive nodes as ``{node_id, ip, hostname, head, cpus, gpus}``, head node
    first, then by IP (the order "spread" assigns engines in)."""
    out = []
    for n in ray_nodes:
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {}) or {}
        out.append({"node_id": n.get("NodeID"), "ip": n.get("NodeManagerAddress"),
                    "hostname": n.get("NodeManagerHostname") or n.get("NodeManagerAddress"),
                    "head": "node:__internal_head__" in res, "cpus": res.get("CPU", 0.0),
                    "gpus": res.get("GPU", 0.0)})
    return sorted(out, key=lambda n: (not n["head"], _ip_key(n["ip"]), n["node_id"] or ""))


def _ip_key(ip: str | None) -> tuple:
    try:
        return tuple(int(x) for x in (ip or "").split("."))
    except ValueError:
        return (ip or "",)


def plan_placement(placement: str, *, num_engines: int, bundles_per_engine: int, bundle: dict[str, float],
                   nodes: Sequence[dict]) -> PlacementPlan:
    """Bundles and Ray strategy for ``num_engines`` engines of ``bundles_per_engine`` bundles each.

    pack:   Ray's PACK (as few nodes as possible; Ray picks which).
    spread: engine k pinned to ``nodes[k % len(nodes)]`` (``nodes`` in ``alive_nodes`` order: head
            first) through the node's ``node:<ip>`` resource on each of its bundles, so an engine's
            tensor-parallel bundles stay on one node and engines go round-robin over the nodes.
    auto:   spread when ``nodes`` has more than one node, else pack.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if num_engines < 1 or bundles_per_engine < 1:
        raise ValueError(f"need num_engines >= 1 and bundles_per_engine >= 1, got {num_engines}, {bundles_per_engine}")
    if placement == "auto":
        placement = "spread" if len(nodes) > 1 else "pack"
    if placement == "pack" or not nodes:
        return PlacementPlan("pack", "PACK", [dict(bundle) for _ in range(num_engines * bundles_per_engine)],
                             [None] * num_engines)
    engine_nodes = [nodes[k % len(nodes)] for k in range(num_engines)]
    bundles = [{**bundle, f"node:{n['ip']}": 0.001} for n in engine_nodes for _ in range(bundles_per_engine)]
    # The pins decide; SPREAD (soft) never contradicts them, STRICT_SPREAD would split an engine's TP bundles.
    return PlacementPlan("spread", "SPREAD", bundles, engine_nodes)


def pinned_placement(engine_ips: Sequence[str], *, bundles_per_engine: int, bundle: dict[str, float],
                     nodes: Sequence[dict]) -> PlacementPlan:
    """Engine k on the node whose address is ``engine_ips[k]`` (a plan made with the trainer's ranks)."""
    by_ip = {n["ip"]: n for n in nodes}
    missing = [ip for ip in engine_ips if ip not in by_ip]
    if missing:
        raise ValueError(f"engine node(s) {missing} are not alive Ray nodes ({sorted(by_ip)})")
    engine_nodes = [by_ip[ip] for ip in engine_ips]
    bundles = [{**bundle, f"node:{ip}": 0.001} for ip in engine_ips for _ in range(bundles_per_engine)]
    return PlacementPlan("planned", "SPREAD", bundles, engine_nodes)


def cluster_lines(ray_nodes: Sequence[dict]) -> list[str]:
    """One summary line, then one line per node (alive ones first, head first), for the log."""
    alive = alive_nodes(ray_nodes)
    dead = [n for n in ray_nodes if not n.get("Alive")]
    lines = [f"ray cluster: {len(alive)} node(s) alive, {len(dead)} dead: "
             + ", ".join(f"{n['hostname']} ({n['ip']})" for n in alive)]
    for n in alive:
        gpus = f" GPU {n['gpus']:g}" if n["gpus"] else ""
        lines.append(f"node {n['hostname']} {n['ip']} alive{' head' if n['head'] else ''} "
                     f"CPU {n['cpus']:g}{gpus} id {str(n['node_id'])[:12]}")
    for n in dead:
        lines.append(f"node {n.get('NodeManagerHostname')} {n.get('NodeManagerAddress')} dead "
                     f"id {str(n.get('NodeID'))[:12]}")
    return lines


def announce(msg: str) -> None:
    print(f"[rollout] {msg}", file=sys.stderr, flush=True)


def split_even(items: Sequence, k: int) -> list[list]:
    """Contiguous, balanced split of ``items`` into ``k`` lists (sizes differ by at most one)."""
    n = len(items)
    out, start = [], 0
    for i in range(k):
        size = n // k + (1 if i < n % k else 0)
        out.append(list(items[start:start + size]))
        start += size
    return out


def cpu_bind_plan(cores: Sequence[int], *, num_engines: int, tensor_parallel_size: int = 1) -> list[str | None]:
    """VLLM_CPU_OMP_THREADS_BIND strings giving each engine (and TP rank) disjoint cores.

    With fewer cores than engine ranks, ranks share cores round-robin (one core each).
    """
    ranks = num_engines * tensor_parallel_size
    if not cores:
        return [None] * num_engines
    if len(cores) < ranks:
        groups = [[cores[r % len(cores)]] for r in range(ranks)]
    else:
        groups = split_even(list(cores), ranks)
    return ["|".join(_core_list(groups[k * tensor_parallel_size + r]) for r in range(tensor_parallel_size))
            for k in range(num_engines)]


def _core_list(cores: list[int]) -> str:
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    return ",".join(map(str, cores))
