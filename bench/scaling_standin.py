"""The Ray stand-in workload of bench/scaling.py (used when no trainer command is given): one
GRPO-shaped step run by one Ray actor pinned per node, torch.distributed gloo between them --
rollout = batched decode steps that read all weights plus a growing KV cache, logprob = a forward
pass, update = forward and backward matmuls plus a gradient all-reduce across nodes, weight_sync =
each node's hand-over copy of the weights into its "engine" -- and the performance model's
prediction for it (this machine's measured peaks, every efficiency factor at 1).

The actor class is built inside `_worker_class()` so that Ray ships it by value: the nodes need
`sage_megatron` importable, not this file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import time
from pathlib import Path

from sage_megatron.perf.catalogue import CPU_THIS_MACHINE, ModelSpec, measure_cpu_hardware
from sage_megatron.perf.formulas import Efficiency, Layout, Workload, step_time


@dataclasses.dataclass(frozen=True)
class StandIn:
    """One GRPO-shaped step for the stand-in (sizes chosen to take ~1 s per step on one core)."""

    prompts: int = 8
    samples: int = 4
    prompt_tokens: int = 16
    response_tokens: int = 32
    """Mean; lengths are spread evenly over [1, 2 * mean] like the perf model's uniform assumption."""
    optimizer_steps: int = 2
    threads: int = 1

    def workload(self) -> Workload:
        return Workload(prompts=self.prompts, samples=self.samples, prompt_tokens=self.prompt_tokens,
                        response_tokens=self.response_tokens, max_response_tokens=2 * self.response_tokens,
                        optimizer_steps=self.optimizer_steps, micro_batch_tokens=10**9, length_dist="uniform")


