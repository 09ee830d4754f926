"""MegatronActor (sage_megatron/actor/worker.py) on real gloo ranks, each check against an independent reference.

    .venv/bin/python -m pytest tests/actor/test_actor.py -q        # ~2 min on 2 cores

One launch per layout (tp, pp, dp) in (1,1,1), (2,1,1), (1,2,1), (1,1,2) runs the same script on a
batch built with ``batch_from_groups``: log-probs of a tiny tied-embedding Llama and a tiny Qwen2,
then two PPO steps with KL (reference actor) and entropy terms on the Llama, then log-probs and
weights after the steps. The tests compare:
  (a) log-probs at every layout with HF transformers' log_softmax at the next tokens (<= 1e-4 fp32);
  (b)/(c) losses, grad norms and updated weights of (2,1,1), (1,2,1) and (1,1,2) with (1,1,1);
  (d) step 1 (old_logp == current logp, ratio 1): pg_loss == -sum_i A_i n_i / sum_i n_i, computed here
      from the groups, not from the TrainBatch.
The test optimiser uses adam_eps=1 (Adam's first step is then ~ lr * g instead of lr * sign(g)) and a
grad clip that does not bind, so a gradient scaled wrongly (micro-batching, DP) changes the weights.
"""
from __future__ import annotations

import dataclasses
import math
import io

import pytest
import torch

from sage_megatron.actor.batch import (TrainBatch, batch_from_groups, move_response_values, padded_tokens,
                                       plan_micro_batches, row_lengths, rows_response_mask)
from sage_megatron.actor.logprobs import align_to_tokens, next_token_targets
from sage_megatron.parallel.layout import ParallelLayout
from sage_megatron.types import PromptGroup, Sample

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]
TRAIN = dict(lr=0.5, adam_eps=1.0, grad_clip=1e3, micro_batch_size=2, kl_coef=0.1, entropy_coef=0.01)
PAD_ID = 0
TRAIN_CLIP = (0.2, 0.28, 3.0)   # ActorConfig defaults: clip_low, clip_high, dual clip c


# ---- the batch (pure) -------------------------------------------------------------------------------

