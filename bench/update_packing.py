"""The actor's update on one batch: unpacked micro-batches against length-grouped (packed) ones.

    .venv/bin/python bench/update_packing.py --json docs/results/update_packing_smollm2.json
    .venv/bin/python bench/update_packing.py --rows 64 --max-response 256 --repeats 5

One Megatron rank (``run_distributed``, world size 1) holds SmolLM2-135M-Instruct (fp32, imported once
from the shipped GGUF, cached under ``--cache-dir``) three times, one ``MegatronActor`` per layout, all
from the same weights, and times ``train_step`` (forward, backward, AdamW step) on the SAME batch:

* ``unpacked``: rows in batch order, ``micro_batch_size`` rows per micro-batch, each as wide as the
  batch's longest row (``parallel.group_by_length=false``; the layout before packing);
* ``packed``: rows grouped by length, each micro-batch as wide as its own longest row (the default);
* ``packed_budget``: the same under a token budget (``parallel.max_tokens_per_micro_batch``) with a
  large row cap, so the budget alone sizes each micro-batch.

The batch: ``--rows`` sequences whose prompt and response lengths are drawn uniformly (seeded) from
``--prompt-len`` and 1..``--max-response``, random token ids, advantages +-1 (every row has a gradient,
so nothing is skipped; skipping is measured by the training runs). Lengths that vary like this are
what a GRPO batch looks like: responses stop anywhere up to the rollout's ``max_tokens``.
Each round times every layout once, the order rotating between rounds; the first round is a warm-up.
Reported per layout: tokens computed (rows x width summed over micro-batches), the response tokens,
median and spread of the seconds, and the first step's loss and gradient norm, which must agree across
layouts (same start, same batch: packing changes only the summation order).
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

from bench.weight_sync import converted  # noqa: E402
from sage_megatron.actor.batch import TrainBatch  # noqa: E402
from sage_megatron.parallel.convert import read_meta  # noqa: E402
from sage_megatron.parallel.launch import run_distributed  # noqa: E402
from sage_megatron.parallel.layout import ParallelLayout  # noqa: E402
from sage_megatron.run_inputs import cached_smollm2  # noqa: E402


def layouts(micro_batch_size: int, token_budget: int) -> dict[str, dict]:
    """Layout name -> the ActorConfig fields that make it."""
    return {"unpacked": dict(micro_batch_size=micro_batch_size, group_by_length=False),
            "packed": dict(micro_batch_size=micro_batch_size),
            "packed_budget": dict(micro_batch_size=1 << 16, max_tokens_per_micro_batch=token_budget)}


def make_batch(*, rows: int, prompt_len: tuple[int, int], max_response: int, vocab_size: int,
               seed: int) -> TrainBatch:
    """Right-padded rows with uniform random prompt and response lengths, random ids, advantages +-1."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(prompt_len[0], prompt_len[1] + 1, (rows,), generator=gen)
    responses = torch.randint(1, max_response + 1, (rows,), generator=gen)
    width = int((prompts + responses).max())
    tokens = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width)
    for i, (p, r) in enumerate(zip(prompts.tolist(), responses.tolist())):
        tokens[i, :p + r] = torch.randint(0, vocab_size, (p + r,), generator=gen)
        mask[i, p:p + r] = 1.0
    advantages = torch.where(torch.rand(rows, generator=gen) < 0.5, -1.0, 1.0)
    return TrainBatch(tokens=tokens, response_mask=mask, advantages=advantages, old_logp=None)