def _worker_class():
    import ray

    @ray.remote(num_cpus=1)
    class Worker:
        """One emulated node's share of the stand-in step."""

        def __init__(self, threads: int) -> None:
            import torch

            torch.set_num_threads(threads)
            self.threads = threads

        def where(self) -> tuple[str, str, int]:
            import ray as _ray

            ip = _ray.util.get_node_ip_address()
            with socket.socket() as s:
                s.bind((ip, 0))
                port = s.getsockname()[1]
            return ip, socket.gethostname(), port

        def init_group(self, rank: int, world: int, master: str) -> None:
            import datetime

            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=120))
            self.rank, self.world = rank, world

        def close(self) -> None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

        def measure(self, net_bytes: int) -> dict:
            """This node's matmul FLOP/s (bf16), copy bandwidth, and the all-reduce bus bandwidth."""
            import torch
            import torch.distributed as dist

            hw = measure_cpu_hardware(threads=self.threads, seconds=0.3)
            a = torch.randn(256, 256, dtype=torch.bfloat16)
            a @ a
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.3:
                a @ a
                n += 1
            flops = 2 * 256 ** 3 * n / (time.perf_counter() - t0)
            net = math.nan
            if self.world > 1:
                x = torch.ones(net_bytes // 2, dtype=torch.bfloat16)
                dist.all_reduce(x)
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(3):
                    dist.all_reduce(x)
                el = (time.perf_counter() - t0) / 3
                net = 2 * (self.world - 1) / self.world * net_bytes / el  # ring bus bandwidth
            return {"flops": flops, "mem_bw": hw.hbm_bw, "net_bw": net}

        def build(self, spec: dict, seed: int) -> int:
            import torch

            g = torch.Generator().manual_seed(seed)
            m = ModelSpec(**spec)
            h, d, f = m.hidden, m.hd, m.ffn
            shapes = []
            for _ in range(m.layers):
                shapes += [(h, m.heads * d), (h, m.kv_heads * d), (h, m.kv_heads * d), (m.heads * d, h),
                           (h, f), (h, f), (f, h)]
            shapes.append((h, m.vocab))
            self.weights = [(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for s in shapes]
            self.engine = [torch.empty_like(w) for w in self.weights]
            self.model = m
            self.kv_elems = m.kv_bytes_per_token() // 2
            return sum(w.numel() for w in self.weights)

        def _chain(self, x):
            """A forward pass of the stand-in transformer minus attention scores: every weight
            matrix used once per token (q, k, v, o, gate, up, down per layer; then the head)."""
            ws = self.weights
            for i in range(self.model.layers):
                q, k, v, o, gate, up, down = ws[7 * i: 7 * i + 7]
                a = x @ q
                x @ k, x @ v
                x = x + a @ o
                x = x + ((x @ gate) * (x @ up)) @ down
            return x @ ws[-1]

        def step(self, cfg: dict) -> dict:
            import torch
            import torch.distributed as dist

            def phase(fn):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dist.barrier()
                return time.perf_counter() - t0

            m, world = self.model, self.world
            seqs = cfg["prompts"] * cfg["samples"]
            mine = [i for i in range(seqs) if i % world == self.rank]
            R = cfg["response_tokens"]
            lengths = [max(1, round((i + 0.5) / max(seqs, 1) * 2 * R)) for i in range(seqs)]
            lengths = [lengths[i] for i in mine]
            P, b = cfg["prompt_tokens"], len(mine)

            def rollout():
                if b == 0:
                    return
                kv = torch.zeros(b, P + 2 * R, self.kv_elems, dtype=torch.bfloat16)
                self._chain(torch.randn(b * P, m.hidden, dtype=torch.bfloat16))  # prefill
                for t in range(max(lengths)):
                    alive = sum(1 for n in lengths if n > t)
                    self._chain(torch.randn(alive, m.hidden, dtype=torch.bfloat16))
                    kv[:alive, : P + t].sum()

            tokens_total = seqs * (P + R)
            my_tokens = max(1, tokens_total // world)

            def logprob():
                self._chain(torch.randn(my_tokens, m.hidden, dtype=torch.bfloat16))

            def update():
                for _ in range(cfg["optimizer_steps"]):
                    x = torch.randn(my_tokens // cfg["optimizer_steps"], m.hidden, dtype=torch.bfloat16)
                    for _ in range(3):  # forward + backward ~ 3 forward passes of matmuls
                        self._chain(x)
                    flat = torch.cat([w.reshape(-1) for w in self.weights])
                    dist.all_reduce(flat)

            def weight_sync():
                for w, e in zip(self.weights, self.engine):
                    e.copy_(w)

            times = {"time/rollout": phase(rollout), "time/hint": 0.0, "time/logprob": phase(logprob),
                     "time/update": phase(update), "time/weight_sync": phase(weight_sync)}
            times["time/step"] = sum(times.values())
            return times

    return Worker


def run_stand_in(*, nodes: int, stand: StandIn, steps: int, metrics_path: Path, model: ModelSpec,
                 net_bytes: int = 8 << 20) -> dict:
    """Runs the stand-in on `nodes` Ray nodes; writes per-step metrics JSONL; returns measured hardware."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [n for n in ray.nodes() if n["Alive"]]
    alive.sort(key=lambda n: (not n.get("Resources", {}).get("node:__internal_head__"), n["NodeManagerAddress"]))
    if nodes > len(alive):
        raise RuntimeError(f"{nodes} nodes asked for, the Ray cluster has {len(alive)}")
    Worker = _worker_class()
    workers = [Worker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote(stand.threads) for n in alive[:nodes]]
    try:
        where = ray.get([w.where.remote() for w in workers], timeout=120)
        master = f"{where[0][0]}:{where[0][2]}"
        ray.get([w.init_group.remote(i, nodes, master) for i, w in enumerate(workers)], timeout=180)
        hw = ray.get([w.measure.remote(net_bytes) for w in workers], timeout=300)
        spec = dataclasses.asdict(model)
        ray.get([w.build.remote(spec, 0) for w in workers], timeout=120)
        cfg = dataclasses.asdict(stand)
        with open(metrics_path, "w") as f:
            for s in range(steps):
                t = ray.get([w.step.remote(cfg) for w in workers], timeout=600)[0]
                f.write(json.dumps({"step": s, **t}) + "\n")
        ray.get([w.close.remote() for w in workers], timeout=60)
    finally:
        for w in workers:
            ray.kill(w)
    return {"hosts": [w[1] for w in where], "ips": [w[0] for w in where],
            "flops": min(h["flops"] for h in hw), "mem_bw": min(h["mem_bw"] for h in hw),
            "net_bw": min((h["net_bw"] for h in hw if not math.isnan(h["net_bw"])), default=math.nan)}


def stand_in_prediction(*, nodes: int, stand: StandIn, model: ModelSpec, measured: dict) -> dict:
    """The perf model for the stand-in: one device per node, measured peaks, efficiencies 1."""
    net = measured["net_bw"] if not math.isnan(measured["net_bw"]) else CPU_THIS_MACHINE.inter_bw
    hw = dataclasses.replace(CPU_THIS_MACHINE, name="this CPU (measured)", peak_flops=measured["flops"],
                             peak_flops_fp8=measured["flops"], hbm_bw=measured["mem_bw"],
                             intra_bw=measured["mem_bw"], inter_bw=net)
    eff = Efficiency(compute=1.0, prefill=1.0, hbm=1.0, intra_link=1.0, inter_link=1.0, tp_overlap=0.0,
                     dp_overlap=0.0, decode_step_overhead_s=0.0, sync_bucket_latency_s=0.0,
                     sync_tensor_overhead_s=0.0, step_overhead_s=0.0, gpu_memory_utilization=1.0,
                     colocated_swap=False)
    lay = Layout(nodes=nodes, devices_per_node=1, tp=1, pp=1, rollout_tp=1)
    return step_time(model, lay, stand.workload(), hw, eff).as_metrics()