def make_groups(*, vocab_size: int, seed: int = 0) -> tuple[list[PromptGroup], dict[str, list[float]]]:
    """Two prompt groups (3 samples each) of different prompt/response lengths; a hinted group's samples
    carry a longer prompt than the other's."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(5, vocab_size, (n,), generator=gen).tolist()

    groups, adv = [], {}
    for g, (plen, rlens, a) in enumerate([(5, [7, 3, 10], [1.2, -0.3, -0.9]), (9, [4, 8, 6], [0.5, 0.7, -1.2])]):
        prompt = tuple(ids(plen))
        samples = [Sample(uid=f"g{g}", prompt_ids=prompt, response_ids=ids(n), logprobs=[-1.0] * n,
                          finish_reason="stop", weight_version=0, sample_index=j) for j, n in enumerate(rlens)]
        groups.append(PromptGroup(uid=f"g{g}", row_index=g, prompt_ids=prompt, samples=samples))
        adv[f"g{g}"] = a
    return groups, adv


def test_batch_from_groups_alignment():
    groups, adv = make_groups(vocab_size=50)
    b = batch_from_groups(groups, adv, pad_id=PAD_ID, max_len=64)
    assert b.tokens.shape == (6, 9 + 8) and b.uids == ["g0"] * 3 + ["g1"] * 3
    s = groups[1].samples[1]                                  # prompt 9, response 8: fills every column
    p, n = len(s.prompt_ids), len(s.response_ids)
    assert b.tokens[4].tolist() == list(s.prompt_ids) + s.response_ids
    assert b.response_mask[4].tolist() == [0.0] * p + [1.0] * n
    s0 = groups[0].samples[1]                                 # prompt 5, response 3, then 9 pads
    assert b.tokens[1].tolist() == list(s0.prompt_ids) + s0.response_ids + [PAD_ID] * 9
    assert b.response_mask[1, 5:8].tolist() == [1.0] * 3 and b.response_mask[1].sum() == 3
    # old_logp: sampling log-probs at the response columns, 0 elsewhere
    assert b.old_logp[1, 5:8].tolist() == [-1.0] * 3 and b.old_logp[1].abs().sum() == 3
    assert b.advantages.tolist() == pytest.approx([1.2, -0.3, -0.9, 0.5, 0.7, -1.2])
    assert b.num_tokens == 7 + 3 + 10 + 4 + 8 + 6
    b.validate(vocab_size=50)


def test_batch_from_groups_errors():
    groups, adv = make_groups(vocab_size=50)
    with pytest.raises(ValueError, match="max_len 10"):
        batch_from_groups(groups, adv, pad_id=PAD_ID, max_len=10)
    with pytest.raises(ValueError, match="no advantages for group uid 'g1'"):
        batch_from_groups(groups, {"g0": adv["g0"]}, pad_id=PAD_ID, max_len=64)
    b = batch_from_groups(groups, adv, pad_id=PAD_ID, max_len=64)
    with pytest.raises(ValueError, match=">= vocabulary size 20"):
        b.validate(vocab_size=20)
    bad = dataclasses.replace(b, response_mask=torch.ones_like(b.response_mask))
    with pytest.raises(ValueError, match=r"response_mask\[:, 0\] must be 0"):
        bad.validate()


def with_original_context(groups: list[PromptGroup]) -> list[PromptGroup]:
    """Group g1 as a hinted group (its 9-token prompt = hinted) whose original prompt is 4 other tokens."""
    return [groups[0], dataclasses.replace(groups[1], hint_level=2, unhinted_prompt_ids=(7, 8, 9, 10))]


def test_batch_from_groups_original_loss_context():
    groups, adv = make_groups(vocab_size=50)
    hinted = batch_from_groups(groups, adv, pad_id=PAD_ID, max_len=64)
    assert hinted.behavior is None
    assert batch_from_groups(groups, adv, pad_id=PAD_ID, max_len=64, loss_context="original").behavior is None
    b = batch_from_groups(with_original_context(groups), adv, pad_id=PAD_ID, max_len=64, loss_context="original")
    assert torch.equal(b.behavior.tokens, hinted.tokens)            # sampled rows kept for pi_old
    s = groups[1].samples[1]                                        # original prompt 4 + response 8
    assert b.tokens[4].tolist() == [7, 8, 9, 10] + s.response_ids + [PAD_ID] * 3
    assert b.tokens.shape == (6, 5 + 10)                            # now g0's row (5 + 10) is the longest
    assert b.response_mask[4].tolist() == [0.0] * 4 + [1.0] * 8 + [0.0] * 3
    assert b.tokens[2].tolist() == list(groups[0].samples[2].prompt_ids) + groups[0].samples[2].response_ids
    assert b.old_logp[4, 4:12].tolist() == [-1.0] * 8 and b.advantages.tolist() == hinted.advantages.tolist()
    with pytest.raises(ValueError, match="loss_context must be"):
        batch_from_groups(groups, adv, pad_id=PAD_ID, max_len=64, loss_context="unhinted")


def test_move_response_values():
    src = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]])
    dst = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    vals = torch.tensor([[9.0, 9.0, 1.0, 2.0, 9.0], [9.0, 3.0, 4.0, 5.0, 9.0]])
    assert move_response_values(vals, src, dst).tolist() == [[0, 1, 2, 0, 0], [0, 0, 3, 4, 5]]
    with pytest.raises(ValueError, match="same number of tokens in every row"):
        move_response_values(vals, src, torch.tensor([[0, 1, 0, 0, 0], [0, 0, 1, 1, 1]]))


def test_alignment_helpers():
    tokens = torch.tensor([[3, 4, 5, 6]])
    assert next_token_targets(tokens).tolist() == [[4, 5, 6, 6]]
    assert align_to_tokens(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).tolist() == [[0.0, 1.0, 2.0, 3.0]]


def test_row_lengths_end_at_the_last_response_token():
    groups, adv = make_groups(vocab_size=50)
    b = batch_from_groups(groups, adv, pad_id=PAD_ID, max_len=64)
    # prompt + response of each sample, as built in make_groups (prompts 5 and 9)
    assert row_lengths(b.response_mask) == [5 + 7, 5 + 3, 5 + 10, 9 + 4, 9 + 8, 9 + 6]
    no_response = torch.zeros(2, 7)
    assert row_lengths(no_response) == [7, 7]                 # log-probs of a raw token tensor: every column
    assert row_lengths(torch.zeros(0, 7)) == []


def test_plan_micro_batches_groups_by_length_within_the_budgets():
    lengths = [12, 8, 15, 13, 17, 15]
    # one rank, 2 rows per micro-batch: longest first (ties in batch order)
    assert plan_micro_batches(lengths, dp=1, max_rows=2) == [[[4, 2], [5, 3], [0, 1]]]
    assert padded_tokens(plan_micro_batches(lengths, dp=1, max_rows=2), lengths) == 2 * 17 + 2 * 15 + 2 * 12
    # the unpacked layout: batch order, every micro-batch as wide as the batch's longest row
    unpacked = plan_micro_batches(lengths, dp=1, max_rows=2, group_by_length=False)
    assert unpacked == [[[0, 1], [2, 3], [4, 5]]]
    assert padded_tokens(unpacked, lengths, group_by_length=False) == 6 * 17
    # a token budget: rows x widest row <= 32; a row wider than the budget runs alone
    assert plan_micro_batches(lengths, dp=1, max_rows=8, max_tokens=32) == [[[4], [2, 5], [3, 0], [1]]]
    assert plan_micro_batches([40, 3, 3], dp=1, max_rows=8, max_tokens=32) == [[[0], [1, 2]]]
    # two DP ranks: longest first, each row to the rank with fewer tokens so far (4: 17|0, 2: 17|15,
    # 5: 17|30, 3: 30|30, 0: 42|30, 1: 42|38)
    plan = plan_micro_batches(lengths, dp=2, max_rows=8)
    assert plan == [[[4, 3, 0]], [[2, 5, 1]]]
    assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(6))
    # more ranks than rows: the last rank gets none (the actor runs one padding row there)
    assert plan_micro_batches([5, 4], dp=3, max_rows=1) == [[[0]], [[1]], []]
    with pytest.raises(ValueError, match="max_rows >= 1"):
        plan_micro_batches(lengths, dp=1, max_rows=0)


def test_rows_response_mask_keeps_only_the_rows_given():
    groups, adv = make_groups(vocab_size=50)
    b = batch_from_groups(groups, adv, pad_id=PAD_ID, max_len=64)
    assert rows_response_mask(b, None) is b.response_mask
    kept = rows_response_mask(b, torch.tensor([1, 3]))
    for row in range(b.tokens.shape[0]):
        expected = b.response_mask[row] if row in (1, 3) else torch.zeros_like(b.response_mask[row])
        assert torch.equal(kept[row], expected), row
    assert b.response_mask[0].sum() > 0                 # the input is not changed


def test_cuda_to_cpu_mode_answers_cuda_tensor_types():
    """The device.py shim behind megatron's clip_grads / Float16Optimizer type asserts."""
    from sage_megatron.parallel.device import CudaToCpuMode

    with CudaToCpuMode():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.zeros(1).type(torch.float64).dtype == torch.float64     # conversions untouched
    assert torch.zeros(1).type() == "torch.FloatTensor"


