"""The embedded default (``sage-megatron toy`` / ``make run``): GRPO and SAGE from the same start and
seed, a comparison table, and ``summary.json``."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from sage_megatron.train import train


def summarize(result: dict, run_dir: str | Path) -> dict:
    """The comparison numbers of one run (from its result and metrics.jsonl)."""
    from sage_megatron.metrics import read_metrics
    from sage_megatron.report import hinted_per_level

    recs = read_metrics(run_dir)
    mean = lambda key: sum(r.get(key) or 0.0 for r in recs) / len(recs) if recs else 0.0  # noqa: E731
    levels = {str(l): sum(hinted_per_level(r, l) for r in recs) for l in (1, 2, 3)}
    return {"heldout_accuracy": result["evals"].get("final", {}).get("avg_at_k"),
            "heldout_accuracy_start": result["evals"].get("start", {}).get("avg_at_k"),
            "prompt_usage": mean("groups/prompt_usage"), "acc_before_hints": mean("acc/before_hints"),
            "never_solved_share": result["never_solved_share"], "hinted_per_level": levels,
            "hint_parse_failures": sum(r.get("hint/parse_failures") or 0.0 for r in recs),
            "steps": result["steps"], "train_seconds": result["train_seconds"],
            "step_seconds": mean("time/step"),
            "step_seconds_median": statistics.median(r["time/step"] for r in recs) if recs else 0.0}


def toy_comparison(out_dir: str | Path, *, config: str = "configs/toy.yaml", overrides: list[str] = ()) -> dict:
    """GRPO and SAGE from the same start and seed; prints a table, writes out_dir/summary.json."""
    from sage_megatron.config import load_config

    out = Path(out_dir)
    summary: dict[str, Any] = {}
    for name in ("grpo", "sage"):
        # Both runs start from the same weights: the start evaluation is run once (by GRPO) and shared.
        shared_start = ["eval.at_start=false"] if name == "sage" else []
        cfg = load_config(config, [*overrides, f"algorithm.name={name}", f"run.dir={out / name}", "run.resume=false",
                                   *shared_start])
        print(f"=== {name}: {cfg.run.steps} steps, batch {cfg.data.batch_size} x G={cfg.rollout.group_size}", flush=True)
        summary[name] = summarize(train(cfg), out / name)
    summary["sage"]["heldout_accuracy_start"] = summary["grpo"]["heldout_accuracy_start"]
    # mean step time = training wall time / steps; the median ratio is less sensitive to a noisy machine
    # and to SAGE's one-off first-step warm-up (new prompt shapes and sampling settings in the engine)
    ratio = lambda key: summary["sage"][key] / max(summary["grpo"][key], 1e-9)  # noqa: E731
    summary["sage_over_grpo_time"] = ratio("step_seconds")
    summary["sage_over_grpo_time_median"] = ratio("step_seconds_median")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    rows = [("held-out accuracy (hard, no hints)", "heldout_accuracy"), ("held-out accuracy at start", "heldout_accuracy_start"),
            ("prompt usage (mean)", "prompt_usage"), ("accuracy before hints (mean)", "acc_before_hints"),
            ("never-solved share", "never_solved_share"), ("step seconds (mean)", "step_seconds")]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print("\n| metric | GRPO | SAGE |\n|---|---|---|")
    for label, key in rows:
        print(f"| {label} | {fmt(summary['grpo'][key])} | {fmt(summary['sage'][key])} |")
    print(f"| hinted prompts per level (1/2/3) | - | {'/'.join(str(int(v)) for v in summary['sage']['hinted_per_level'].values())} |")
    print(f"| SAGE / GRPO time per step (mean, median) | | {summary['sage_over_grpo_time']:.2f}x, "
          f"{summary['sage_over_grpo_time_median']:.2f}x |")
    print((out / "summary.json").absolute())
    return summary
