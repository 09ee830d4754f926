"""bf16 against fp32 on this CPU: the actor's update and the engine's decoding, speed and log-prob agreement.

    .venv/bin/python bench/cpu_bf16.py --json docs/results/cpu_bf16_smollm2.json
    .venv/bin/python bench/cpu_bf16.py --rows 4 --repeats 1 --rounds 1 --json docs/results/cpu_bf16_smollm2.json
    # ^ the committed run: 12 minutes on a 2-core CPU without bf16 instructions, where one bf16 train_step
    #   on 32 rows takes over 10 minutes, so the default size only suits a CPU with avx512_bf16 or AMX

``model.dtype`` and ``rollout.engine_dtype`` take ``bfloat16`` on CPU as on GPU; fp32 stays the default
wherever numbers are compared. This measures what the option costs and buys on the machine it runs on,
on SmolLM2-135M-Instruct (imported once from the shipped GGUF, cached under ``--cache-dir``):

* **actor** (one Megatron rank, ``run_distributed``): two ``MegatronActor``s from the same fp32
  checkpoint, one at ``dtype=float32`` and one at ``dtype=bfloat16`` (megatron's bf16 optimizer: fp32
  main weights). Before any step, both compute the log-probs of the same batch; then each round times,
  per actor, ``compute_logprobs`` (forward) and ``train_step`` (forward, backward, AdamW), the actors'
  order alternating between rounds; round 0 is a warm-up.
* **engine** (the trainer's vLLM engine settings, one engine): per round, one pool per dtype, the order
  alternating; each samples the batch's prompts (``--n`` samples, ``--max-tokens``), timed after a
  warm-up call, and, in the first round, scores the batch's full sequences (prompt log-probs).

The batch is real text: the generated arithmetic problems of the SmolLM2 config, each prompt from its
templates through the model's chat template, each response the problem's reference solution and "The
answer is N." with EOS; advantages +-1, so every row trains. Agreement is over response tokens only,
each against the fp32 actor (the trainer's own reference): per-token |log-prob difference| (max and mean)
and the per-sequence |sum| (what an importance ratio over a response sees). The CPU's bf16 instructions
(avx512_bf16, amx_bf16) are recorded: without them bf16 matmuls are emulated and run slower than fp32.
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

from bench.update_packing import rotation  # noqa: E402
from bench.weight_sync import converted  # noqa: E402
from sage_megatron.actor.batch import TrainBatch, row_lengths  # noqa: E402
from sage_megatron.parallel.launch import run_distributed  # noqa: E402
from sage_megatron.parallel.layout import ParallelLayout  # noqa: E402
from sage_megatron.run_inputs import cached_smollm2  # noqa: E402

DTYPES = ("float32", "bfloat16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


def cpu_bf16_flags() -> list[str]:
    """The bf16 instruction sets this CPU reports (empty: bf16 is emulated)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in BF16_CPU_FLAGS if f in words]


def make_batch(tokenizer, *, rows: int, seed: int = 0) -> tuple[TrainBatch, list[list[int]]]:
    """(the train batch, each row's prompt ids): arith problems under the arith templates, each
    answered by its reference solution and "The answer is N." + EOS; advantages alternate +1, -1."""
    from sage_megatron.algo.templates import answer_messages, chat_encoder, load_templates
    from sage_megatron.tasks.arith_data import TEMPLATE_DIR, make_rows

    encode = chat_encoder(tokenizer)
    templates = load_templates(TEMPLATE_DIR)
    prompts, sequences = [], []
    for row in make_rows(rows, seed=seed):
        prompt = list(encode(answer_messages(templates, problem=row["problem"])))
        answer = f"{row['solution']}\nThe answer is {row['answer']}."
        response = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompts.append(prompt)
        sequences.append((prompt, response))
    width = max(len(p) + len(r) for p, r in sequences)
    tokens = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width)
    for i, (p, r) in enumerate(sequences):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p):len(p) + len(r)] = 1.0
    advantages = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(rows)])
    return TrainBatch(tokens=tokens, response_mask=mask, advantages=advantages, old_logp=None), prompts


def agreement(logp: torch.Tensor, reference: torch.Tensor, response_mask: torch.Tensor) -> dict[str, float]:
    """|logp - reference| over response tokens (aligned (B, T) tensors): per token max and mean, and the
    per-sequence |sum| max and mean."""
    diff = (logp.double() - reference.double()) * response_mask.double()
    per_token = diff.abs()[response_mask.bool()]
    per_seq = diff.sum(1).abs()
    return {"max_abs_token": float(per_token.max()), "mean_abs_token": float(per_token.mean()),
            "max_abs_sequence": float(per_seq.max()), "mean_abs_sequence": float(per_seq.mean())}