# ---- the distributed runs ---------------------------------------------------------------------------

def _world(*args) -> bytes:
    """One rank's results as torch.save bytes: tensors returned through run_distributed's queue travel
    as shared-memory file descriptors, which race with the rank's exit (ConnectionResetError)."""
    import io

    buf = io.BytesIO()
    torch.save(_rank_results(*args), buf)
    return buf.getvalue()


def _rank_results(llama_ckpt: str, qwen_ckpt: str, layout: ParallelLayout, batch: TrainBatch,
                  qwen_tokens: torch.Tensor, old_logp_step2: torch.Tensor, original: TrainBatch) -> dict:
    """One rank of a layout: log-probs, two PPO steps (KL + entropy), log-probs and weights after."""
    from megatron.core import parallel_state as ps

    from sage_megatron.actor.worker import ActorConfig, MegatronActor, build_reference
    from sage_megatron.parallel.distributed import init_parallel

    init_parallel(layout)
    cfg = ActorConfig(ckpt_dir=llama_ckpt, layout=layout, **TRAIN)
    actor, ref = MegatronActor(cfg), build_reference(cfg)
    out: dict = {"qwen_logp": MegatronActor(dataclasses.replace(cfg, ckpt_dir=qwen_ckpt), trainable=False)
                 .compute_logprobs(qwen_tokens)}
    out["logp0"] = actor.compute_logprobs(batch)
    out["original_old"] = actor.old_logprobs(original)            # loss context "original", initial weights
    ref_logp = ref.compute_logprobs(batch)
    out["step1"] = actor.train_step(dataclasses.replace(batch, old_logp=out["logp0"], ref_logp=ref_logp))
    out["logp1"] = actor.compute_logprobs(batch)
    out["step2"] = actor.train_step(dataclasses.replace(batch, old_logp=old_logp_step2, ref_logp=ref_logp))
    out["logp2"] = actor.compute_logprobs(batch)
    weights = {k: v.clone() for k, v in actor.global_tensors()}       # collective over TP
    keep = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    out["weights"] = weights if keep else {}
    if layout == ParallelLayout(1, 1, 1):
        # micro-batch invariance in-process: the whole batch as ONE micro-batch from the same start
        one = MegatronActor(dataclasses.replace(cfg, micro_batch_size=len(batch.tokens)))
        out["one_mb_step1"] = one.train_step(dataclasses.replace(batch, old_logp=out["logp0"], ref_logp=ref_logp))
        fresh = MegatronActor(dataclasses.replace(cfg, kl_coef=0.0, entropy_coef=0.0))
        out["original_step1"] = fresh.train_step(dataclasses.replace(original, old_logp=out["original_old"]))
        # the only update of a batch: pi_old from the update's own pass (no extra forward), same step
        on_policy = MegatronActor(cfg)
        out["skip_old"] = (on_policy.old_logprobs(batch, only_update=True),
                           on_policy.old_logprobs(original, only_update=True))
        out["on_policy_step1"] = on_policy.train_step(dataclasses.replace(batch, old_logp=None, ref_logp=ref_logp))
    return out


