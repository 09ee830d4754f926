"""Pretraining of the toy policy: loss goes down, checkpoints reload exactly, the cache is reused,
the shipped copy is the default recipe's and is what a fresh cache gets.

The default-policy tests take the shipped weights (through the cache) and check the shape GRPO vs SAGE
needs: accuracy falls with steps, the level-3 hint rescues hard items, the hint prompt yields parsable
JSON.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import pytest
import torch

from sage_megatron.algo.templates import TEMPLATE_PLACEHOLDERS, answer_messages, load_templates
from sage_megatron.tasks import toy_pretrain, toy_task

TINY = dataclasses.replace(
    toy_pretrain.DEFAULT_RECIPE, steps=40, batch_size=8, bucket=2, hidden_size=64, num_layers=2,
    num_heads=2, num_kv_heads=1, ffn_hidden_size=128, warmup_steps=5)


def fixed_batch(tok, n=24, seed=99):
    maker = toy_pretrain.ExampleMaker(tok, load_templates(toy_task.TEMPLATE_DIR))
    rng = random.Random(seed)
    return toy_pretrain.collate([maker.sample(rng, TINY) for _ in range(n)], tok.pad_token_id)


@torch.no_grad()
def loss_of(model, batch):
    return toy_pretrain.assistant_loss(model.eval(), *batch).item()


def test_short_pretraining_reduces_loss_and_reloads_exactly(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, meta = toy_pretrain.train_toy_policy(recipe=TINY, num_threads=1, log=None)
    batch = fixed_batch(tok)
    before = loss_of(toy_pretrain.build_model(TINY, tok), batch)       # same seed = the initial weights
    after = loss_of(model, batch)
    assert after < 0.7 * before, (before, after)
    assert meta["steps_done"] == 40 and meta["num_threads"] == 1

    out = toy_pretrain.save_policy(model, tok, meta, tmp_path / "policy")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    ids = batch[0]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    tok2 = AutoTokenizer.from_pretrained(out)
    msgs = answer_messages(load_templates(toy_task.TEMPLATE_DIR), problem="5 a+3 b*7")
    assert tok2.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tok2.eos_token_id == loaded.config.eos_token_id
    assert json.loads((out / "toy_pretrain.json").read_text())["recipe_key"] == TINY.key()


def test_training_is_deterministic():
    a, _, _ = toy_pretrain.train_toy_policy(recipe=dataclasses.replace(TINY, steps=4), num_threads=1, log=None)
    b, _, _ = toy_pretrain.train_toy_policy(recipe=dataclasses.replace(TINY, steps=4), num_threads=1, log=None)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_pretrain_toy_policy_overrides(tmp_path):
    out = toy_pretrain.pretrain_toy_policy(tmp_path / "p", seed=3, steps=2, recipe=TINY, num_threads=1, log=None)
    meta = json.loads((out / "toy_pretrain.json").read_text())
    assert meta["recipe"]["seed"] == 3 and meta["steps_done"] == 2


def test_minutes_budget_stops_early():
    _, _, meta = toy_pretrain.train_toy_policy(recipe=dataclasses.replace(TINY, steps=10_000),
                                               minutes_budget=0.02, num_threads=1, log=None)
    assert 0 < meta["steps_done"] < 10_000


def test_cache_hit_reuses_without_training(tmp_path, monkeypatch):
    recipe = dataclasses.replace(TINY, steps=3)
    first = toy_pretrain.cached_toy_policy(tmp_path, recipe=recipe, num_threads=1, log=None)
    assert first.name == f"toy_policy-{recipe.key()}" and (first / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".toy_policy-")) == [first.name]

    def boom(**_):
        raise AssertionError("retrained on a cache hit")

    monkeypatch.setattr(toy_pretrain, "train_toy_policy", boom)
    assert toy_pretrain.cached_toy_policy(tmp_path, recipe=recipe, log=None) == first
    with pytest.raises(AssertionError, match="retrained"):        # another recipe is another key
        toy_pretrain.cached_toy_policy(tmp_path, recipe=dataclasses.replace(recipe, seed=recipe.seed + 1), log=None)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]   # failed run cleaned up


def test_recipe_key_covers_recipe_code_and_templates(tmp_path):
    base = toy_pretrain.DEFAULT_RECIPE
    assert base.key() == dataclasses.replace(base).key()
    assert base.key() != dataclasses.replace(base, steps=base.steps + 1).key()
    for name in TEMPLATE_PLACEHOLDERS:
        (tmp_path / f"{name}.txt").write_text((toy_task.TEMPLATE_DIR / f"{name}.txt").read_text())
    assert dataclasses.replace(base, template_dir=str(tmp_path)).key() == base.key()   # texts, not path
    (tmp_path / "answer_system.txt").write_text("changed")
    assert dataclasses.replace(base, template_dir=str(tmp_path)).key() != base.key()


def test_the_shipped_policy_is_the_default_recipes():
    """A change to the recipe, the code version or the templates changes the key: reship with --ship."""
    shipped = toy_pretrain.shipped_policy(toy_pretrain.DEFAULT_RECIPE)
    assert shipped is not None, "sage_megatron/tasks/toy_policy is not the default recipe's: run " \
                                "python -m sage_megatron.tasks.toy_pretrain --ship"
    meta = json.loads((shipped / "toy_pretrain.json").read_text())
    assert meta["recipe"] == json.loads(json.dumps(dataclasses.asdict(toy_pretrain.DEFAULT_RECIPE)))
    assert meta["steps_done"] == toy_pretrain.DEFAULT_RECIPE.steps
    assert toy_pretrain.shipped_policy(dataclasses.replace(toy_pretrain.DEFAULT_RECIPE, seed=7)) is None


def test_a_fresh_cache_copies_the_shipped_policy_without_training(tmp_path, monkeypatch):
    def boom(**_):
        raise AssertionError("trained although the shipped policy has this recipe")

    monkeypatch.setattr(toy_pretrain, "train_toy_policy", boom)
    got = toy_pretrain.cached_toy_policy(tmp_path, log=None)
    assert got == tmp_path / f"toy_policy-{toy_pretrain.DEFAULT_RECIPE.key()}"
    assert (got / "model.safetensors").read_bytes() == (toy_pretrain.SHIPPED_DIR / "model.safetensors").read_bytes()


def test_check_learned_tells_a_policy_at_chance_from_the_shipped_one(tmp_path):
    untrained = toy_pretrain.pretrain_toy_policy(tmp_path / "p", recipe=dataclasses.replace(TINY, steps=2),
                                                 num_threads=1, log=None)
    said = []
    assert toy_pretrain.check_learned(untrained, log=said.append) < toy_pretrain.LEARNED_MIN_ONE_STEP
    assert len(said) == 1 and "WARNING" in said[0] and "--seed" in said[0]
    said.clear()
    assert toy_pretrain.check_learned(toy_pretrain.SHIPPED_DIR, log=said.append) >= 0.6 and not said


# ----------------------------------------------------------------------------- the real recipe


@pytest.fixture(scope="module")
def default_policy(tmp_path_factory) -> Path:
    root = os.environ.get("SAGE_TOY_CACHE") or tmp_path_factory.mktemp("toy_cache")
    return toy_pretrain.cached_toy_policy(root, num_threads=2)


def test_default_policy_has_the_shape_sage_needs(default_policy):
    report = toy_pretrain.evaluate_policy(default_policy, rows_per_step=48, num_threads=2)
    print("\n" + toy_pretrain.format_report(report))
    acc = {k: v["unhinted"] for k, v in report["by_steps"].items()}
    hinted = {k: v["hinted"] for k, v in report["by_steps"].items()}
    # easy items are often solved (the default seed-1 policy measured 0.62 / 0.31 at 32 rows per step; seed 0
    # learned only the format, 0.16 / 0.16, and fails here)
    assert acc[1] >= 0.5 and acc[2] >= 0.25
    assert acc[8] <= 0.25 and acc[7] <= 0.3                    # hard ones mostly are not
    assert sum(acc[k] for k in (1, 2)) > sum(acc[k] for k in (5, 6)) > sum(acc[k] for k in (7, 8)) - 0.1
    assert min(hinted[k] - acc[k] for k in (6, 7, 8)) >= 0.2  # the level-3 hint rescues hard items
    assert report["parse_rate"] >= 0.6                         # self-hinting produces usable JSON


@pytest.mark.slow
@pytest.mark.vllm
def test_default_policy_loads_in_vllm_and_matches_hf_greedy(default_policy):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tok = AutoTokenizer.from_pretrained(default_policy)
    maker = toy_pretrain.ExampleMaker(tok, load_templates(toy_task.TEMPLATE_DIR))
    rows = toy_task.generate_rows(4, seed=5, steps=(1, 2, 3))
    prompts = [maker.answer_prompt(r) for r in rows]
    hf = AutoModelForCausalLM.from_pretrained(default_policy, dtype=torch.float32).eval()
    want = toy_pretrain.sample_texts(hf, tok, prompts, max_new_tokens=40, temperature=0)
    llm = LLM(model=str(default_policy), dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=40))
    got = [o.outputs[0].text for o in outs]
    assert got == want