def engine_logprobs_as_columns(engine: list[list[float]], shape: tuple[int, int]) -> torch.Tensor:
    """vLLM prompt log-probs (per sequence, positions 1..len-1) placed at the actor's columns."""
    out = torch.zeros(shape, dtype=torch.float64)
    for i, row in enumerate(engine):
        out[i, 1:1 + len(row)] = torch.tensor(row, dtype=torch.float64)
    return out


def _actor_world(ckpt: str, batch: TrainBatch, micro_batch_size: int, repeats: int) -> dict:
    from sage_megatron.actor.worker import ActorConfig, MegatronActor
    from sage_megatron.parallel.distributed import init_parallel

    init_parallel(ParallelLayout())
    actors = {d: MegatronActor(ActorConfig(ckpt_dir=ckpt, layout=ParallelLayout(), dtype=d, lr=1e-6,
                                           micro_batch_size=micro_batch_size)) for d in DTYPES}
    logp = {d: actors[d].compute_logprobs(batch) for d in DTYPES}      # same weights: before any step
    seconds = {d: {"forward": [], "train_step": []} for d in DTYPES}
    first: dict[str, dict] = {}
    for round_index in range(repeats + 1):                              # round 0: warm-up, not timed
        for d in rotation(list(DTYPES), round_index):
            t0 = time.perf_counter()
            actors[d].compute_logprobs(batch)
            t1 = time.perf_counter()
            metrics = actors[d].train_step(batch)
            t2 = time.perf_counter()
            first.setdefault(d, metrics)
            if round_index:
                seconds[d]["forward"].append(t1 - t0)
                seconds[d]["train_step"].append(t2 - t1)
    return {"logp": logp, "seconds": seconds, "first_step": first}


def bench_engines(hf_dir: str, prompts: list[list[int]], sequences: list[list[int]], *, n: int, max_tokens: int,
                  temperature: float, rounds: int, repeats: int) -> dict:
    """Per dtype: generated tokens per second (every timed call) and the sequences' prompt log-probs."""
    from sage_megatron.config import RolloutConfig
    from sage_megatron.rollout.pool import RolloutPool, RolloutPoolConfig
    from sage_megatron.rollout.vllm_engine import engine_config_for
    from sage_megatron.types import RolloutRequest, SamplingConfig

    max_len = max(max(len(p) for p in prompts) + max_tokens, max(len(s) for s in sequences)) + 8
    requests = [RolloutRequest(uid=f"p{i}", prompt_ids=tuple(p)) for i, p in enumerate(prompts)]
    sampling = SamplingConfig(n=n, temperature=temperature, max_tokens=max_tokens, seed=0)
    out = {d: {"tokens_per_s": [], "startup_s": [], "prompt_logprobs": None} for d in DTYPES}
    for round_index in range(rounds):
        for d in rotation(list(DTYPES), round_index):
            rollout = RolloutConfig(engine_dtype=d, max_model_len=max_len, kv_cache_gib=1)
            t0 = time.perf_counter()
            pool = RolloutPool(RolloutPoolConfig(engine=engine_config_for(rollout, model_dir=hf_dir, seed=0),
                                                 num_engines=1, verbose=False))
            out[d]["startup_s"].append(time.perf_counter() - t0)
            try:
                pool.generate(requests[:2], SamplingConfig(n=1, max_tokens=8))            # warm-up
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    result = pool.generate(requests, sampling)
                    dt = time.perf_counter() - t0
                    out[d]["tokens_per_s"].append(sum(len(s.response_ids) for v in result.values() for s in v) / dt)
                if out[d]["prompt_logprobs"] is None:
                    out[d]["prompt_logprobs"] = pool.prompt_logprobs(sequences)
            finally:
                pool.shutdown()
    return out


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def summarise(actor: dict, engines: dict | None, batch: TrainBatch) -> dict:
    """The JSON's results: speeds (bf16 over fp32) and agreement against the fp32 actor."""
    mask = batch.response_mask
    reference = actor["logp"]["float32"]
    sec = actor["seconds"]
    res: dict = {"actor": {
        d: {"forward_s": spread(sec[d]["forward"]), "train_step_s": spread(sec[d]["train_step"]),
            "first_step_loss": actor["first_step"][d]["loss"],
            "first_step_grad_norm": actor["first_step"][d]["grad_norm"]} for d in DTYPES}}
    for phase in ("forward", "train_step"):
        res["actor"][f"{phase}_speedup_bf16"] = (statistics.median(sec["float32"][phase])
                                                 / statistics.median(sec["bfloat16"][phase]))
    res["actor"]["bf16_vs_fp32_logprobs"] = agreement(actor["logp"]["bfloat16"], reference, mask)
    if engines is not None:
        res["engine"] = {d: {"tokens_per_s": spread(engines[d]["tokens_per_s"]),
                             "startup_s": spread(engines[d]["startup_s"]),
                             "vs_fp32_actor_logprobs": agreement(
                                 engine_logprobs_as_columns(engines[d]["prompt_logprobs"], tuple(mask.shape)),
                                 reference, mask)} for d in DTYPES}
        res["engine"]["decode_speedup_bf16"] = (statistics.median(engines["bfloat16"]["tokens_per_s"])
                                                / statistics.median(engines["float32"]["tokens_per_s"]))
    return res