def _hf_logprobs(hf_dir, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF transformers' log_softmax(logits[:, t-1])[tokens[:, t]] (column 0 = 0); the same with the
    checkpoint's zero padding rows (up to 128) NOT masked, to show the masking matters; and the
    entropy of the distribution that predicted column t (column 0 = 0)."""
    from transformers import AutoModelForCausalLM

    from sage_megatron.algo.losses import entropy_from_logits

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits.float()[:, :-1]                                     # (B, T-1, V)
    target = tokens[:, 1:, None]
    lp = torch.log_softmax(logits, -1).gather(-1, target).squeeze(-1)
    padded = torch.cat([logits, logits.new_zeros(*logits.shape[:2], 128 - logits.shape[-1])], dim=-1)
    lp_unmasked = torch.log_softmax(padded, -1).gather(-1, target).squeeze(-1)
    zero = torch.zeros(tokens.shape[0], 1)
    entropy = entropy_from_logits(logits)                                                # (B, T-1)
    return torch.cat([zero, lp], 1), torch.cat([zero, lp_unmasked], 1), torch.cat([zero, entropy], 1)


@pytest.fixture(scope="module")
def runs(tiny_hf_factory, tmp_path_factory):
    from sage_megatron.parallel.convert import hf_to_megatron, read_meta
    from sage_megatron.parallel.launch import run_distributed

    root = tmp_path_factory.mktemp("actor")
    llama_hf = tiny_hf_factory("llama", tie_word_embeddings=True)
    qwen_hf = tiny_hf_factory("qwen2")
    hf_to_megatron(llama_hf, root / "llama")
    hf_to_megatron(qwen_hf, root / "qwen2")
    vocab = read_meta(root / "llama").arch.vocab_size
    groups, adv = make_groups(vocab_size=vocab)
    batch = batch_from_groups(groups, adv, pad_id=PAD_ID, max_len=64)
    original = batch_from_groups(with_original_context(groups), adv, pad_id=PAD_ID, max_len=64, loss_context="original")
    qwen_tokens = torch.randint(0, vocab, (3, 20), generator=torch.Generator().manual_seed(1))
    hf_llama, hf_llama_unmasked, hf_entropy = _hf_logprobs(llama_hf, batch.tokens)
    hf_qwen, _, _ = _hf_logprobs(qwen_hf, qwen_tokens)
    # step 2's behaviour log-probs: HF's plus noise, so ratios leave the clip range
    noise = 0.4 * torch.randn(batch.tokens.shape, generator=torch.Generator().manual_seed(2))
    old2 = (hf_llama + noise) * batch.response_mask
    results = {}
    for tp, pp, dp in LAYOUTS:
        layout = ParallelLayout(tp, pp, dp)
        blobs = run_distributed(_world, world_size=layout.world_size,
                                args=(str(root / "llama"), str(root / "qwen2"), layout, batch, qwen_tokens, old2,
                                      original))
        results[(tp, pp, dp)] = [torch.load(io.BytesIO(b), weights_only=False) for b in blobs]
    mask = batch.response_mask
    hf_original, _, _ = _hf_logprobs(llama_hf, original.tokens)
    return dict(results=results, groups=groups, adv=adv, batch=batch, hf_llama=hf_llama, old2=old2,
                original=original, hf_original=hf_original,
                hf_llama_unmasked=hf_llama_unmasked, hf_qwen=hf_qwen,
                hf_entropy_token_mean=((hf_entropy * mask).sum() / mask.sum()).item())


def _row_columns(batch: TrainBatch) -> torch.Tensor:
    """(B, T) bool: the columns of each row up to its last response token (prompt + response)."""
    columns = torch.arange(batch.tokens.shape[1])
    return columns[None, :] < torch.tensor(row_lengths(batch.response_mask))[:, None]


def _merged_weights(ranks: list[dict]) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for r in ranks:
        merged.update(r["weights"])
    return merged


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "tp{}pp{}dp{}".format(*l))
def test_a_logprobs_equal_hf_on_every_rank(runs, layout):
    ranks = runs["results"][layout]
    inside = _row_columns(runs["batch"])
    for r in ranks:                                     # available on every rank, identical
        assert (r["logp0"] - runs["hf_llama"])[inside].abs().max().item() <= 1e-4
        assert r["logp0"][~inside].abs().max().item() == 0.0      # after a row's last response token: 0
        assert (r["qwen_logp"] - runs["hf_qwen"]).abs().max().item() <= 1e-4
        assert torch.equal(r["logp0"], ranks[0]["logp0"]) and torch.equal(r["logp2"], ranks[0]["logp2"])
    # step 1's entropy metric (before any update) is HF's token-mean entropy over the response tokens
    assert ranks[0]["step1"]["entropy"] == pytest.approx(runs["hf_entropy_token_mean"], abs=1e-5)
    # the padded vocabulary rows (101 real ids of 128) would shift every log-prob if left in
    assert (runs["hf_llama_unmasked"] - runs["hf_llama"]).abs().max().item() > 1e-2


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [l for l in LAYOUTS if l != (1, 1, 1)], ids=lambda l: "tp{}pp{}dp{}".format(*l))
def test_b_c_train_steps_match_single_rank(runs, layout):
    """(2,1,1), (1,2,1) [tied embeddings across stages] and (1,1,2) [dp] equal (1,1,1) after two steps."""
    base, other = runs["results"][(1, 1, 1)], runs["results"][layout]
    for step in ("step1", "step2"):
        for r in other:                                 # every rank reports the same metrics
            for key in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "tokens"):
                assert r[step][key] == pytest.approx(base[0][step][key], abs=2e-6), (step, key)
            assert r[step]["grad_norm"] == pytest.approx(base[0][step]["grad_norm"], rel=1e-5), step
    w_base, w = _merged_weights(base), _merged_weights(other)
    assert set(w_base) <= set(w)
    for name, t in w_base.items():
        assert (w[name] - t).abs().max().item() <= 1e-5, name
    if "output_layer.weight" in w:                      # pp > 1, tied: the last stage's copy stayed in sync
        assert (w["output_layer.weight"] - w["embedding.word_embeddings.weight"]).abs().max().item() <= 1e-6
    assert (other[0]["logp2"] - base[0]["logp2"]).abs().max().item() <= 1e-4


@pytest.mark.multiproc
def test_steps_change_the_model_and_exercise_every_term(runs):
    r = runs["results"][(1, 1, 1)][0]
    assert r["step2"]["clip_frac"] > 0.05          # the noisy behaviour log-probs push ratios out of range
    # ...and no step-2 ratio sits within 1e-4 of a clip edge, where the layouts' ~1e-6 differences could
    # flip a token between clipped and unclipped (the layout comparison would then be ill-posed)
    mask = runs["batch"].response_mask.bool()
    ratio = torch.exp(r["logp1"] - runs["old2"])[mask]
    edges = torch.tensor([1 - TRAIN_CLIP[0], 1 + TRAIN_CLIP[1], TRAIN_CLIP[2]])
    assert (ratio[:, None] - edges).abs().min().item() > 1e-4
    assert r["step2"]["kl"] > 1e-4                 # step 1 moved the policy away from the reference
    assert r["step1"]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert r["step2"]["lr"] == TRAIN["lr"] and r["step2"]["update_ok"] == 1.0
    assert (r["logp2"] - r["logp0"]).abs().max().item() > 1e-2
    # the whole batch as one micro-batch gives the same step as three micro-batches of 2
    assert r["one_mb_step1"]["loss"] == pytest.approx(r["step1"]["loss"], abs=1e-6)
    assert r["one_mb_step1"]["grad_norm"] == pytest.approx(r["step1"]["grad_norm"], rel=1e-5)


@pytest.mark.multiproc
def test_d_first_step_loss_is_minus_token_mean_advantage(runs):
    """Ratio 1 on step 1: per token l = -A, so the token-mean loss is -sum_i A_i n_i / sum_i n_i."""
    groups, adv = runs["groups"], runs["adv"]
    lengths = [len(s.response_ids) for g in groups for s in g.samples]
    advs = [a for g in groups for a in adv[g.uid]]
    expected = -sum(a * n for a, n in zip(advs, lengths)) / sum(lengths)
    assert expected == pytest.approx(-(1.2 * 7 - 0.3 * 3 - 0.9 * 10 + 0.5 * 4 + 0.7 * 8 - 1.2 * 6) / 38)
    for layout in LAYOUTS:
        m = runs["results"][layout][0]["step1"]
        assert m["pg_loss"] == pytest.approx(expected, abs=1e-6), layout
        assert m["clip_frac"] == 0.0 and m["tokens"] == sum(lengths)
        assert m["loss"] == pytest.approx(m["pg_loss"] - TRAIN["entropy_coef"] * m["entropy"]
                                          + TRAIN["kl_coef"] * m["kl"], abs=1e-6)


@pytest.mark.multiproc
def test_original_loss_context_importance_ratio_against_hf(runs):
    """Loss context "original": pi_old on the HINTED rows, moved to the original rows' columns; the first
    step's ratio is pi(y | x) / pi_old(y | x, hint) and its loss the clipped surrogate of that ratio,
    all recomputed here from HF transformers' log-probs on both contexts."""
    r = runs["results"][(1, 1, 1)][0]
    original, behavior = runs["original"], runs["original"].behavior
    mask, bmask = original.response_mask, behavior.response_mask
    hf_old = move_response_values(runs["hf_llama"] * bmask, bmask, mask)      # HF on the sampled (hinted) rows
    assert (r["original_old"] - hf_old).abs().max().item() <= 1e-4
    assert not torch.allclose(hf_old[3:], (runs["hf_original"] * mask)[3:], atol=1e-2)  # contexts differ
    ratio = torch.exp(runs["hf_original"] - hf_old) * mask
    m = mask.bool()
    assert ratio[:3][m[:3]].sub(1).abs().max().item() <= 1e-4                 # unhinted group g0: ratio 1
    step = r["original_step1"]
    assert step["ratio_mean"] == pytest.approx(ratio[m].mean().item(), rel=1e-4)
    low, high, c = TRAIN_CLIP
    adv = original.advantages[:, None].expand_as(ratio)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - low, 1 + high))
    per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * c), per_token)
    assert step["pg_loss"] == pytest.approx(per_token[m].mean().item(), abs=1e-5)


