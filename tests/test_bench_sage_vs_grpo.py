"""bench/sage_vs_grpo.py's statistics over seeds, against hand-computed values."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sage_vs_grpo import aggregate, main, mean_ci95_over_seeds  # noqa: E402


def test_interval_over_seeds_is_student_t():
    mean, half = mean_ci95_over_seeds([0.1, 0.2, 0.3])       # sd 0.1, n 3, t(0.975, 2) = 4.303
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    assert mean_ci95_over_seeds([0.5])[1] != mean_ci95_over_seeds([0.5])[1]   # one seed: no interval (nan)


def test_aggregate_means_and_time_ratio():
    def summary(acc, t_grpo, t_sage):
        base = {"heldout_accuracy": acc, "step_seconds_median": t_grpo}
        return {"grpo": base, "sage": {**base, "heldout_accuracy": acc + 0.1, "step_seconds_median": t_sage}}

    agg = aggregate([summary(0.2, 2.0, 3.0), summary(0.4, 2.0, 2.0)], ["grpo", "sage"])
    assert agg["grpo"]["heldout_accuracy"]["mean"] == pytest.approx(0.3)
    assert agg["sage"]["heldout_accuracy"]["values"] == pytest.approx([0.3, 0.5])
    assert agg["sage"]["time_over_grpo_median"]["mean"] == pytest.approx((1.5 + 1.0) / 2)
    assert "time_over_grpo_median" not in agg["grpo"]


def test_bad_algorithm_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--algorithms", "grpo,ppo"])
    assert exc.value.code == 2 and "ppo" in capsys.readouterr().err
