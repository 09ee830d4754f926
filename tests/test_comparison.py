"""The embedded default's bookkeeping (sage_megatron/comparison.py)."""
from __future__ import annotations

import json

import pytest


def test_toy_comparison_writes_the_summary_the_readme_promises(tmp_path, monkeypatch, capsys):
    """`sage-megatron toy` bookkeeping with the session's two training runs replaced by fake ones (the real runs are
    what `make run` does): summary.json keys, numbers recomputed by hand, and its path printed last."""
    import sage_megatron.comparison as C

    steps = {"grpo": [(1.0, 0.5, {}), (3.0, 0.7, {}), (2.0, 0.6, {})],
             "sage": [(6.0, 1.0, {"hint/hinted_l1": 2, "hint/hinted_l3": 1}), (2.0, 0.8, {"hint/hinted_l1": 1}),
                      (4.0, 0.9, {"hint/hinted_l2": 3})]}
    seen = []

    def fake_train_runs(cfgs):
        return [fake_train(cfg) for cfg in cfgs]

    def fake_train(cfg):
        name = cfg.algorithm.name
        seen.append((name, cfg.eval.at_start, cfg.run.seed))
        run = tmp_path / "out" / name
        run.mkdir(parents=True)
        with (run / "metrics.jsonl").open("w") as f:
            for i, (t, usage, hints) in enumerate(steps[name], 1):
                f.write(json.dumps({"step": i, "time/step": t, "groups/prompt_usage": usage, **hints}) + "\n")
        final = {"accuracy": 0.25 if name == "grpo" else 0.5, "accuracy_ci95": 0.05,
                 "hard_accuracy": 0.1 if name == "grpo" else 0.2, "hard_accuracy_ci95": 0.08,
                 # [index, difficulty, score]; the toy config's hard band is difficulty >= 5
                 "per_prompt": [[1, 6, 0.0], [0, 1, 0.5], [2, 8, 0.5]] if name == "grpo" else
                               [[0, 1, 0.75], [1, 6, 0.5], [2, 8, 0.75]]}
        evals = {"final": final}
        curve = [{"step": 3, **final}]
        if cfg.eval.at_start:
            evals["start"] = {"accuracy": 0.125, "accuracy_ci95": 0.04, "hard_accuracy": 0.0625,
                              "hard_accuracy_ci95": 0.03, "per_prompt": [[0, 1, 0.25], [1, 6, 0.0], [2, 8, 0.25]]}
            curve.insert(0, {"step": 0, **evals["start"]})
        (run / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in curve))
        return {"evals": evals, "never_solved_share": 0.5 if name == "grpo" else 0.25, "steps": 3,
                "train_seconds": 9.0}

    monkeypatch.setattr(C, "train_runs", fake_train_runs)
    summary = C.toy_comparison(tmp_path / "out")
    assert seen == [("grpo", True, 0), ("sage", False, 0)]        # same seed; start evaluated once
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk == summary
    g, s = summary["grpo"], summary["sage"]
    assert (g["heldout_accuracy"], s["heldout_accuracy"]) == (0.25, 0.5)
    assert g["heldout_accuracy_start"] == s["heldout_accuracy_start"] == 0.125
    assert g["heldout_accuracy_ci95"] == 0.05 and g["heldout_accuracy_start_ci95"] == 0.04
    assert (g["heldout_hard_accuracy"], s["heldout_hard_accuracy"]) == (0.1, 0.2)
    assert g["heldout_hard_accuracy_start"] == s["heldout_hard_accuracy_start"] == 0.0625
    assert s["heldout_hard_accuracy_ci95"] == 0.08
    # gains over the same prompts, paired by index: GRPO 0.25, 0, 0.25; SAGE 0.5, 0.5, 0.5 (no spread)
    assert g["heldout_gain"] == pytest.approx(1 / 6) and g["heldout_hard_gain"] == pytest.approx(0.125)
    assert g["heldout_gain_ci95"] == pytest.approx(1.96 * (1 / 48 / 3) ** 0.5)
    assert g["heldout_hard_gain_ci95"] == pytest.approx(1.96 * (0.03125 / 2) ** 0.5)
    assert (s["heldout_gain"], s["heldout_gain_ci95"], s["heldout_hard_gain"]) == (0.5, 0.0, 0.5)
    # SAGE's curve starts from GRPO's start evaluation (same weights), on disk too
    assert [e["step"] for e in s["heldout_curve"]] == [0, 3] and s["heldout_curve"][0]["accuracy"] == 0.125
    assert [json.loads(x)["step"] for x in (tmp_path / "out" / "sage" / "evals.jsonl").read_text().splitlines()] == [0, 3]
    assert on_disk["cpu_count"] >= 1 and on_disk["command"] and on_disk["commit"] and "load_avg_1m" in on_disk
    assert g["prompt_usage"] == pytest.approx(0.6) and s["prompt_usage"] == pytest.approx(0.9)
    assert (g["never_solved_share"], s["never_solved_share"]) == (0.5, 0.25)
    assert s["hinted_per_level"] == {"1": 3.0, "2": 3.0, "3": 1.0} and g["hinted_per_level"] == {"1": 0.0, "2": 0.0, "3": 0.0}
    assert summary["sage_over_grpo_time"] == pytest.approx(4.0 / 2.0)
    assert summary["sage_over_grpo_time_median"] == pytest.approx(4.0 / 2.0)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str((tmp_path / "out" / "summary.json").absolute())
    assert any(line.startswith("| never-solved share | 0.500 | 0.250 |") for line in out)
    assert "| held-out accuracy, end (hard band) | 0.100 ± 0.080 | 0.200 ± 0.080 |" in out
    assert "| held-out gain, end - start, paired (all difficulties) | 0.167 ± 0.163 | 0.500 ± 0.000 |" in out
