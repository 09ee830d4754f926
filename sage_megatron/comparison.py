"""The embedded default (``sage-megatron toy`` / ``make run``): GRPO and SAGE from the same start and
seed, a comparison table, and ``summary.json``.

Every algorithm trains from the same weights with the same seed; the start evaluation is run once (by
the first algorithm) and shared, since every run starts from those weights. Held-out accuracy (no
hints) is reported over the whole held-out set and over its hard band, at the start and the end, each
with the half-width of its 95% interval over prompts (``algo.metrics_math.mean_ci95``), and the gain
end - start with its interval over the per-prompt differences (``algo.metrics_math.paired_gain``).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from sage_megatron.algo.metrics_math import paired_gain
from sage_megatron.metrics import EVALS_FILE, read_evals, read_metrics
from sage_megatron.provenance import provenance
from sage_megatron.train import train_runs

HELDOUT_KEYS = ("accuracy", "accuracy_ci95", "hard_accuracy", "hard_accuracy_ci95")


def summarize(result: dict, run_dir: str | Path) -> dict:
    """The comparison numbers of one run (from its result, metrics.jsonl and evals.jsonl)."""
    from sage_megatron.report import hinted_per_level

    recs = read_metrics(run_dir)
    mean = lambda key: sum(r.get(key) or 0.0 for r in recs) / len(recs) if recs else 0.0  # noqa: E731
    levels = {str(l): sum(hinted_per_level(r, l) for r in recs) for l in (1, 2, 3)}
    start, final = result["evals"].get("start", {}), result["evals"].get("final", {})
    return {"heldout_accuracy": final.get("accuracy"), "heldout_accuracy_ci95": final.get("accuracy_ci95"),
            "heldout_accuracy_start": start.get("accuracy"), "heldout_accuracy_start_ci95": start.get("accuracy_ci95"),
            "heldout_hard_accuracy": final.get("hard_accuracy"),
            "heldout_hard_accuracy_ci95": final.get("hard_accuracy_ci95"),
            "heldout_hard_accuracy_start": start.get("hard_accuracy"),
            "heldout_hard_accuracy_start_ci95": start.get("hard_accuracy_ci95"),
            "heldout_prompts": final.get("prompts"), "heldout_hard_prompts": final.get("hard_prompts"),
            "heldout_curve": [{"step": e["step"], **{k: e.get(k) for k in HELDOUT_KEYS}} for e in read_evals(run_dir)],
            "prompt_usage": mean("groups/prompt_usage"), "acc_before_hints": mean("acc/before_hints"),
            "never_solved_share": result["never_solved_share"], "hinted_per_level": levels,
            "hint_parse_failures": sum(r.get("hint/parse_failures") or 0.0 for r in recs),
            "steps": result["steps"], "train_seconds": result["train_seconds"],
            "step_seconds": mean("time/step"),
            "step_seconds_median": statistics.median(r["time/step"] for r in recs) if recs else 0.0}


def share_start(summary: dict, *, source: str, target: str, out: Path) -> None:
    """``target`` started from ``source``'s weights: give it ``source``'s start evaluation (summary and curve)."""
    for key in ("heldout_accuracy_start", "heldout_accuracy_start_ci95", "heldout_hard_accuracy_start",
                "heldout_hard_accuracy_start_ci95"):
        summary[target][key] = summary[source][key]
    start = [e for e in read_evals(out / source) if e["step"] == 0]
    if start:
        summary[target]["heldout_curve"] = [summary[source]["heldout_curve"][0], *summary[target]["heldout_curve"]]
        path = out / target / EVALS_FILE
        path.write_text(json.dumps(start[0]) + "\n" + (path.read_text() if path.is_file() else ""))


def run_algorithms(out_dir: str | Path, *, config: str, overrides: Sequence[str] = (),
                   algorithms: Sequence[str] = ("grpo", "sage")) -> dict[str, Any]:
    """Each algorithm from the same start and seed into out_dir/<name>, back to back in one session (one
    start-up of Ray, ranks and engines: ``train.train_runs``); their summaries, start evaluation shared."""
    from sage_megatron.config import load_config

    out = Path(out_dir)
    cfgs = [load_config(config, [*overrides, f"algorithm.name={name}", f"run.dir={out / name}", "run.resume=false",
                                 *(["eval.at_start=false"] if i > 0 else [])])
            for i, name in enumerate(algorithms)]
    c = cfgs[0]
    print(f"=== {', then '.join(algorithms)} in one session: {c.run.steps} steps each, batch {c.data.batch_size} x "
          f"G={c.rollout.group_size}, lr {c.optim.lr:g}, seed {c.run.seed}", flush=True)
    results = train_runs(cfgs)
    if len(results) < len(cfgs):
        raise RuntimeError(f"stopped on request during {algorithms[len(results) - 1]}: "
                           f"{', '.join(algorithms[len(results):])} did not run; run the comparison again")
    summary: dict[str, Any] = {}
    start = results[0]["evals"].get("start")
    for i, (name, result) in enumerate(zip(algorithms, results)):
        summary[name] = summarize(result, out / name)
        if i > 0:
            share_start(summary, source=algorithms[0], target=name, out=out)
        final = result["evals"].get("final")
        if start and final:
            gains = paired_gain(start["per_prompt"], final["per_prompt"],
                                hard_min_difficulty=cfgs[i].eval.hard_min_difficulty)
            summary[name].update({f"heldout_{k}": v for k, v in gains.items()})
    return summary


def _with_ci(summary: dict, key: str) -> str:
    value, ci = summary.get(key), summary.get(key + "_ci95")
    if value is None:
        return "n/a"
    return f"{value:.3f} ± {ci:.3f}" if ci is not None else f"{value:.3f}"


def comparison_table(summary: dict[str, Any], algorithms: Sequence[str]) -> str:
    """The markdown table ``make run`` prints."""
    rows = [("held-out accuracy, start (all difficulties)", "heldout_accuracy_start", True),
            ("held-out accuracy, end (all difficulties)", "heldout_accuracy", True),
            ("held-out accuracy, start (hard band)", "heldout_hard_accuracy_start", True),
            ("held-out accuracy, end (hard band)", "heldout_hard_accuracy", True),
            ("held-out gain, end - start, paired (all difficulties)", "heldout_gain", True),
            ("held-out gain, end - start, paired (hard band)", "heldout_hard_gain", True),
            ("prompt usage (mean)", "prompt_usage", False), ("accuracy before hints (mean)", "acc_before_hints", False),
            ("never-solved share", "never_solved_share", False), ("step seconds (mean)", "step_seconds", False),
            ("step seconds (median)", "step_seconds_median", False)]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| metric | " + " | ".join(a.upper().replace("_", "-") for a in algorithms) + " |",
             "|---|" + "---|" * len(algorithms)]
    for label, key, ci in rows:
        cells = [_with_ci(summary[a], key) if ci else fmt(summary[a][key]) for a in algorithms]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| hinted prompts per level (1/2/3) | " + " | ".join(
        "-" if a == "grpo" else "/".join(str(int(v)) for v in summary[a]["hinted_per_level"].values())
        for a in algorithms) + " |")
    return "\n".join(lines)


def toy_comparison(out_dir: str | Path, *, config: str = "configs/toy.yaml", overrides: Sequence[str] = ()) -> dict:
    """GRPO and SAGE from the same start and seed; prints a table, writes out_dir/summary.json (path last)."""
    out = Path(out_dir)
    summary = run_algorithms(out, config=config, overrides=overrides, algorithms=("grpo", "sage"))
    # step_seconds is the mean of the per-step time/step records (evaluations and start-up excluded); the
    # median ratio is less sensitive to a noisy machine
    # and to SAGE's one-off first-step warm-up (new prompt shapes and sampling settings in the engine)
    ratio = lambda key: summary["sage"][key] / max(summary["grpo"][key], 1e-9)  # noqa: E731
    summary["sage_over_grpo_time"] = ratio("step_seconds")
    summary["sage_over_grpo_time_median"] = ratio("step_seconds_median")
    summary.update(provenance())
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n" + comparison_table(summary, ("grpo", "sage")))
    print(f"| SAGE / GRPO time per step (mean, median) | | {summary['sage_over_grpo_time']:.2f}x, "
          f"{summary['sage_over_grpo_time_median']:.2f}x |")
    print("(± = half-width of the 95% interval over held-out prompts, for the gains over the per-prompt differences "
          "end - start; the hard band is the held-out items with the most steps)")
    print((out / "summary.json").absolute())
    return summary
