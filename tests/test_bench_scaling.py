"""bench/scaling.py's trainer path without a cluster: a fake trainer writes what the real one writes
(run.dir/config.json + metrics.jsonl with the trainer's time/* keys); the harness fills the template,
reads the trainer's hint keys, pairs each measurement with the CPU prediction of that run (its ranks
placed as its config says), runs weak and strong sweeps in one go, and fits the CPU constants."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _scaling():
    spec = importlib.util.spec_from_file_location("bench_scaling", REPO / "bench" / "scaling.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


FAKE_TRAINER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    run_dir, batch, engines, steps, hf = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    dp, rpn = (int(sys.argv[6]), int(sys.argv[7])) if len(sys.argv) > 7 else (1, 0)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / "calls.log", "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
    cfg = {"model": {"hf_dir": hf}, "rollout": {"group_size": 4, "max_tokens": 12},
           "data": {"batch_size": batch}, "optim": {"mini_batches": 2}, "algorithm": {"kl_coef": 0.0},
           "parallel": {"tp": 1, "pp": 1, "dp": dp}, "cluster": {"ranks_per_node": rpn}}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "time/rollout": 1.0 * batch / engines, "time/hint_gen": 0.1,
                                "time/hint_rollout": 0.4, "time/logprob": 0.2, "time/update": 0.3,
                                "time/weight_sync": 0.1, "time/reward": 0.05, "time/step": 0.1 + 1.0 * batch / engines + 1.15,
                                "response_len/mean": 11.0, "hint/triggered": batch, "hint/hinted_total": 3 * batch,
                                "weight_version": s}) + "\\n")
''')


def test_trainer_values_weak_and_strong(tmp_path):
    sc = _scaling()
    m = tmp_path / "n2" / "metrics.jsonl"
    v = sc.trainer_values(nodes=2, tp=1, pp=1, gpus_per_node=1, steps=4, metrics_path=m, batch=4, scaling="weak")
    assert (v["engines"], v["batch"], v["dp"], v["run_dir"]) == (2, 8, 2, str(m.parent))
    v = sc.trainer_values(nodes=2, tp=1, pp=1, gpus_per_node=8, steps=4, metrics_path=m, batch=4,
                          engines_per_node=2)
    assert (v["engines"], v["batch"], v["dp"]) == (4, 4, 16)
    assert "batch" not in sc.trainer_values(nodes=1, tp=1, pp=1, gpus_per_node=1, steps=1, metrics_path=m)


def test_template_spreads_the_actor_over_the_nodes(tmp_path):
    """{ranks_per_node} = --gpus-per-node (trainer ranks per node, on CPU too) and {dp} fill the
    template (and SAGE_BENCH_*), and scaling.sbatch's real-trainer template passes both to the trainer."""
    sc = _scaling()
    m = tmp_path / "n2" / "metrics.jsonl"
    v = sc.trainer_values(nodes=2, tp=1, pp=1, gpus_per_node=1, steps=2, metrics_path=m, batch=4)
    assert (v["ranks_per_node"], v["dp"], v["engines"]) == (1, 2, 2)
    v = sc.trainer_values(nodes=2, tp=2, pp=1, gpus_per_node=2, steps=2, metrics_path=m)
    assert (v["ranks_per_node"], v["dp"]) == (2, 2)
    out = tmp_path / "filled.txt"
    sc.run_trainer(template=f"echo dp={{dp}} rpn={{ranks_per_node}} env=$SAGE_BENCH_RANKS_PER_NODE > {out}; "
                            f"touch {{metrics}}", nodes=2, tp=1, pp=1, gpus_per_node=1, steps=2, metrics_path=m,
                   timeout=30)
    assert out.read_text().split() == ["dp=2", "rpn=1", "env=1"]
    sbatch = (REPO / "scripts" / "slurm" / "scaling.sbatch").read_text()
    assert "parallel.tp={tp} parallel.pp={pp} parallel.dp={dp} cluster.ranks_per_node={ranks_per_node}" in sbatch
    assert '--gpus-per-node $SAGE_SCALING_RANKS_PER_NODE' in sbatch
    assert sc.parse_scalings("both") == sc.parse_scalings("weak,strong,weak") == ["weak", "strong"]
    with pytest.raises(Exception, match="expected weak, strong"):
        sc.parse_scalings("medium")


def _run_dir(tmp_path: Path, *, dp: int, ranks_per_node: int, batch: int = 4) -> Path:
    """A fake trainer's run dir (config.json + metrics.jsonl) with the model of _hf_model."""
    import subprocess

    hf = _hf_model(tmp_path)
    (tmp_path / "fake.py").write_text(FAKE_TRAINER)
    run = tmp_path / f"dp{dp}-rpn{ranks_per_node}"
    subprocess.run([sys.executable, str(tmp_path / "fake.py"), str(run), str(batch), "2", "3", str(hf), str(dp),
                    str(ranks_per_node)], check=True)
    return run