@pytest.mark.multiproc
def test_only_update_skips_the_old_logprob_pass_and_takes_the_same_step(runs):
    r = runs["results"][(1, 1, 1)][0]
    skipped, original = r["skip_old"]
    assert skipped is None                                      # no forward pass for pi_old
    assert torch.allclose(original, r["original_old"])          # "original" context still needs one
    a, b = r["on_policy_step1"], r["step1"]                     # step1 used the recomputed log-probs
    for key in ("loss", "pg_loss", "kl", "entropy"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert a["clip_frac"] == 0.0 and a["ratio_mean"] == pytest.approx(1.0, abs=1e-7)


# ---- packed micro-batches and skipped rows against the unpacked, unskipped step -----------------------

# name -> ActorConfig fields. "unpacked": batch order, 2 rows per micro-batch, each as wide as the batch's
# longest row, every row run (the layout before packing). "packed": rows grouped by length under a
# 32-token budget (micro-batches of 1 and 2 rows, 8 to 17 columns wide); "packed_skip": the same with
# the zero-advantage rows skipped.
PACKING = {"unpacked": dict(micro_batch_size=2, group_by_length=False, skip_zero_advantage_rows=False),
           "packed": dict(micro_batch_size=8, max_tokens_per_micro_batch=32, skip_zero_advantage_rows=False),
           "packed_skip": dict(micro_batch_size=8, max_tokens_per_micro_batch=32, skip_zero_advantage_rows=True)}


def _packing_world(ckpt: str, layout: ParallelLayout, batch: TrainBatch) -> bytes:
    """One step from the same start under each PACKING setting, then one on an all-zero-advantage batch."""
    import io

    from megatron.core import parallel_state as ps

    from sage_megatron.actor.worker import ActorConfig, MegatronActor
    from sage_megatron.parallel.distributed import init_parallel

    init_parallel(layout)
    out = {}
    for name, fields in PACKING.items():
        cfg = ActorConfig(ckpt_dir=ckpt, layout=layout, **(TRAIN | dict(kl_coef=0.0, entropy_coef=0.0) | fields))
        actor = MegatronActor(cfg)
        old_logp = actor.old_logprobs(batch)          # the pi_old pass, before the weights move
        metrics = actor.train_step(batch)
        # then a batch whose every advantage is 0: nothing runs when skipping, the optimizer still steps
        all_zero = actor.train_step(dataclasses.replace(batch, advantages=torch.zeros_like(batch.advantages)))
        weights = {k: v.clone() for k, v in actor.global_tensors()}
        keep = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        out[name] = (metrics, weights if keep else {}, all_zero, old_logp)
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


@pytest.mark.multiproc
def test_packed_and_skipped_steps_equal_the_unpacked_unskipped_step(tiny_hf_factory, tmp_path):
    """Micro-batches grouped by length under a token budget, and rows whose gradient is exactly 0 (advantage
    0 with KL and entropy off) not run, in the update and in the pi_old pass: the step (loss, gradient
    norm, weights after one AdamW step, then one more on an all-zero batch) equal the (1,1,1) unpacked,
    unskipped step's within 1e-6 at tp=1, tp=2, pp=2, dp=2, and pi_old on the rows run within 5e-6."""
    from sage_megatron.parallel.convert import hf_to_megatron, read_meta
    from sage_megatron.parallel.launch import run_distributed

    hf_to_megatron(tiny_hf_factory("llama"), tmp_path / "ckpt")
    groups, adv = make_groups(vocab_size=read_meta(tmp_path / "ckpt").arch.vocab_size)
    zeroed = {uid: ([0.0] * len(a) if k % 2 == 0 else a) for k, (uid, a) in enumerate(adv.items())}
    batch = batch_from_groups(groups, zeroed, pad_id=PAD_ID, max_len=64)
    batch = dataclasses.replace(batch, old_logp=None)
    zero_rows = int((batch.advantages == 0).sum())
    assert 0 < zero_rows < len(batch.advantages)
    results = {}
    for layout in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]:
        blobs = run_distributed(_packing_world, world_size=math.prod(layout),
                                args=(str(tmp_path / "ckpt"), ParallelLayout(*layout), batch))
        results[layout] = [torch.load(io.BytesIO(b), weights_only=False) for b in blobs]
    reference = results[(1, 1, 1)]
    ref_metrics, ref_zero, ref_old = reference[0]["unpacked"][0], reference[0]["unpacked"][2], \
        reference[0]["unpacked"][3]
    ref_weights = {k: v for r in reference for k, v in r["unpacked"][1].items()}
    # the unpacked step computes every row at the batch's longest length; packing computes far fewer
    assert ref_metrics["padded_tokens_run"] == 6 * batch.tokens.shape[1]
    assert row_lengths(batch.response_mask) == [12, 8, 15, 13, 17, 15]
    # 32-token budget, longest first: [17] [15 15] [13 12->13] [8]
    assert reference[0]["packed"][0]["padded_tokens_run"] == 17 + 2 * 15 + 2 * 13 + 8
    trained = batch.advantages != 0
    for layout, ranks in results.items():
        for name in ("packed", "packed_skip"):
            metrics, _, all_zero, old_logp = ranks[0][name]
            assert metrics["rows_skipped"] == (zero_rows if name == "packed_skip" else 0), (layout, name)
            assert metrics["tokens"] == ref_metrics["tokens"]
            assert metrics["loss"] == pytest.approx(ref_metrics["loss"], abs=1e-6), (layout, name)
            assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-6), (layout, name)
            assert all_zero["loss"] == ref_zero["loss"] == 0.0
            weights = {k: v for r in ranks for k, v in r[name][1].items()}
            assert sorted(weights) == sorted(ref_weights) and weights
            moved = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
            assert moved <= 1e-6, (layout, name, moved)
            # pi_old: equal on the rows trained (log-probs of about -5: fp32 rounding differs at other matmul
            # shapes, ~1e-6), 0 on the skipped ones (never read)
            assert (old_logp[trained] - ref_old[trained]).abs().max().item() <= 5e-6, (layout, name)
        skipped, all_zero_skipped = ranks[0]["packed_skip"][0], ranks[0]["packed_skip"][2]
        assert skipped["tokens_run"] < ref_metrics["tokens_run"]
        assert all_zero_skipped["rows_skipped"] == len(batch.advantages) and all_zero_skipped["tokens_run"] == 0
        assert ranks[0]["packed_skip"][3][~trained].abs().max().item() == 0.0, layout
        assert ref_old[~trained].abs().sum() > 0 and ref_old[trained].abs().sum() > 0


