"""SAGE's rollout with its hints drawn ahead (alongside the unhinted rollout) or after it, same everything else.

    .venv/bin/python bench/sage_hints_ahead.py --json docs/results/sage_hints_ahead_toy.json

One rollout pool on a config's start policy (default: the toy policy of `make run`, its engine settings);
the same training batches (the config's data, ``data.batch_size`` rows per step) are rolled out by SAGE's
hinting step (``SageHinting.apply``: unhinted rollout, reward, hints, hinted levels) with
``speculative_hints`` on and off, alternating which goes first, each step seeded as the trainer seeds it
(``StepSampler``). No update: the weights stay the start policy's, so both sides see the same policy.
Printed and written: per side the median and range of the seconds of ``apply`` and of its phases, the
hints written and triggered, and ahead/after = the ratio of the medians. GRPO's rollout of the same
batches (``GrpoHinting``) runs in the same rotation, for SAGE/GRPO per side.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sage_megatron.provenance import provenance  # noqa: E402

SIDES = ("grpo", "sage_after", "sage_ahead")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--steps", type=int, default=6, help="batches, each run by every side")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    from dataclasses import replace

    from sage_megatron.algo.templates import chat_encoder
    from sage_megatron.config import load_config
    from sage_megatron.rollout.pool import RolloutPool
    from sage_megatron.run_inputs import load_train_rows
    from sage_megatron.tasks.data import EpochIterator
    from sage_megatron.train import StepSampler, build_hinting, build_reward, prepare, rollout_pool_config

    cfg = load_config(a.config, ["algorithm.name=sage", "run.dir=runs/bench_sage_hints_ahead"])
    paths = prepare(cfg)
    pool = RolloutPool(rollout_pool_config(cfg, hf_dir=paths["hf_dir"]))   # the trainer's pool settings
    try:
        encode = chat_encoder(pool.tokenizer)
        reward = build_reward(cfg)
        hinting = {
            "grpo": build_hinting(replace(cfg, algorithm=replace(cfg.algorithm, name="grpo")), encode=encode),
            "sage_after": build_hinting(replace(cfg, algorithm=replace(cfg.algorithm, hint_ahead=False)), encode=encode),
            "sage_ahead": build_hinting(replace(cfg, algorithm=replace(cfg.algorithm, hint_ahead=True)), encode=encode),
        }
        data = EpochIterator(load_train_rows(cfg, paths), batch_size=cfg.data.batch_size, seed=cfg.run.seed,
                             shuffle=cfg.data.shuffle)
        per_side: dict[str, list[dict]] = {s: [] for s in SIDES}
        warm = data.next_batch()
        hinting["sage_ahead"].apply(warm, step=0, sampler=StepSampler(pool, seed=0, step=0, min_version=0),
                                    reward_fn=reward)
        for step in range(1, a.steps + 1):
            rows = data.next_batch()
            order = SIDES[step % 3:] + SIDES[:step % 3]   # rotate who goes first
            for side in order:
                sampler = StepSampler(pool, seed=cfg.run.seed, step=step, min_version=0)
                t0 = time.perf_counter()
                out = hinting[side].apply(rows, step=step, sampler=sampler, reward_fn=reward)
                seconds = time.perf_counter() - t0
                per_side[side].append({"seconds": seconds, **{k: v for k, v in out.metrics.items()
                                                               if k.startswith(("time/", "hint/"))}})
                print(f"[bench] step {step} {side:10s} {seconds:6.2f} s  "
                      + " ".join(f"{k.removeprefix('time/')} {v:.2f}" for k, v in out.metrics.items()
                                 if k.startswith("time/")), flush=True)
    finally:
        pool.shutdown()

    def summary(rows: list[dict], key: str) -> dict:
        vals = [r.get(key, 0.0) for r in rows]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "all": vals}

    keys = ("seconds", "time/rollout", "time/reward", "time/hint_gen", "time/hint_rollout", "hint/triggered",
            "hint/written_ahead", "hint/parse_failures")
    result = {side: {k: summary(per_side[side], k) for k in keys} for side in SIDES}
    med = {side: result[side]["seconds"]["median"] for side in SIDES}
    result["ahead_over_after"] = med["sage_ahead"] / med["sage_after"]
    result["sage_after_over_grpo"] = med["sage_after"] / med["grpo"]
    result["sage_ahead_over_grpo"] = med["sage_ahead"] / med["grpo"]
    result.update(config=a.config, steps=a.steps, batch_size=cfg.data.batch_size, group_size=cfg.rollout.group_size,
                  **provenance())
    print(f"\n{'side':12s} {'step s (median, range)':>24s} {'rollout':>8s} {'hint_gen':>8s} {'hint_roll':>9s}")
    for side in SIDES:
        r = result[side]
        print(f"{side:12s} {r['seconds']['median']:8.2f} ({r['seconds']['min']:.2f}-{r['seconds']['max']:.2f})"
              f"{'':6s} {r['time/rollout']['median']:8.2f} {r['time/hint_gen']['median']:8.2f}"
              f" {r['time/hint_rollout']['median']:9.2f}")
    print(f"ahead/after {result['ahead_over_after']:.3f}; SAGE/GRPO after {result['sage_after_over_grpo']:.2f}x, "
          f"ahead {result['sage_ahead_over_grpo']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.json}")
    os._exit(0)   # Ray / vLLM threads


if __name__ == "__main__":
    raise SystemExit(main())