def _hf_model(tmp_path: Path) -> Path:
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps(HF_CONFIG))
    return hf


HF_CONFIG = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 101, "head_dim": 32}


def test_cpu_prediction_places_ranks_as_the_run_did(tmp_path):
    """2 data-parallel ranks one per node (cluster.ranks_per_node=1) pay the inter-node gradient all-reduce:
    a larger predicted update than the same 2 ranks on one node (ranks_per_node 0 = all on the first node).
    Reference: formulas.train_time on layouts and a workload written out by hand."""
    from sage_megatron.perf.catalogue import CPU_THIS_MACHINE, ModelSpec
    from sage_megatron.perf.formulas import CPU_FITTED_EFFICIENCY, Layout, Workload, train_time

    sc = _scaling()
    preds = {}
    for rpn in (1, 0):
        run = _run_dir(tmp_path, dp=2, ranks_per_node=rpn)
        rows = sc.read_metrics(run / "metrics.jsonl", warmup=1)
        pred, assumed, _ = sc.cpu_trainer_prediction(run, rows, engines=2, prompt_tokens=80)
        preds[rpn] = pred
        assert (assumed["train_ranks"], assumed["ranks_per_node"], assumed["train_nodes"]) == (
            (2, 1, 2) if rpn == 1 else (2, 2, 1))
    model = ModelSpec("ref", layers=2, hidden=128, ffn=256, heads=4, kv_heads=2, vocab=101, head_dim=32)
    work = Workload(prompts=4, samples=4, prompt_tokens=80, response_tokens=11.0, max_response_tokens=12,
                    length_dist="uniform", optimizer_steps=2, logprob_passes=1, hint_fraction=1.0, hint_levels=3.0)
    across = train_time(model, Layout(nodes=2, devices_per_node=1), work, CPU_THIS_MACHINE, CPU_FITTED_EFFICIENCY)
    inside = train_time(model, Layout(nodes=1, devices_per_node=2), work, CPU_THIS_MACHINE, CPU_FITTED_EFFICIENCY)
    assert preds[1]["time/update"] == pytest.approx(across.total, rel=1e-12)
    assert preds[0]["time/update"] == pytest.approx(inside.total, rel=1e-12)
    assert preds[1]["time/update"] > preds[0]["time/update"]
    assert across.dp_comm > inside.dp_comm > 0 and across.compute == pytest.approx(inside.compute)
    # the engines are the same in both: one single-device engine each, not colocated
    assert preds[1]["time/rollout"] == pytest.approx(preds[0]["time/rollout"])


def test_weak_and_strong_in_one_invocation_with_the_fit(tmp_path, capsys):
    sc = _scaling()
    hf = _hf_model(tmp_path)
    (tmp_path / "fake.py").write_text(FAKE_TRAINER)
    cmd = (f"{sys.executable} {tmp_path / 'fake.py'} {{run_dir}} {{batch}} {{engines}} {{steps}} {hf} {{dp}} "
           f"{{ranks_per_node}}")
    out = tmp_path / "out" / "scaling"
    argv = ["--json", str(out.with_suffix(".json")), "--nodes", "1,2", "--steps", "2", "--warmup", "1",
            "--train-cmd", cmd, "--scaling", "weak,strong", "--batch", "4", "--hardware", "cpu",
            "--gpus-per-node", "1", "--prompt-tokens", "80"]
    assert sc.main(argv) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    res = doc["results"]
    assert [(r["scaling"], r["nodes"], r["batch"], r["engines"]) for r in res] == [
        ("weak", 1, 4, 1), ("weak", 2, 8, 2), ("strong", 1, 4, 1), ("strong", 2, 4, 2)]
    # 1 node is the same run in both sweeps: the trainer ran 3 times, not 4
    calls = (out / "calls.log").read_text().splitlines()
    assert len(calls) == 3 and res[2]["reused_from"] == "weak-n1-tp1pp1"
    assert [c.split()[-2:] for c in calls] == [["1", "1"], ["2", "1"], ["2", "1"]]   # dp, ranks per node
    assert [r["prediction_assumed"]["train_nodes"] for r in res] == [1, 2, 1, 2]
    table = capsys.readouterr().out
    assert "weak | 8 | 5.25" in table and "2.00x | 100%" in table    # weak: 2x the work in the same time
    assert "strong | 4 | 3.25" in table and "1.62x | 81%" in table   # strong: 5.25 s -> 3.25 s
    assert "pred loo" in table and "CPU_FITTED_EFFICIENCY = Efficiency(compute=" in table   # the fit's table
    # provenance
    assert doc["argv"][1:] == argv and doc["cpu_count"] >= 1 and doc["commit"]
    assert isinstance(doc["load_avg_1m_at_start"], float)
    # the fit (on by default for --hardware cpu trainer runs), on the 3 distinct runs
    fit = doc["fit"]
    assert fit["runs"] == ["weak-n1-tp1pp1", "weak-n2-tp1pp1", "strong-n2-tp1pp1"]
    assert set(fit["fitted_params"]) == {"compute", "decode_step_overhead_s", "sync_tensor_overhead_s",
                                         "step_overhead_s"}
    assert fit["constants"]["step_overhead_s"] == pytest.approx(0.15)        # the fake's measured time/other
    assert fit["constants"]["colocated_swap"] is False and "least squares" in fit["method"]
    assert fit["paste"].startswith("CPU_FITTED_EFFICIENCY = Efficiency(")
    assert fit["rms_rel_error_after"] < fit["rms_rel_error_before"]
    assert len(fit["per_row_ratio_before"]) == len(fit["per_row_ratio_after"]) == 4
    for before, after in zip(fit["per_row_ratio_before"], fit["per_row_ratio_after"]):
        assert abs(math.log(after["time/step"])) < abs(math.log(before["time/step"]))
        assert after["other"] == pytest.approx(1.0)
    loo = fit["leave_one_out"]
    assert [e["run"] for e in loo] == fit["runs"] and all(e["predicted_step"] > 0 for e in loo)
    assert all(r["predicted_fitted"]["time/step"] > 0 and r["predicted_loo_step"] > 0 for r in res)
    # --no-fit: no fit section
    assert sc.main(argv[:1] + [str(tmp_path / "nofit.json")] + argv[2:] + ["--no-fit"]) == 0
    assert "fit" not in json.loads((tmp_path / "nofit.json").read_text())


