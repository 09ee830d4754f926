"""bench/vs_trl.py and bench/trl_install.py: the cheap, pure parts (argument checks, config equivalence,
result shape, install cache).

No TRL is installed or run here; the benchmark itself is `python bench/vs_trl.py --json OUT`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from sage_megatron.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vs(load_bench):
    return load_bench("vs_trl")


@pytest.fixture(scope="module")
def ti(load_bench):
    return load_bench("trl_install")


def args(**kw) -> argparse.Namespace:
    base = dict(steps=4, warmup=1, prompts=8, generations=8, max_tokens=112, repeats=2, seed=0, set=[],
                trl_threads=0)
    return argparse.Namespace(**{**base, **kw})


def ours_cfg(vs, a=None) -> dict:
    a = a or args()
    return to_dict(load_config(str(ROOT / "configs/toy.yaml"), vs.ours_overrides(a, "/tmp/x")))


def test_check_args(vs):
    assert vs.check_args(args()) == []
    errs = vs.check_args(args(steps=1, warmup=1, generations=1, prompts=0, max_tokens=0, repeats=0,
                              set=["nokey"], trl_threads=-1))
    text = " ".join(errs)
    for flag in ("--steps", "--generations", "--prompts", "--max-tokens", "--repeats", "--set", "--trl-threads"):
        assert flag in text
    assert any("exceed --warmup" in e for e in errs)
    assert vs.check_args(args(warmup=0, steps=1)) == []


def test_ours_overrides_make_a_plain_grpo_run(vs):
    cfg = ours_cfg(vs, args(prompts=4, generations=6, max_tokens=50, steps=3, set=["optim.lr=1e-4"]))
    assert cfg["algorithm"]["name"] == "grpo"
    assert (cfg["data"]["batch_size"], cfg["rollout"]["group_size"], cfg["rollout"]["max_tokens"]) == (4, 6, 50)
    assert cfg["run"]["steps"] == 3 and cfg["optim"]["mini_batches"] == 1 and cfg["optim"]["lr"] == 1e-4
    assert cfg["eval"]["data"] == "" and cfg["run"]["checkpoint_every"] == 0 and not cfg["run"]["export_hf"]
    assert not cfg["run"]["resume"] and not cfg["logging"]["tensorboard"]


def test_trl_config_mirrors_ours(vs):
    cfg = ours_cfg(vs)
    kw = vs.trl_config_kwargs(cfg, "/tmp/out")
    assert kw["per_device_train_batch_size"] == 64 and kw["num_generations"] == 8
    assert kw["max_completion_length"] == 112 and kw["beta"] == 0.0 and kw["use_vllm"] is False
    assert vs.config_mismatches(cfg, kw) == []
    # what GRPOConfig.__post_init__ adds (generation_batch_size) keeps it equivalent
    assert vs.config_mismatches(cfg, {**kw, "generation_batch_size": 64, "lr_scheduler_type": "constant"}) == []


@pytest.mark.parametrize("change, what", [
    ({"max_completion_length": 128}, "max new tokens"),
    ({"per_device_train_batch_size": 32, "generation_batch_size": 32}, "prompts per step"),
    ({"num_generations": 4}, "generations per prompt"),
    ({"steps_per_generation": 2, "generation_batch_size": 128}, "optimizer steps per generation batch"),
    ({"learning_rate": 1e-5}, "learning rate"),
    ({"beta": 0.04}, "KL coef"),
    ({"bf16": True}, "dtype"),
    ({"temperature": 0.7}, "temperature"),
    ({"loss_type": "grpo"}, "loss aggregation"),
    ({"lr_scheduler_type": "linear"}, "lr schedule"),
    ({"gradient_checkpointing": True}, "activation recompute (TRL gradient checkpointing)"),   # TRL's default
])
def test_config_mismatch_is_named(vs, change, what):
    cfg = ours_cfg(vs)
    bad = vs.config_mismatches(cfg, {**vs.trl_config_kwargs(cfg, "/tmp/out"), **change})
    assert any(m.startswith(what + ":") for m in bad), bad


def test_ours_with_minibatches_is_not_equivalent(vs):
    cfg = ours_cfg(vs, args(set=["optim.mini_batches=2"]))
    kw = vs.trl_config_kwargs(cfg, "/tmp/out")
    assert any(m.startswith("optimizer steps per generation batch") for m in vs.config_mismatches(cfg, kw))


def test_run_order_alternates(vs):
    assert vs.run_order(1) == [(0, "ours"), (0, "trl")]
    assert vs.run_order(3) == [(0, "ours"), (0, "trl"), (1, "trl"), (1, "ours"), (2, "ours"), (2, "trl")]


def fake_runs(vs) -> list[dict]:
    recs = [{"step": i, "time/step": s, "time/rollout": s / 2, "time/update": s / 4, "response_len/mean": 40.0,
             "acc/before_hints": 0.5} for i, s in ((1, 9.0), (2, 2.0), (3, 4.0))]
    ours = {"side": "ours", "round": 0, "wall_seconds": 60.0, "steps": vs.ours_steps(recs)}
    trl = {"side": "trl", "round": 0, "wall_seconds": 50.0, "steps": [
        {"step": i, "seconds": s, "phases": {"generate": s - 1, "reward": 0.5, "other": 0.5},
         "response_tokens": 42.0, "accuracy": 0.25} for i, s in ((1, 20.0), (2, 12.0), (3, 6.0))]}
    return [ours, trl]


def test_result_shape_and_numbers(vs):
    res = vs.build_result(fake_runs(vs), warmup=1, settings={"steps": 3, "warmup": 1, "repeats": 1, "prompts": 8,
                                                            "generations": 8, "max_tokens": 112, "model": "toy"},
                          versions={"trl": "x"}, notes=["n"])
    json.dumps(res)  # serialisable
    for key in ("ours_seconds_per_step", "trl_seconds_per_step", "speedup", "settings", "versions", "notes",
                "ours_seconds_per_step_incl_warmup", "trl_seconds_per_step_incl_warmup", "goal_met"):
        assert key in res
    assert res["ours_seconds_per_step"] == pytest.approx(3.0)      # (2 + 4) / 2, step 1 is warm-up
    assert res["trl_seconds_per_step"] == pytest.approx(9.0)
    assert res["speedup"] == pytest.approx(3.0) and res["goal_met"] is True
    assert res["ours_seconds_per_step_incl_warmup"] == pytest.approx(5.0)
    assert res["ours"]["phases"]["rollout"] == pytest.approx(1.5)
    assert res["ours"]["phases"]["weight_sync"] == 0.0            # absent in the record -> 0
    assert res["trl"]["phases"]["generate"] == pytest.approx(8.0)
    assert res["wall_speedup"] == pytest.approx(50 / 60)
    assert res["speedup_median"] == pytest.approx(3.0) and res["speedup_fastest_step"] == pytest.approx(3.0)
    assert res["speedup_per_round"] == [pytest.approx(3.0)]
    table = vs.markdown_table(res)
    assert "| s/step (mean, warm-up excluded) | 3.00 | 9.00 | 3.00x |" in table
    assert "goal >= 2x on both: met" in table
    assert res["load_warning"] is None and "WARNING" not in table


def test_goal_needs_the_median_too_and_load_is_flagged(vs):
    runs = fake_runs(vs)
    runs[1]["steps"][1]["seconds"] = 60.0       # one load spike on TRL's side: measured 60, 6, 4, 4 s
    runs[1]["steps"].append({"step": 4, "seconds": 4.0, "phases": {}, "response_tokens": None, "accuracy": None})
    runs[1]["steps"].append({"step": 5, "seconds": 4.0, "phases": {}, "response_tokens": None, "accuracy": None})
    for r in runs:
        r["load_avg_1m"] = [1.0, 9.0]       # a run's own processes raise the load: not flagged by itself
        r["busy_cores_before"] = 0.1
    res = vs.build_result(runs, warmup=1, settings={"cpu_cores": 2}, versions={}, notes=[])
    assert res["speedup"] > 2.0 and res["speedup_median"] < 2.0
    assert res["goal_met"] is False
    assert res["load_warning"] is None
    runs[1]["busy_cores_before"] = 1.25     # other work kept 1.25 cores busy before TRL's run
    settings = {"steps": 3, "warmup": 1, "repeats": 1, "prompts": 8, "generations": 8, "max_tokens": 112,
                "model": "toy", "cpu_cores": 2}
    res = vs.build_result(runs, warmup=1, settings=settings, versions={}, notes=[])
    assert "trl round 0 (1.25)" in res["load_warning"] and "of 2 cores" in res["load_warning"]
    assert res["trl"]["busy_cores_before"] == 1.25 and res["ours"]["busy_cores_before"] == 0.1
    assert "| other work before a run (busy cores, most) | 0.10 | 1.25 | |" in vs.markdown_table(res)



def test_warmup_zero_counts_every_step(vs):
    res = vs.build_result(fake_runs(vs), warmup=0, settings={}, versions={}, notes=[])
    assert res["ours_seconds_per_step"] == pytest.approx(5.0)
    assert res["speedup"] == pytest.approx(38 / 3 / 5.0)


def test_pins_file_pins_the_default_trl(vs, ti):
    pins = ti.read_pins()
    assert vs.DEFAULT_TRL == ti.DEFAULT_TRL           # vs_trl.py's --trl-version default
    assert f"trl=={ti.DEFAULT_TRL}" in pins
    assert all("==" in p for p in pins)


def test_ensure_trl_reuses_the_cache_and_refuses_clashes(ti, tmp_path, monkeypatch):
    site = tmp_path / "trl-9.9.9"
    site.mkdir()
    (site / ".bench-installed.json").write_text("{}")
    assert ti.ensure_trl("9.9.9", tmp_path) == site           # cached: no pip call
    monkeypatch.setattr(ti, "read_pins", lambda: ["trl==1.0.0", "pytest==0.0.1"])
    with pytest.raises(SystemExit, match="pytest==0.0.1"):
        ti.ensure_trl("1.0.0", tmp_path)                        # would shadow the venv's pytest: refused
    assert not (tmp_path / "trl-1.0.0").exists()


def test_trl_worker_script_starts_by_path(tmp_path):
    # run_trl starts bench/trl_worker.py by path (no TRL needed to get as far as its usage line)
    import subprocess
    import sys

    p = subprocess.run([sys.executable, str(ROOT / "bench" / "trl_worker.py")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "usage: trl_worker.py WORK_DIR" in p.stderr, p.stderr
