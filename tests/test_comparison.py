"""The embedded default's bookkeeping (sage_megatron/comparison.py)."""
from __future__ import annotations

import json

import pytest


def test_toy_comparison_writes_the_summary_the_readme_promises(tmp_path, monkeypatch, capsys):
    """`sage-megatron toy` bookkeeping with the two training runs replaced by fake ones (the real runs are
    what `make run` does): summary.json keys, numbers recomputed by hand, and its path printed last."""
    import sage_megatron.comparison as C

    steps = {"grpo": [(1.0, 0.5, {}), (3.0, 0.7, {}), (2.0, 0.6, {})],
             "sage": [(6.0, 1.0, {"hint/hinted_l1": 2, "hint/hinted_l3": 1}), (2.0, 0.8, {"hint/hinted_l1": 1}),
                      (4.0, 0.9, {"hint/hinted_l2": 3})]}
    seen = []

    def fake_train(cfg):
        name = cfg.algorithm.name
        seen.append((name, cfg.eval.at_start, cfg.run.seed))
        run = tmp_path / "out" / name
        run.mkdir(parents=True)
        with (run / "metrics.jsonl").open("w") as f:
            for i, (t, usage, hints) in enumerate(steps[name], 1):
                f.write(json.dumps({"step": i, "time/step": t, "groups/prompt_usage": usage, **hints}) + "\n")
        evals = {"final": {"avg_at_k": 0.25 if name == "grpo" else 0.5}}
        if cfg.eval.at_start:
            evals["start"] = {"avg_at_k": 0.125}
        return {"evals": evals, "never_solved_share": 0.5 if name == "grpo" else 0.25, "steps": 3,
                "train_seconds": 9.0}

    monkeypatch.setattr(C, "train", fake_train)
    summary = C.toy_comparison(tmp_path / "out")
    assert seen == [("grpo", True, 0), ("sage", False, 0)]        # same seed; start evaluated once
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk == summary
    g, s = summary["grpo"], summary["sage"]
    assert (g["heldout_accuracy"], s["heldout_accuracy"]) == (0.25, 0.5)
    assert g["heldout_accuracy_start"] == s["heldout_accuracy_start"] == 0.125
    assert g["prompt_usage"] == pytest.approx(0.6) and s["prompt_usage"] == pytest.approx(0.9)
    assert (g["never_solved_share"], s["never_solved_share"]) == (0.5, 0.25)
    assert s["hinted_per_level"] == {"1": 3.0, "2": 3.0, "3": 1.0} and g["hinted_per_level"] == {"1": 0.0, "2": 0.0, "3": 0.0}
    assert summary["sage_over_grpo_time"] == pytest.approx(4.0 / 2.0)
    assert summary["sage_over_grpo_time_median"] == pytest.approx(4.0 / 2.0)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str((tmp_path / "out" / "summary.json").absolute())
    assert any(line.startswith("| never-solved share | 0.500 | 0.250 |") for line in out)