def test_real_trainer_sweep_with_cpu_prediction(tmp_path, capsys):
    sc = _scaling()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256,
                                                "num_attention_heads": 4, "num_key_value_heads": 2,
                                                "vocab_size": 101, "head_dim": 32}))
    (tmp_path / "fake.py").write_text(FAKE_TRAINER)
    cmd = f"{sys.executable} {tmp_path / 'fake.py'} {{run_dir}} {{batch}} {{engines}} {{steps}} {hf}"
    out = tmp_path / "out" / "scaling"
    rc = sc.main(["--json", str(out.with_suffix(".json")), "--nodes", "1,2", "--steps", "2", "--warmup", "1",
                  "--train-cmd", cmd, "--scaling", "weak", "--batch", "4", "--hardware", "cpu",
                  "--prompt-tokens", "80"])
    assert rc == 0
    res = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [(r["nodes"], r["engines"], r["batch"], r["source"]) for r in res] == [(1, 1, 4, "trainer"),
                                                                                 (2, 2, 8, "trainer")]
    for r in res:
        m = r["measured"]
        assert abs(m["time/hint"] - 0.5) < 1e-9                # hint_gen + hint_rollout
        assert abs(m["time/other"] - 0.15) < 1e-9              # step - the five phases
        assert r["prediction_model"] == "hf:hf" and r["prediction_assumed"]["model"]["layers"] == 2
        w = r["prediction_assumed"]["workload"]
        assert (w["prompts"], w["samples"], w["response_tokens"], w["hint_fraction"], w["hint_levels"]) == (
            r["batch"], 4, 11.0, 1.0, 3.0)
        assert r["predicted"]["time/step"] > 0 and r["predicted"]["time/hint"] > 0
        assert r["predicted"]["time/other"] > 0   # the model's fixed per-step overhead
        assert Path(r["metrics_jsonl"]).parent.name == f"n{r['nodes']}-tp1pp1"
    table = capsys.readouterr().out
    # weak scaling: twice the work in the same time = 2x throughput, 100% efficiency
    assert "2.00x | 100%" in table and "meas/pred" in table


def test_stand_in_prediction_without_ray():
    """The stand-in's perf-model prediction (bench/scaling_standin.py) needs no Ray."""
    sc = _scaling()    # puts the repo root on sys.path, as the script does
    from bench.scaling_standin import StandIn, stand_in_prediction
    from sage_megatron.perf.catalogue import MODELS

    assert sc.StandIn is StandIn
    measured = {"flops": 1e10, "mem_bw": 1e10, "net_bw": float("nan")}
    one = stand_in_prediction(nodes=1, stand=StandIn(), model=MODELS["tiny"], measured=measured)
    two = stand_in_prediction(nodes=2, stand=StandIn(), model=MODELS["tiny"], measured=measured)
    assert set(one) >= set(sc.KEYS) and one["time/step"] > 0
    assert two["time/update"] < one["time/update"]   # the update's compute splits over the nodes
