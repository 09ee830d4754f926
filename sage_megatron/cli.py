"""`sage-megatron` command line.

  sage-megatron demo [--out-dir runs/demo]   tiny end-to-end check: build a random tiny Llama, convert it
                                             to a Megatron dist checkpoint at tp=2, run it at (1,2) against
                                             HF transformers, export it back and check every tensor.
  sage-megatron train --config F [key.sub=value ...]   GRPO / SAGE / SAGE-light training (sage_megatron/train.py)
  sage-megatron toy [--out-dir runs/toy]             GRPO vs SAGE on the embedded toy task, comparison table
  sage-megatron eval --model HF_DIR [--data F|toy]   avg@k of a model on a prompt set (no hints)
  sage-megatron report RUN_DIR [RUN_DIR ...]         PNG plots of one or more runs, overlaid
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def demo(out_dir: Path, *, overwrite: bool) -> dict:
    import torch
    from safetensors.torch import load_file

    from sage_megatron.fsutil import atomic_output_dir
    from sage_megatron.parallel.convert import compare_logits, hf_to_megatron, megatron_to_hf
    from sage_megatron.testing.tiny_models import make_tiny_hf_model

    t0 = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        say = lambda msg: print(f"[demo {time.perf_counter() - t0:5.1f}s] {msg}", flush=True)  # noqa: E731
        hf = make_tiny_hf_model("llama", tmp / "hf", seed=0, tie_word_embeddings=True)
        say(f"tiny random Llama written to {hf.name}/")
        hf_to_megatron(hf, tmp / "megatron_tp2pp1", tp=2, pp=1)
        say("converted to a Megatron dist checkpoint at tp=2, pp=1 (2 gloo ranks)")
        parity = {f"tp{tp}pp{pp}": compare_logits(hf, tmp / "megatron_tp2pp1", tp=tp, pp=pp)
                  for tp, pp in [(2, 1), (1, 2)]}
        for name, r in parity.items():
            say(f"logits at {name} vs HF transformers: max |diff| = {r['max_abs_logit_diff']:.2e}")
        megatron_to_hf(tmp / "megatron_tp2pp1", tmp / "hf_roundtrip")
        src, back = load_file(str(hf / "model.safetensors")), load_file(str(tmp / "hf_roundtrip/model.safetensors"))
        exact = sorted(src) == sorted(back) and all(torch.equal(src[k], back[k]) for k in src)
        say(f"exported back to HF: {'bit-exact' if exact else 'NOT bit-exact'} for {len(src)} tensors")
        summary = {"parity": {k: {"max_abs_logit_diff": v["max_abs_logit_diff"],
                                  "mean_abs_logit_diff": v["mean_abs_logit_diff"]} for k, v in parity.items()},
                   "round_trip_bit_exact": exact, "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    ok = exact and all(v["max_abs_logit_diff"] <= 1e-4 for v in parity.values())
    print("\n| check | result |\n|---|---|")
    for k, v in parity.items():
        print(f"| logits {k} vs HF (fp32) | {v['max_abs_logit_diff']:.2e} |")
    print(f"| HF -> Megatron -> HF | {'bit-exact' if exact else 'MISMATCH'} |")
    print(Path(out_dir).absolute() / "summary.json")
    return {"ok": ok, **summary}


def _eval(a: argparse.Namespace) -> dict:
    """The eval command: flags alone, or a run config (its model, held-out set, k, sampling, templates)."""
    from sage_megatron.config import ConfigError, load_config
    from sage_megatron.evaluate import run_eval

    if a.config is None:
        if a.model is None:
            raise ConfigError("eval needs --model HF_DIR or --config FILE")
        return run_eval(model_dir=a.model, data=a.data or ["toy"], k=a.k, temperature=a.temperature, top_p=a.top_p,
                        max_tokens=a.max_tokens, max_prompts=a.max_prompts, templates=a.templates,
                        extractor=a.extractor or "boxed")
    from sage_megatron.run_inputs import resolve_model

    cfg = load_config(a.config, [])
    e, r = cfg.eval, cfg.rollout
    sets = a.data or [e.data or "toy"]
    model = a.model or str(resolve_model(cfg))
    return run_eval(model_dir=model, data=sets, k=e.k, temperature=e.temperature, top_p=e.top_p,
                    max_tokens=r.max_tokens, max_prompts=e.max_prompts, templates=cfg.algorithm.templates,
                    seed=cfg.data.seed, dtype=r.engine_dtype, difficulty_key=e.difficulty_key,
                    hard_min_difficulty=e.hard_min_difficulty, cache_dir=cfg.model.cache_dir,
                    extractor=a.extractor or cfg.reward.extractor, reward_workers=cfg.reward.workers)


def main(argv: list[str] | None = None) -> int:
    from sage_megatron.algo.reward import ANSWER_EXTRACTORS

    p = argparse.ArgumentParser(prog="sage-megatron", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="tiny conversion + logit parity + round-trip check")
    d.add_argument("--out-dir", default="runs/demo")
    d.add_argument("--overwrite", action="store_true", default=True)
    t = sub.add_parser("train", help="train (GRPO / SAGE / SAGE-light) from a config file")
    t.add_argument("--config", default=None, help="YAML or JSON config (default: built-in defaults)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.steps=4 algorithm.name=grpo")
    y = sub.add_parser("toy", help="GRPO vs SAGE on the embedded toy task")
    y.add_argument("--out-dir", default="runs/toy")
    y.add_argument("--config", default="configs/toy.yaml")
    y.add_argument("overrides", nargs="*")
    e = sub.add_parser("eval", help="avg@k / pass@k of an HF model on prompt sets via the rollout pool")
    e.add_argument("--config", default=None, help="take model, sets and sampling from this run config")
    e.add_argument("--model", default=None, help="HF model folder (default: the config's model)")
    e.add_argument("--data", nargs="+", default=None,
                   help="one or more sets: .jsonl/.json/.parquet, 'toy', 'arith' or 'arith_small'")
    e.add_argument("--k", type=int, default=4)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--max-tokens", type=int, default=128)
    e.add_argument("--max-prompts", type=int, default=0)
    e.add_argument("--templates", default="toy")
    e.add_argument("--extractor", default=None, choices=sorted(ANSWER_EXTRACTORS),
                   help="how the final answer is read (default: the config's reward.extractor, else boxed)")
    r = sub.add_parser("report", help="PNG plots of runs")
    r.add_argument("run_dirs", nargs="+")
    r.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.command == "demo":
        return 0 if demo(Path(a.out_dir), overwrite=a.overwrite)["ok"] else 1
    if a.command in ("train", "toy"):
        from sage_megatron.config import ConfigError, load_config

        try:
            if a.command == "toy":
                from sage_megatron.comparison import toy_comparison

                toy_comparison(a.out_dir, config=a.config, overrides=a.overrides)
                return 0
            from sage_megatron.train import train

            result = train(load_config(a.config, a.overrides))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(result, indent=1, default=str))
        print(Path(result["run_dir"]).absolute())
        if result.get("preempted"):
            from sage_megatron.preemption import PREEMPTED_EXIT

            return PREEMPTED_EXIT
        return 0
    if a.command == "eval":
        from sage_megatron.config import ConfigError
        from sage_megatron.tasks.data import DataError

        try:
            result = _eval(a)
        except (ConfigError, DataError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        from sage_megatron.evaluate import eval_table

        print(eval_table(result))
        print(json.dumps({"avg_at_k": result["avg_at_k"], "pass_at_k": result["pass_at_k"], "k": result["k"],
                          "sets": {n: {k: v for k, v in r.items() if k != "per_prompt"}
                                   for n, r in result["sets"].items()}}))
        return 0
    if a.command == "report":
        from sage_megatron.report import make_report

        for path in make_report(a.run_dirs, a.out):
            print(path)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
