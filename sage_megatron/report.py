"""Plots of one or more runs, overlaid: ``sage-megatron report RUN_DIR [RUN_DIR ...] [--out DIR]``.

Writes accuracy.png (accuracy before hints), prompt_usage.png, never_solved.png and
hints_per_level.png (hinted prompts per level per step) from each run's metrics.jsonl, and
heldout.png (held-out accuracy, all and hard band, with 95% intervals) from its evals.jsonl.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from sage_megatron.metrics import read_evals, read_metrics

PLOTS = {
    "accuracy": ("acc/before_hints", "accuracy before hints"),
    "prompt_usage": ("groups/prompt_usage", "prompt usage (non-zero advantage share)"),
    "never_solved": ("prompts/never_solved_share", "never-solved share so far"),
}


def hinted_per_level(rec: dict, level: int) -> float:
    """Hinted prompts at ``level`` in one step (SAGE: hint/hinted_l*, SAGE-light: hint/level_l*)."""
    return float(rec.get(f"hint/hinted_l{level}", rec.get(f"hint/level_l{level}", 0.0)) or 0.0)


def make_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).name or str(d): read_metrics(d) for d in run_dirs}
    empty = [name for name, recs in runs.items() if not recs]
    if empty:
        raise FileNotFoundError(f"no metrics.jsonl records in run(s) {empty}")
    out = Path(out_dir) if out_dir else Path(run_dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, (key, title) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, recs in runs.items():
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{fname}.png", dpi=100)
        plt.close(fig)
        written.append(out / f"{fname}.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, recs in runs.items():
        levels = sorted({int(k.rsplit("_l", 1)[1]) for r in recs for k in r
                         if k.startswith(("hint/hinted_l", "hint/level_l")) and not k.endswith("_l0")})
        for level in levels or [1]:
            ax.plot([r["step"] for r in recs], [hinted_per_level(r, level) for r in recs], marker="o", ms=3,
                    label=f"{name} level {level}")
    ax.set(xlabel="step", ylabel="prompts", title="hinted prompts per level")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "hints_per_level.png", dpi=100)
    plt.close(fig)
    written.append(out / "hints_per_level.png")
    evals = {name: read_evals(d) for name, d in zip(runs, run_dirs)}
    if any(evals.values()):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, (key, title) in zip(axes, (("accuracy", "held-out accuracy (all)"),
                                           ("hard_accuracy", "held-out accuracy (hard band)"))):
            for name, points in evals.items():
                pts = [(e["step"], e[key], e.get(key + "_ci95") or 0.0) for e in points if e.get(key) is not None]
                if pts:
                    steps, values, cis = zip(*pts)
                    ax.errorbar(steps, values, yerr=cis, marker="o", ms=3, capsize=3, label=name)
            ax.set(xlabel="step", title=title)
            ax.grid(alpha=0.3)
            ax.legend()
        axes[0].set_ylabel("avg@k, no hints (95% interval)")
        fig.tight_layout()
        fig.savefig(out / "heldout.png", dpi=100)
        plt.close(fig)
        written.append(out / "heldout.png")
    return written