def _entropy_rank():
    from sage_megatron.actor.logprobs import vocab_parallel_logprobs
    from sage_megatron.parallel.distributed import init_parallel

    init_parallel(ParallelLayout())
    logits = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0)).requires_grad_()
    targets = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(1))
    logp, ent = vocab_parallel_logprobs(logits, targets, vocab_size=10, with_entropy=True)
    logp_d, ent_d = vocab_parallel_logprobs(logits, targets, vocab_size=10, with_entropy="detached")
    log_softmax = torch.log_softmax(logits[..., :10].detach(), -1)
    reference = -(log_softmax.exp() * log_softmax).sum(-1)
    return (torch.equal(ent, ent_d), ent.requires_grad, ent_d.requires_grad, logp_d.requires_grad,
            (ent_d - reference).abs().max().item())


@pytest.mark.multiproc
def test_logging_entropy_comes_from_the_same_pass_without_a_graph():
    from sage_megatron.parallel.launch import run_distributed

    (same, graph, detached_graph, logp_graph, err) = run_distributed(_entropy_rank, world_size=1)[0]
    assert same and graph and not detached_graph and logp_graph
    assert err < 1e-6


def _bf16_world(ckpt: str, batch: TrainBatch) -> bytes:
    """The same checkpoint at float32 and at bfloat16: log-probs, one PPO step, the weights after it."""
    import io

    from sage_megatron.actor.worker import ActorConfig, MegatronActor
    from sage_megatron.parallel.distributed import init_parallel

    init_parallel(ParallelLayout())
    out = {}
    for dtype in ("float32", "bfloat16"):
        actor = MegatronActor(ActorConfig(ckpt_dir=ckpt, layout=ParallelLayout(), dtype=dtype,
                                          **(TRAIN | dict(kl_coef=0.0, entropy_coef=0.0))))
        logp = actor.compute_logprobs(batch)
        if dtype == "float32":
            out["start"] = {k: v.clone() for k, v in actor.global_tensors()}
        metrics = actor.train_step(batch)
        out[dtype] = (logp, metrics, {k: v.clone() for k, v in actor.global_tensors()})
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


