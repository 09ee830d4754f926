"""SAGE vs GRPO (and SAGE-light) over seeds: the embedded default's comparison, with intervals.

    python bench/sage_vs_grpo.py --seeds 3 --json docs/results/sage_vs_grpo_toy_3seeds.json
    python bench/sage_vs_grpo.py --seeds 2 --algorithms grpo,sage,sage_light --config configs/toy.yaml

For each seed s (run.seed = s; the start weights, training prompts and held-out set are the same for
every seed) every algorithm trains from the same start into OUT/seed<s>/<algorithm>, exactly as
``make run`` does for seed 0 (``sage_megatron.comparison.run_algorithms``). Prints, per algorithm, the
mean and the 95% interval over seeds (Student t, n - 1 degrees of freedom) of every summary figure and
of the time per step; writes JSON (with command, commit, core count, load) and a PNG of the held-out
learning curves, mean with a band of the 95% interval over seeds. Run it on a quiet machine: the step
times are only meaningful there.
"""
from __future__ import annotations

import argparse
import os
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sage_megatron.comparison import run_algorithms  # noqa: E402
from sage_megatron.provenance import provenance, run_start  # noqa: E402

FIGURES = ("heldout_accuracy_start", "heldout_accuracy", "heldout_hard_accuracy_start", "heldout_hard_accuracy",
           "heldout_gain", "heldout_hard_gain", "prompt_usage", "acc_before_hints", "never_solved_share",
           "step_seconds", "step_seconds_median")
# Two-sided 95% Student t quantiles by degrees of freedom (scipy.stats.t.ppf(0.975, df)); 1.96 beyond.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci95_over_seeds(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% interval) of per-seed values, Student t with n - 1 df."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5


def aggregate(per_seed: list[dict], algorithms: list[str]) -> dict:
    """{algorithm: {figure: {"mean", "ci95", "values"}}} over the seeds' summaries."""
    out: dict = {}
    for algo in algorithms:
        out[algo] = {}
        for fig in FIGURES:
            values = [s[algo][fig] for s in per_seed if s[algo].get(fig) is not None]
            if values:
                mean, ci = mean_ci95_over_seeds(values)
                out[algo][fig] = {"mean": mean, "ci95": ci, "values": values}
        grpo = per_seed[0].get("grpo")
        if grpo is not None and algo != "grpo":
            ratios = [s[algo]["step_seconds_median"] / s["grpo"]["step_seconds_median"] for s in per_seed]
            mean, ci = mean_ci95_over_seeds(ratios)
            out[algo]["time_over_grpo_median"] = {"mean": mean, "ci95": ci, "values": ratios}
    return out


def table(agg: dict, algorithms: list[str], seeds: int) -> str:
    lines = [f"| figure (mean ± 95% interval over {seeds} seeds) | " + " | ".join(algorithms) + " |",
             "|---|" + "---|" * len(algorithms)]
    for fig in (*FIGURES, "time_over_grpo_median"):
        cells = [f"{agg[a][fig]['mean']:.3f} ± {agg[a][fig]['ci95']:.3f}" if fig in agg[a] else "-" for a in algorithms]
        lines.append(f"| {fig} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(per_seed: list[dict], algorithms: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (key, title) in zip(axes, (("accuracy", "held-out accuracy (all)"),
                                       ("hard_accuracy", "held-out accuracy (hard band)"))):
        for algo in algorithms:
            by_step: dict[int, list[float]] = {}
            for s in per_seed:
                for point in s[algo]["heldout_curve"]:
                    if point.get(key) is not None:
                        by_step.setdefault(point["step"], []).append(point[key])
            steps = sorted(by_step)
            stats = [mean_ci95_over_seeds(by_step[x]) for x in steps]
            means = [m for m, _ in stats]
            cis = [0.0 if c != c else c for _, c in stats]          # nan (one seed) -> no band
            ax.plot(steps, means, marker="o", ms=3, label=algo)
            ax.fill_between(steps, [m - c for m, c in zip(means, cis)], [m + c for m, c in zip(means, cis)], alpha=0.2)
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel(f"avg@k, no hints (mean, 95% band over {len(per_seed)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (run.seed)")
    p.add_argument("--algorithms", default="grpo,sage", help="comma list of grpo, sage, sage_light")
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--out", default="runs/bench/sage_vs_grpo", help="run directories")
    p.add_argument("--json", default=None, help="result JSON (default OUT/sage_vs_grpo.json); the PNG goes beside it")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    a = p.parse_args(argv)
    algorithms = [x.strip() for x in a.algorithms.split(",") if x.strip()]
    bad = sorted(set(algorithms) - {"grpo", "sage", "sage_light"})
    if bad or a.seeds < 1:
        p.error(f"--algorithms takes grpo, sage, sage_light (got {bad}); --seeds >= 1 (got {a.seeds})")
    record = provenance(start=run_start())
    out = Path(a.out)
    per_seed = []
    for seed in range(a.seeds):
        per_seed.append(run_algorithms(out / f"seed{seed}", config=a.config, algorithms=algorithms,
                                       overrides=[*a.overrides, f"run.seed={seed}"]))
    agg = aggregate(per_seed, algorithms)
    text = table(agg, algorithms, a.seeds)
    print("\n" + text)
    json_path = Path(a.json) if a.json else out / "sage_vs_grpo.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    png = json_path.with_suffix(".png")
    plot_curves(per_seed, algorithms, png)
    record["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    json_path.write_text(json.dumps({**record, "config": a.config, "overrides": a.overrides, "seeds": a.seeds,
                                     "algorithms": algorithms, "aggregate": agg, "table": text,
                                     "per_seed": per_seed, "png": str(png)}, indent=1))
    print(json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
