"""SAGE's rollout with its hints (and hinted levels) drawn ahead or after, same everything else.

    .venv/bin/python bench/sage_hints_ahead.py --json docs/results/sage_hints_ahead_toy.json

One rollout pool on a config's start policy (default: the toy policy of `make run`, its engine settings);
the same training batches (the config's data, ``data.batch_size`` rows per step) are rolled out by SAGE's
hinting step (``SageHinting.apply``: unhinted rollout, reward, hints, hinted levels) with
``speculative_hints`` off (sage_after), on (sage_ahead), and on with ``speculative_levels`` (sage_levels_ahead:
all hinted levels in one engine batch), rotating which goes first, each step seeded as the trainer
seeds it (``StepSampler``). No update: the weights stay the start policy's, so every side sees the same
policy. Printed and written: per side the median and range of the seconds of ``apply`` and of its
phases, the tokens it decoded (responses and hints) and its engine calls, the hints written and
triggered, and the ratios of the medians (seconds) and of the totals (tokens). GRPO's rollout of the same
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

from sage_megatron.provenance import provenance, run_start  # noqa: E402


class TokenCountingSampler:
    """A StepSampler that counts the tokens it decodes (every sample's response, hints included) and
    its engine calls: what each side asks of the engine, beside what it costs in seconds."""

    def __init__(self, sampler) -> None:
        self.sampler, self.tokens, self.calls = sampler, 0, 0

    def generate(self, requests, sampling):
        return self.generate_batches([(requests, sampling)])

    def generate_batches(self, batches):
        outputs = self.sampler.generate_batches(batches)
        self.calls += 1
        self.tokens += sum(len(s.response_ids) for samples in outputs.values() for s in samples)
        return outputs


SIDES = {   # side -> algorithm settings over the config's
    "grpo": {"name": "grpo"},
    "sage_after": {"hint_ahead": False},
    "sage_ahead": {"hint_ahead": True},
    "sage_levels_ahead": {"hint_ahead": True, "levels_ahead": True},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--steps", type=int, default=6, help="batches, each run by every side")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    start = run_start()

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
        hinting = {side: build_hinting(replace(cfg, algorithm=replace(cfg.algorithm, **settings)), encode=encode)
                   for side, settings in SIDES.items()}
        data = EpochIterator(load_train_rows(cfg, paths), batch_size=cfg.data.batch_size, seed=cfg.run.seed,
                             shuffle=cfg.data.shuffle)
        per_side: dict[str, list[dict]] = {s: [] for s in SIDES}
        warm = data.next_batch()
        hinting["sage_ahead"].apply(warm, step=0, sampler=StepSampler(pool, seed=0, step=0, min_version=0),
                                    reward_fn=reward)
        for step in range(1, a.steps + 1):
            rows = data.next_batch()
            sides = list(SIDES)
            order = sides[step % len(sides):] + sides[:step % len(sides)]   # rotate who goes first
            for side in order:
                sampler = TokenCountingSampler(StepSampler(pool, seed=cfg.run.seed, step=step, min_version=0))
                t0 = time.perf_counter()
                out = hinting[side].apply(rows, step=step, sampler=sampler, reward_fn=reward)
                seconds = time.perf_counter() - t0
                per_side[side].append({"seconds": seconds, "tokens_decoded": sampler.tokens,
                                       "engine_calls": sampler.calls, **{k: v for k, v in out.metrics.items()
                                                               if k.startswith(("time/", "hint/"))}})
                print(f"[bench] step {step} {side:18s} {seconds:6.2f} s  "
                      + " ".join(f"{k.removeprefix('time/')} {v:.2f}" for k, v in out.metrics.items()
                                 if k.startswith("time/")), flush=True)
    finally:
        pool.shutdown()

    def summary(rows: list[dict], key: str) -> dict:
        vals = [r.get(key, 0.0) for r in rows]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "all": vals}

    keys = ("seconds", "tokens_decoded", "engine_calls", "time/rollout", "time/reward", "time/hint_gen",
            "time/hint_rollout", "hint/triggered", "hint/written_ahead", "hint/parse_failures",
            "hint/groups_drawn_unused")
    result = {side: {k: summary(per_side[side], k) for k in keys} for side in SIDES}
    med = {side: result[side]["seconds"]["median"] for side in SIDES}
    result["ahead_over_after"] = med["sage_ahead"] / med["sage_after"]
    result["levels_ahead_over_ahead"] = med["sage_levels_ahead"] / med["sage_ahead"]
    tokens = {side: sum(result[side]["tokens_decoded"]["all"]) for side in SIDES}
    for side in SIDES:
        if side != "grpo":
            result[f"{side}_over_grpo"] = med[side] / med["grpo"]
            result[f"{side}_tokens_over_grpo"] = tokens[side] / tokens["grpo"]
    result.update(config=a.config, steps=a.steps, batch_size=cfg.data.batch_size, group_size=cfg.rollout.group_size,
                  **provenance(start=start))
    print(f"\n{'side':18s} {'apply s (median, range)':>24s} {'rollout':>8s} {'hint_gen':>8s} {'hint_roll':>9s}"
          f" {'/GRPO':>6s} {'tokens/step':>11s} {'/GRPO':>6s} {'calls':>5s}")
    for side in SIDES:
        r = result[side]
        print(f"{side:18s} {r['seconds']['median']:8.2f} ({r['seconds']['min']:.2f}-{r['seconds']['max']:.2f})"
              f"{'':6s} {r['time/rollout']['median']:8.2f} {r['time/hint_gen']['median']:8.2f}"
              f" {r['time/hint_rollout']['median']:9.2f} {med[side] / med['grpo']:6.2f}"
              f" {tokens[side] / a.steps:11.0f} {tokens[side] / tokens['grpo']:6.2f}"
              f" {r['engine_calls']['median']:5.0f}")
    print(f"hints ahead/after {result['ahead_over_after']:.3f}; levels ahead/hints ahead "
          f"{result['levels_ahead_over_ahead']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.json}")
    os._exit(0)   # Ray / vLLM threads


if __name__ == "__main__":
    raise SystemExit(main())
