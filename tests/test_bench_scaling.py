"""bench/scaling.py's trainer path without a cluster: a fake trainer writes what the real one writes
(run.dir/config.json + metrics.jsonl with the trainer's time/* keys); the harness fills the template,
reads the trainer's hint keys, and pairs each measurement with the CPU prediction of that run."""
from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

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
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"model": {"hf_dir": hf}, "rollout": {"group_size": 4, "max_tokens": 12},
           "data": {"batch_size": batch}, "optim": {"mini_batches": 2}, "algorithm": {"kl_coef": 0.0},
           "parallel": {"tp": 1, "pp": 1, "dp": 1}}
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