def print_table(res: dict) -> None:
    a = res["actor"]
    print(f"{'':<28} {'float32':>16} {'bfloat16':>16} {'bf16 speedup':>13}")
    for label, phase in (("actor forward s", "forward"), ("actor train_step s", "train_step")):
        f, b = a["float32"][f"{phase}_s"], a["bfloat16"][f"{phase}_s"]
        sp = a[f"{phase}_speedup_bf16"]
        print(f"{label:<28} {f['median']:>7.2f} ({f['min']:.2f}-{f['max']:.2f}) "
              f"{b['median']:>6.2f} ({b['min']:.2f}-{b['max']:.2f}) {sp:>10.2f}x")
    if "engine" in res:
        e = res["engine"]
        f, b = e["float32"]["tokens_per_s"], e["bfloat16"]["tokens_per_s"]
        print(f"{'engine decode tokens/s':<28} {f['median']:>7.0f} ({f['min']:.0f}-{f['max']:.0f})   "
              f"{b['median']:>6.0f} ({b['min']:.0f}-{b['max']:.0f})   {e['decode_speedup_bf16']:>8.2f}x")
    print("\nlog-prob agreement with the fp32 actor, response tokens (max / mean per token; max / mean per sequence):")
    rows = [("actor bf16", a["bf16_vs_fp32_logprobs"])]
    if "engine" in res:
        rows += [(f"engine {d}", res["engine"][d]["vs_fp32_actor_logprobs"]) for d in DTYPES]
    for name, g in rows:
        print(f"  {name:<16} {g['max_abs_token']:.2e} / {g['mean_abs_token']:.2e}; "
              f"{g['max_abs_sequence']:.2e} / {g['mean_abs_sequence']:.2e}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32, help="sequences in the batch (arith problems)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="actor: timed rounds after a warm-up round; "
                                                         "engine: timed generate calls per pool")
    p.add_argument("--rounds", type=int, default=2, help="engine rounds (one pool per dtype each, order alternating)")
    p.add_argument("--n", type=int, default=4, help="engine: samples per prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="engine: new tokens per sample")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--no-engine", action="store_true", help="measure the actor only")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--cache-dir", default=os.environ.get("SAGE_BENCH_CACHE",
                                                         str(Path(tempfile.gettempdir()) / "sage_bench_cache")))
    a = p.parse_args()
    from sage_megatron.provenance import run_start

    start = run_start()   # before anything of this run starts: is the machine quiet?
    if min(a.rows, a.micro_batch_size, a.repeats, a.rounds, a.n, a.max_tokens) < 1:
        p.error("--rows, --micro-batch-size, --repeats, --rounds, --n and --max-tokens must be >= 1")
    from transformers import AutoTokenizer

    cache = Path(a.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    hf_dir = cached_smollm2(cache)
    ckpt = converted(hf_dir, cache, "smollm2")          # the same cached fp32 checkpoint as weight_sync's
    batch, prompts = make_batch(AutoTokenizer.from_pretrained(hf_dir), rows=a.rows)
    actor = run_distributed(_actor_world, world_size=1, args=(str(ckpt), batch, a.micro_batch_size, a.repeats),
                            timeout_s=3600)[0]
    engines = None
    if not a.no_engine:
        sequences = [batch.tokens[i, :n].tolist() for i, n in enumerate(row_lengths(batch.response_mask))]
        engines = bench_engines(str(hf_dir), prompts, sequences, n=a.n, max_tokens=a.max_tokens,
                                temperature=a.temperature, rounds=a.rounds, repeats=a.repeats)
    res = summarise(actor, engines, batch)
    if a.json:                                   # written before the table, so a printing error loses nothing
        from sage_megatron.provenance import provenance

        settings = {k: v for k, v in vars(a).items() if k not in ("json", "cache_dir")}
        Path(a.json).write_text(json.dumps({"model": "SmolLM2-135M-Instruct (fp32 checkpoint)", "settings": settings,
                                            "cpu_bf16_flags": cpu_bf16_flags(),
                                            "torch_threads": torch.get_num_threads(), "results": res,
                                            **provenance(start=start)}, indent=1))
        print(f"[bench] wrote {a.json}")
    print_table(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
