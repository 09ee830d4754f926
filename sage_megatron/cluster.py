"""Where the trainer's Megatron ranks and the rollout engines go: one resource ledger over Ray's nodes.

Pure planning (no Ray calls): ``plan_cluster`` takes the alive nodes (``rollout.placement.alive_nodes``
format: ip, hostname, cpus, gpus; head first) and decides, before anything starts,

- ranks: global rank r on node ``r // ranks_per_node``. Megatron orders ranks tp fastest, then dp,
  then pp, so with ``ranks_per_node`` a multiple of tp a TP group stays inside a node while DP and PP
  cross nodes;
- engines: disaggregated first (nodes that hold no trainer rank), then the nodes with room left;
  "spread" round-robin over those candidates, "pack" fills the first candidate;
- per-node demand in Ray resources (a GPU per rank and per engine TP rank on GPU nodes; CPU slots on
  CPU nodes, so the same accounting runs here), refused with the numbers when it does not fit.

Ray then enforces the plan: rank actors and engines sit in placement-group bundles pinned to their
node through its ``node:<ip>`` resource, so an engine can never be handed a trainer rank's device.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sage_megatron.config import ConfigError

PIN = 0.001   # amount of the node's "node:<ip>" resource a bundle asks for: pins it to that node


class LayoutDoesNotFit(ConfigError):
    """The ranks and engines asked for do not fit the cluster's nodes (message carries the numbers)."""


@dataclass(frozen=True)
class ClusterPlan:
    nodes: list[dict]                 # alive nodes, head first
    rank_nodes: list[int]             # node index of each global rank
    engine_nodes: list[int]           # node index of each engine
    rank_bundle: dict[str, float]     # Ray resources of one rank
    engine_bundle: dict[str, float]   # Ray resources of one engine bundle (engine_tp of them per engine)
    engine_tp: int = 1

    def local_rank(self, rank: int) -> int:
        """Index of ``rank`` among the ranks on its node (LOCAL_RANK)."""
        return self.rank_nodes[:rank].count(self.rank_nodes[rank])

    def ranks_on(self, node: int) -> int:
        return self.rank_nodes.count(node)

    def rank_bundles(self) -> list[dict[str, float]]:
        return [{**self.rank_bundle, f"node:{self.nodes[n]['ip']}": PIN} for n in self.rank_nodes]

    def engine_ips(self) -> list[str]:
        return [self.nodes[n]["ip"] for n in self.engine_nodes]

    def lines(self) -> list[str]:
        out = []
        for i, n in enumerate(self.nodes):
            ranks = [r for r, m in enumerate(self.rank_nodes) if m == i]
            engines = [k for k, m in enumerate(self.engine_nodes) if m == i]
            out.append(f"node {n['hostname']} ({n['ip']}): ranks {_span(ranks)}, engines {_span(engines)}")
        return out


def _span(items: list[int]) -> str:
    if not items:
        return "-"
    return f"{items[0]}-{items[-1]}" if items == list(range(items[0], items[-1] + 1)) and len(items) > 1 \
        else ",".join(map(str, items))


def default_ranks_per_node(*, world_size: int, device: str, nodes: Sequence[dict]) -> int:
    """A node's GPU count on GPU nodes; on CPU every rank on the first node (one machine as before)."""
    if device == "cuda":
        return max(1, int(nodes[0]["gpus"]))
    return world_size


def plan_cluster(*, world_size: int, nodes: Sequence[dict], device: str, ranks_per_node: int = 0,
                 cpus_per_rank: float = 1.0, num_engines: int = 1, engine_tp: int = 1,
                 cpus_per_engine: float = 1.0, placement: str = "auto") -> ClusterPlan:
    """The whole job's placement, or ``LayoutDoesNotFit`` naming needed vs available per node."""
    if not nodes:
        raise LayoutDoesNotFit("the Ray cluster has no alive node")
    if placement not in ("auto", "pack", "spread"):
        raise ValueError(f"placement must be auto, pack or spread, got {placement!r}")
    rpn = ranks_per_node or default_ranks_per_node(world_size=world_size, device=device, nodes=nodes)
    need_nodes = -(-world_size // rpn)
    if need_nodes > len(nodes):
        raise LayoutDoesNotFit(
            f"{world_size} trainer ranks at cluster.ranks_per_node={rpn} need {need_nodes} nodes, the Ray cluster "
            f"has {len(nodes)} ({', '.join(n['hostname'] for n in nodes)}): raise cluster.ranks_per_node or "
            f"ask Slurm for more nodes (-N)")
    gpu = device == "cuda"
    rank_bundle = {"GPU": 1.0, "CPU": cpus_per_rank} if gpu else {"CPU": cpus_per_rank}
    engine_bundle = {"GPU": 1.0, "CPU": cpus_per_engine} if gpu else {"CPU": cpus_per_engine}
    per_engine = engine_tp if gpu else 1
    rank_nodes = [r // rpn for r in range(world_size)]
    free = [{"CPU": float(n["cpus"]), "GPU": float(n["gpus"])} for n in nodes]
    for m in rank_nodes:
        _take(free[m], rank_bundle, 1)

    with_ranks = set(rank_nodes)
    candidates = ([i for i in range(len(nodes)) if i not in with_ranks]
                  + [i for i in range(len(nodes)) if i in with_ranks])
    mode = placement if placement != "auto" else ("spread" if len(nodes) > 1 else "pack")
    engine_nodes: list[int] = []
    cursor = 0
    for _ in range(num_engines):
        order = candidates[cursor:] + candidates[:cursor] if mode == "spread" else candidates
        chosen = next((i for i in order if _fits(free[i], engine_bundle, per_engine)), None)
        if chosen is None:
            break
        _take(free[chosen], engine_bundle, per_engine)
        engine_nodes.append(chosen)
        cursor = (candidates.index(chosen) + 1) % len(candidates)
    over = [i for i, f in enumerate(free) if f["CPU"] < -1e-9 or f["GPU"] < -1e-9]
    if over or len(engine_nodes) < num_engines:
        raise LayoutDoesNotFit(_not_fit_message(nodes, rank_nodes, rank_bundle, num_engines, engine_bundle,
                                                per_engine, gpu))
    return ClusterPlan(list(nodes), rank_nodes, engine_nodes, rank_bundle, engine_bundle, engine_tp=per_engine)


def _fits(free: dict, bundle: dict, count: int) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v * count for k, v in bundle.items())


def _take(free: dict, bundle: dict, count: int) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v * count


def _not_fit_message(nodes, rank_nodes, rank_bundle, num_engines, engine_bundle, per_engine, gpu) -> str:
    kind = "GPU" if gpu else "CPU"
    per_node = ", ".join(
        f"{n['hostname']}: {rank_nodes.count(i)} rank(s) take {kind} {rank_nodes.count(i) * rank_bundle[kind]:g} "
        f"of {n[kind.lower() + 's']:g}" for i, n in enumerate(nodes))
    total_need = len(rank_nodes) * rank_bundle[kind] + num_engines * per_engine * engine_bundle[kind]
    total_have = sum(float(n[kind.lower() + "s"]) for n in nodes)
    return (f"layout does not fit: {len(rank_nodes)} trainer rank(s) x {kind} {rank_bundle[kind]:g} + "
            f"{num_engines} engine(s) x {kind} {per_engine * engine_bundle[kind]:g} need {kind} {total_need:g}, "
            f"the cluster has {total_have:g} ({per_node}, engines need whole room on one node); lower "
            f"rollout.num_engines, cluster.cpus_per_rank or rollout.cpus_per_engine, or add nodes")