def rotation(names: list[str], round_index: int) -> list[str]:
    """The layouts' order in a round: rotated by one each round, so none is always first."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def _bench_world(ckpt: str, batch: TrainBatch, configs: dict[str, dict], repeats: int) -> dict:
    from sage_megatron.actor.worker import ActorConfig, MegatronActor
    from sage_megatron.parallel.distributed import init_parallel

    init_parallel(ParallelLayout())
    actors = {name: MegatronActor(ActorConfig(ckpt_dir=ckpt, layout=ParallelLayout(), lr=1e-6, **fields))
              for name, fields in configs.items()}
    names = list(configs)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, dict] = {}
    for round_index in range(repeats + 1):                      # round 0: warm-up, not timed
        for name in rotation(names, round_index):
            t0 = time.perf_counter()
            metrics = actors[name].train_step(batch)
            elapsed = time.perf_counter() - t0
            first.setdefault(name, metrics)
            if round_index:
                seconds[name].append(elapsed)
    return {"seconds": seconds, "first_step": first}


def summarise(raw: dict, names: list[str]) -> list[dict]:
    rows = []
    base = statistics.median(raw["seconds"][names[0]])
    for name in names:
        s, m = raw["seconds"][name], raw["first_step"][name]
        rows.append({"layout": name, "tokens_computed": int(m["padded_tokens_run"]),
                     "response_tokens": int(m["tokens"]), "seconds": s, "median_s": statistics.median(s),
                     "min_s": min(s), "max_s": max(s), "speedup_vs_" + names[0]: base / statistics.median(s),
                     "first_step_loss": m["loss"], "first_step_grad_norm": m["grad_norm"]})
    return rows


def print_table(rows: list[dict], names: list[str]) -> None:
    print(f"{'layout':<14} {'computed tok':>12} {'response tok':>12} {'median s':>9} {'min-max s':>13} "
          f"{'speedup':>8} {'loss (step 1)':>14} {'grad norm':>10}")
    for r in rows:
        print(f"{r['layout']:<14} {r['tokens_computed']:>12} {r['response_tokens']:>12} {r['median_s']:>9.2f} "
              f"{r['min_s']:>6.2f}-{r['max_s']:<6.2f} {r['speedup_vs_' + names[0]]:>8.2f} "
              f"{r['first_step_loss']:>14.7f} {r['first_step_grad_norm']:>10.5f}")
    print("train_step (forward + backward + AdamW) on the same batch; medians over the timed rounds, "
          f"speedup against {names[0]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32, help="sequences in the batch (e.g. 8 prompts x 4 samples)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[30, 80], metavar=("MIN", "MAX"))
    p.add_argument("--max-response", type=int, default=128, help="responses are 1..this many tokens")
    p.add_argument("--micro-batch-size", type=int, default=8, help="rows per micro-batch (unpacked, packed)")
    p.add_argument("--token-budget", type=int, default=1024, help="packed_budget: tokens per micro-batch")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--cache-dir", default=os.environ.get("SAGE_BENCH_CACHE",
                                                         str(Path(tempfile.gettempdir()) / "sage_bench_cache")))
    a = p.parse_args()
    from sage_megatron.provenance import run_start

    start = run_start()   # before anything of this run starts: is the machine quiet?
    if a.rows < 1 or a.max_response < 1 or a.repeats < 1 or not 1 <= a.prompt_len[0] <= a.prompt_len[1]:
        p.error("need --rows, --max-response, --repeats >= 1 and 1 <= --prompt-len MIN <= MAX")
    cache = Path(a.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = converted(cached_smollm2(cache), cache, "smollm2")      # the same cached checkpoint as weight_sync's
    batch = make_batch(rows=a.rows, prompt_len=tuple(a.prompt_len), max_response=a.max_response,
                       vocab_size=read_meta(ckpt).arch.vocab_size, seed=a.seed)
    configs = layouts(a.micro_batch_size, a.token_budget)
    raw = run_distributed(_bench_world, world_size=1, args=(str(ckpt), batch, configs, a.repeats),
                          timeout_s=3600)[0]
    names = list(configs)
    rows = summarise(raw, names)
    print_table(rows, names)
    if a.json:
        from sage_megatron.provenance import provenance

        settings = {k: v for k, v in vars(a).items() if k not in ("json", "cache_dir")}
        Path(a.json).write_text(json.dumps({"model": "SmolLM2-135M-Instruct fp32", "settings": settings,
                                            "results": rows, **provenance(start=start)}, indent=1))
        print(f"[bench] wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