@pytest.mark.multiproc
def test_bf16_actor_on_cpu_agrees_with_hf_and_steps_like_fp32(tiny_hf_factory, tmp_path):
    """model.dtype=bfloat16 on CPU (local spec, megatron's bf16 optimizer with fp32 main weights): log-probs
    within bf16 rounding of HF transformers' fp32 ones, and really computed in bf16 (further from HF than
    the fp32 actor); one step's gradient norm equal to the fp32 actor's (main gradients are fp32), its
    update in the same direction, and the weights after it within bf16 rounding of the fp32 actor's."""
    from sage_megatron.parallel.convert import hf_to_megatron, read_meta
    from sage_megatron.parallel.launch import run_distributed

    hf_dir = tiny_hf_factory("llama")
    hf_to_megatron(hf_dir, tmp_path / "ckpt")
    groups, adv = make_groups(vocab_size=read_meta(tmp_path / "ckpt").arch.vocab_size)
    batch = dataclasses.replace(batch_from_groups(groups, adv, pad_id=PAD_ID, max_len=64), old_logp=None)
    out = torch.load(io.BytesIO(run_distributed(_bf16_world, world_size=1, args=(str(tmp_path / "ckpt"), batch))[0]),
                     weights_only=False)
    hf, _, _ = _hf_logprobs(hf_dir, batch.tokens)
    scored = batch.response_mask.bool()
    start = out.pop("start")
    err = {d: (out[d][0] - hf)[scored].abs().max().item() for d in out}
    assert err["float32"] <= 1e-4
    assert 1e-3 < err["bfloat16"] <= 0.1, err            # bf16 (8 mantissa bits) on log-probs of about -5
    (_, m32, w32), (_, m16, w16) = out["float32"], out["bfloat16"]
    assert m16["tokens"] == m32["tokens"] and m16["loss"] == pytest.approx(m32["loss"], abs=1e-6)  # ratio 1: -mean A
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=1e-2)
    assert sorted(w16) == sorted(w32)
    for name in w32:
        assert w16[name].dtype == torch.bfloat16 and w32[name].dtype == torch.float32, name
        scale = w32[name].abs().max().item()
        # the same update (measured: cosine >= 0.94 on norm weights, whose steps are near bf16's spacing
        # at ~1.2, >= 0.996 on the matrices), and the weights within ~2 bf16 spacings (measured <= 0.0084 x)
        step32, step16 = (w32[name] - start[name]).flatten(), (w16[name].float() - start[name]).flatten()
        assert torch.nn.functional.cosine_similarity(step32, step16, dim=0).item() >= 0.9, name
        assert (w16[name].float() - w32[name]).abs().max().item() <= 2 ** -6 * scale, name


