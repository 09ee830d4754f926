"""Config loading, dotted overrides and the one validate(): errors name the key and the fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sage_megatron.config import Config, ConfigError, load_config, validate, validate_for_model


def test_defaults_and_files_validate():
    validate(Config())
    for name in sorted(Path("configs").glob("*.yaml")):          # every shipped config
        validate(load_config(str(name)))
    original = load_config("configs/toy.yaml", ["algorithm.loss_context=original"])
    assert original.algorithm.loss_context == "original"
    with pytest.raises(ConfigError, match="loss_context"):
        load_config("configs/toy.yaml", ["algorithm.loss_context=unhinted"])


def test_overrides_parse_types(tmp_path):
    cfg = load_config("configs/toy.yaml", ["run.steps=3", "algorithm.name=grpo", "algorithm.clip_c=null",
                                           "optim.lr=1e-5", "logging.tensorboard=false"])
    assert cfg.run.steps == 3 and cfg.algorithm.name == "grpo" and cfg.algorithm.clip_c is None
    assert cfg.optim.lr == 1e-5 and cfg.logging.tensorboard is False
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"run": {"steps": 5}}))
    assert load_config(p).run.steps == 5
    with pytest.raises(Exception):
        cfg.run.steps = 4   # frozen


def test_unknown_key_names_it_and_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key run\.stepz.*'steps'"):
        load_config("configs/toy.yaml", ["run.stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown section 'optimizer'.*'optim'"):
        load_config(None, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match=r"section\.key"):
        load_config(None, ["steps=3"])


def test_bad_types_and_choices():
    with pytest.raises(ConfigError, match=r"run\.steps: expected an integer"):
        load_config(None, ["run.steps=abc"])
    with pytest.raises(ConfigError, match=r"algorithm\.name: 'ppo' is not one of"):
        load_config(None, ["algorithm.name=ppo"])


def test_validate_reports_every_problem_at_once():
    cfg = load_config(None, ["parallel.tp=0", "rollout.group_size=1", "optim.mini_batches=3", "data.batch_size=16",
                             "data.train=/nope.jsonl"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    for part in ("tp=0 must be >= 1", "group_size=1", "multiple of optim.mini_batches=3", "/nope.jsonl"):
        assert part in msg


def test_overlong_buffer_must_fit_inside_max_tokens():
    cfg = load_config(None, ["rollout.max_tokens=96", "algorithm.overlong_buffer=96", "algorithm.overlong_penalty=-1"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "algorithm.overlong_buffer=96 must be in [0, rollout.max_tokens=96)" in str(e.value)
    assert "algorithm.overlong_penalty=-1.0 must be >= 0" in str(e.value)
    validate(load_config(None, ["rollout.max_tokens=96", "algorithm.overlong_buffer=32"]))


def test_lr_schedule_keys_are_checked():
    from sage_megatron.config import lr_decay_steps

    cfg = load_config(None, ["optim.lr_decay_style=step", "optim.min_lr=1", "optim.lr_warmup_steps=-1"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    for part in ("optim.lr_decay_style='step' is not one of constant, linear, cosine",
                 "optim.min_lr=1.0 must be in [0, optim.lr=1e-06]", "optim.lr_warmup_steps=-1"):
        assert part in str(e.value)
    # a decay over the whole run: run.steps x optim.mini_batches optimizer steps; the warmup must end before it
    long_warmup = load_config("configs/toy.yaml", ["optim.lr_decay_style=cosine", "optim.lr_warmup_steps=72"])
    assert lr_decay_steps(long_warmup) == 36 * 2
    with pytest.raises(ConfigError, match=r"optim\.lr_warmup_steps=72 must be below the decay's 72 optimizer steps"):
        validate(long_warmup)
    validate(load_config("configs/toy.yaml", ["optim.lr_decay_style=cosine", "optim.lr_warmup_steps=71"]))
    validate(load_config("configs/toy.yaml", ["optim.lr_decay_style=constant", "optim.lr_warmup_steps=500"]))
    assert lr_decay_steps(load_config(None, ["optim.lr_decay_steps=7"])) == 7


def test_reward_keys_are_checked():
    cfg = load_config(None, ["reward.extractor=final", "reward.workers=0", "reward.timeout_s=10",
                             "reward.batch_timeout_s=5"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    for part in ("reward.extractor='final' is not one of ['answer_is', 'boxed', 'gsm8k', 'last_number']",
                 "reward.workers=0", "reward.timeout_s=10.0 must be > 0 and <= reward.batch_timeout_s=5.0"):
        assert part in msg
    validate(load_config(None, ["reward.extractor=last_number", "eval.data=arith", "algorithm.templates=arith"]))
    validate(load_config(None, ["data.train=arith_small", "eval.data=arith_small", "algorithm.templates=arith"]))
    with pytest.raises(ConfigError, match=r"eval.data='arith_big': no such file \(or one of toy, arith, arith_small"):
        validate(load_config(None, ["eval.data=arith_big"]))


def test_layout_checked_against_the_model(tiny_hf_factory):
    hf = tiny_hf_factory("llama")   # 4 heads, 2 kv heads, 2 layers
    validate_for_model(load_config(None, ["parallel.tp=2"]), hf)
    with pytest.raises(ConfigError, match=r"not divisible by tp=4"):
        validate_for_model(load_config(None, ["parallel.tp=4"]), hf)
    with pytest.raises(ConfigError, match=r"num_hidden_layers=2 is not divisible by pp=3"):
        validate_for_model(load_config(None, ["parallel.pp=3"]), hf)


def test_cli_reports_config_errors_before_starting(capsys):
    from sage_megatron.cli import main

    assert main(["train", "--config", "configs/toy.yaml", "run.bogus=1"]) == 2
    assert "unknown key run.bogus" in capsys.readouterr().err


def test_precision_keys_reach_the_actor_options_and_bad_combinations_are_refused():
    from sage_megatron.config import fp8_options
    from sage_megatron.parallel.precision import Fp8Options

    cfg = load_config(None, ["model.use_te=true", "model.dtype=bfloat16", "model.fp8=hybrid",
                             "model.fp8_recipe=delayed", "model.fp8_amax_history_len=16", "model.fp8_param=true"])
    validate(cfg)
    assert fp8_options(cfg.model) == Fp8Options(format="hybrid", recipe="delayed", amax_history_len=16,
                                                fp8_param=True)
    assert fp8_options(Config().model) is None
    with pytest.raises(ConfigError, match=r"model\.fp8=e4m3: FP8 needs the Transformer Engine.*model\.use_te=true"):
        validate(load_config(None, ["model.dtype=bfloat16", "model.fp8=e4m3"]))
    with pytest.raises(ConfigError, match=r"model\.fp8=e4m3: .*set dtype=bfloat16 \(model\.dtype\)"):
        validate(load_config(None, ["model.use_te=true", "model.fp8=e4m3"]))
    with pytest.raises(ConfigError, match=r"model\.fp8"):
        load_config(None, ["model.fp8=e5m2"])
    with pytest.raises(ConfigError, match=r"rollout\.transport"):
        load_config(None, ["rollout.transport=gloo"])


@pytest.mark.parametrize(("overrides", "device", "match"), [
    (["model.use_te=true"], "cpu", r"model\.use_te=true needs GPU nodes.*set model\.use_te=false"),
    (["model.use_te=true", "model.dtype=bfloat16", "model.fp8=e4m3"], "cpu", r"model\.fp8=e4m3 needs Hopper"),
    (["rollout.transport=nccl"], "cpu", r"rollout\.transport=nccl: transport 'nccl' needs GPU engines"),
    (["rollout.transport=ipc"], "cpu", r"rollout\.transport=ipc: transport 'ipc' needs GPU engines"),
    (["rollout.transport=ipc"], "cuda", r"rollout\.transport=ipc: .*disaggregated.*use 'nccl' or 'auto'"),
])
def test_device_rules_are_checked_once_the_cluster_is_known(overrides, device, match):
    from sage_megatron.config import validate_for_device

    cfg = load_config(None, overrides)
    validate(cfg)                       # statically fine: only the cluster's device rules it out
    with pytest.raises(ConfigError, match=match):
        validate_for_device(cfg, device)


def test_device_rules_accept_what_can_run():
    from sage_megatron.config import validate_for_device

    validate_for_device(Config(), "cpu")
    validate_for_device(load_config(None, ["rollout.transport=cpu"]), "cpu")
    for transport in ("auto", "nccl", "cpu"):
        validate_for_device(load_config(None, [f"rollout.transport={transport}"]), "cuda")
    validate_for_device(load_config(None, ["rollout.transport=ipc"]), "cuda", colocated=True)


def test_train_refuses_transformer_engine_on_a_cpu_cluster_before_any_rank_starts(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sage_megatron.cli", "train", "--config", "configs/toy.yaml",
                           "model.use_te=true", "rollout.transport=nccl", f"run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.use_te=true needs GPU nodes" in proc.stderr
    assert "rollout.transport=nccl: transport 'nccl' needs GPU engines" in proc.stderr
    assert not (tmp_path / "run").exists()       # nothing was prepared or started


def test_one_session_needs_the_same_cluster_model_and_engines_but_not_the_same_algorithm(tmp_path):
    """train_runs shares Ray, the ranks and the engines: runs may differ in algorithm, optimizer, data and
    steps, not in what builds the session; each needs its own run folder."""
    from sage_megatron.config import validate_one_session

    run = lambda name, *more: load_config("configs/toy.yaml", [f"run.dir={tmp_path / name}", *more])  # noqa: E731
    validate_one_session([run("a", "algorithm.name=grpo"),
                          run("b", "algorithm.name=sage", "optim.lr=1e-3", "run.steps=3", "rollout.temperature=0.5")])
    with pytest.raises(ConfigError) as e:
        validate_one_session([run("a"), run("b", "rollout.engine_dtype=bfloat16", "parallel.tp=2"), run("a")])
    msg = str(e.value)
    assert "run 1 has rollout.engine_dtype='bfloat16' but run 0 has 'float32'" in msg
    assert "run 1 has parallel=" in msg and "'tp': 2" in msg
    assert "two runs write to the same run.dir" in msg
    with pytest.raises(ConfigError, match="run 1 has run.seed=1 but run 0 has 0"):
        validate_one_session([run("a"), run("b", "run.seed=1")])
