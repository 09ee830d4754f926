"""Plots of one or more runs, overlaid: ``sage-megatron report RUN_DIR [RUN_DIR ...] [--out DIR]``.

Writes accuracy.png (accuracy before hints), prompt_usage.png, never_solved.png and
hints_per_level.png (hinted prompts per level per step) from each run's metrics.jsonl.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from sage_megatron.metrics import read_metrics

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
    return written