# ---- the learning-rate schedule and weight decay --------------------------------------------------------

SCHEDULE = dict(lr=0.1, min_lr=0.01, lr_warmup_steps=2, lr_decay_style="cosine", lr_decay_steps=6, weight_decay=0.5)


def _expected_lr(step: int) -> float:
    """Optimizer step ``step`` (0-based) of SCHEDULE, written out: linear warmup from 0 over 2 steps, cosine
    from 0.1 down to 0.01 at step 6, then 0.01."""
    if step <= 2:
        return 0.1 * step / 2
    if step >= 6:
        return 0.01
    return 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 4))


def _schedule_world(ckpt: str, batch: TrainBatch) -> bytes:
    """Eight optimizer steps on an all-zero-advantage batch (zero gradient: AdamW moves a weight only through
    its decoupled weight decay, w *= 1 - lr * wd), then a fresh actor resumed at step 4."""
    import io

    from sage_megatron.actor.worker import ActorConfig, MegatronActor
    from sage_megatron.parallel.distributed import init_parallel

    init_parallel(ParallelLayout())
    cfg = ActorConfig(ckpt_dir=ckpt, layout=ParallelLayout(),
                      **(TRAIN | dict(kl_coef=0.0, entropy_coef=0.0) | SCHEDULE))
    zero = dataclasses.replace(batch, advantages=torch.zeros_like(batch.advantages))
    actor = MegatronActor(cfg)
    start = {k: v.clone() for k, v in actor.global_tensors()}
    lrs = [actor.train_step(zero)["lr"] for _ in range(8)]
    after = {k: v.clone() for k, v in actor.global_tensors()}
    resumed = MegatronActor(cfg)
    resumed.steps = 4                                   # what checkpoint.load_rank_state restores
    buf = io.BytesIO()
    torch.save((start, lrs, after, resumed.train_step(zero)["lr"]), buf)
    return buf.getvalue()


@pytest.mark.multiproc
def test_lr_schedule_and_weight_decay_follow_the_written_out_formulas(tiny_hf_factory, tmp_path):
    """Warmup + cosine decay (megatron-core's OptimizerParamScheduler): each step's lr equals the formula,
    also after a resume; the decay multiplies every matrix by prod(1 - lr_k * wd) and leaves 1-D weights
    (norms) alone, as megatron's wd_mult intends (without the scheduler they were decayed too)."""
    from sage_megatron.parallel.convert import hf_to_megatron, read_meta
    from sage_megatron.parallel.launch import run_distributed

    hf_to_megatron(tiny_hf_factory("llama"), tmp_path / "ckpt")
    groups, adv = make_groups(vocab_size=read_meta(tmp_path / "ckpt").arch.vocab_size)
    batch = dataclasses.replace(batch_from_groups(groups, adv, pad_id=PAD_ID, max_len=64), old_logp=None)
    start, lrs, after, resumed_lr = torch.load(
        io.BytesIO(run_distributed(_schedule_world, world_size=1, args=(str(tmp_path / "ckpt"), batch))[0]),
        weights_only=False)
    expected = [_expected_lr(k) for k in range(8)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert resumed_lr == pytest.approx(expected[4], abs=1e-12)
    shrink = math.prod(1 - lr * SCHEDULE["weight_decay"] for lr in expected)
    matrices = [k for k, v in start.items() if v.dim() >= 2]
    norms = [k for k, v in start.items() if v.dim() == 1]
    assert matrices and norms
    for k in matrices:
        assert torch.allclose(after[k], start[k] * shrink, rtol=1e-5, atol=0), k
    for k in norms:
        assert torch.equal(after[k], start[k]), k
