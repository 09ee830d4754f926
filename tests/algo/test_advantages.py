"""GRPO advantages against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from sage_megatron.algo.advantages import (
    broadcast_to_tokens,
    group_advantages,
    grpo_advantages,
    grpo_advantages_ragged,
    is_zero_advantage,
    mask_truncated,
    overlong_penalty,
    step_advantages,
    zero_advantage_mask,
)
from sage_megatron.types import PromptGroup, Sample

EPS = 1e-6


def test_unbiased_default():
    # group [1,0,0,0]: mean 0.25; squared deviations 0.5625 + 3*0.0625 = 0.75;
    # unbiased var 0.75/3 = 0.25 -> std 0.5 -> A = 0.75/0.500001, -0.25/0.500001
    # group [1,1,0,0]: mean 0.5; squared deviations 4*0.25 = 1; var 1/3 -> std sqrt(1/3) -> A = +-0.5/(sqrt(1/3)+eps)
    r = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 0, 0]])
    a = grpo_advantages(r)
    s2 = math.sqrt(1 / 3) + EPS
    expected = torch.tensor([[0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001],
                             [0.5 / s2, 0.5 / s2, -0.5 / s2, -0.5 / s2]])
    torch.testing.assert_close(a, expected)
    assert a.shape == (2, 4) and a.dtype == torch.float32


def test_population_std():
    # [1,0,0,0]: population var 0.75/4 = 0.1875 -> std sqrt(3)/4 = 0.4330127
    # [1,1,0,0]: population var 1/4 -> std 0.5 -> A = +-0.5/0.500001
    r = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 0, 0]])
    a = grpo_advantages(r, std_mode="population")
    s1 = math.sqrt(3) / 4 + EPS
    expected = torch.tensor([[0.75 / s1, -0.25 / s1, -0.25 / s1, -0.25 / s1],
                             [0.5 / 0.500001, 0.5 / 0.500001, -0.5 / 0.500001, -0.5 / 0.500001]])
    torch.testing.assert_close(a, expected)


def test_no_std_division_keeps_the_reward_scale():
    # Dr. GRPO: A = R - mean. [1,0,0,0] -> [0.75, -0.25, ...]; a 0.2 length penalty on one of four failures
    # stays 0.15 / 0.05 (std-normalised it would be +-0.87 / 0.29, as large as a correct answer's weight).
    r = torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, -0.2]])
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.05, 0.05, 0.05, -0.15]])
    torch.testing.assert_close(grpo_advantages(r, std_mode="none"), expected)
    flat = grpo_advantages_ragged(r.flatten(), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), std_mode="none")
    torch.testing.assert_close(flat, expected.flatten())
    torch.testing.assert_close(grpo_advantages(torch.tensor([[0.7]]), std_mode="none"), torch.tensor([[0.7]]))


def test_equal_rewards_give_zero_and_single_sample_keeps_reward():
    assert torch.equal(grpo_advantages(torch.tensor([[1.0, 1, 1], [0.0, 0, 0]])), torch.zeros(2, 3))
    # G = 1: mean 0, std 1 (verl) -> A = R
    torch.testing.assert_close(grpo_advantages(torch.tensor([[0.7], [0.0]])), torch.tensor([[0.7], [0.0]]))


def test_bad_std_mode_is_rejected():
    with pytest.raises(ValueError, match="std_mode"):
        grpo_advantages(torch.zeros(1, 2), std_mode="biased")


def test_ragged_groups():
    # group 0 = [1,0]: mean 0.5, squared deviations 0.5, unbiased var 0.5/1 -> std sqrt(0.5)
    #   -> A = +-0.5/(0.7071068+eps)
    # group 1 = [1,0,0,0]: as above, 0.75/0.500001 and -0.25/0.500001
    # group 2 = [3]: single sample -> A = 3
    r = torch.tensor([1.0, 0, 1, 0, 0, 0, 3])
    idx = torch.tensor([0, 0, 1, 1, 1, 1, 2])
    s0 = math.sqrt(0.5) + EPS
    expected = torch.tensor([0.5 / s0, -0.5 / s0, 0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001,
                             -0.25 / 0.500001, 3.0])
    torch.testing.assert_close(grpo_advantages_ragged(r, idx), expected)
    # interleaved order changes nothing: groups are found by index, not position
    perm = torch.tensor([6, 2, 0, 5, 1, 4, 3])
    torch.testing.assert_close(grpo_advantages_ragged(r[perm], idx[perm]), expected[perm])


def test_group_advantages_keyed_by_uid():
    # "b" = [0,1]: mean 0.5, unbiased std sqrt(0.5) -> -0.5/(0.7071068+eps), +0.5/(...)
    groups = [PromptGroup(uid="b", row_index=1, prompt_ids=(1,), rewards=[0.0, 1.0]),
              PromptGroup(uid="a", row_index=0, prompt_ids=(1,), rewards=[1.0, 1.0, 1.0])]
    out = group_advantages(groups)
    s = math.sqrt(0.5) + EPS
    assert out["a"] == [0.0, 0.0, 0.0]
    assert out["b"] == pytest.approx([-0.5 / s, 0.5 / s], rel=1e-6)
    with pytest.raises(ValueError, match="duplicate"):
        group_advantages(groups + [groups[0]])


def _sample(finish_reason: str) -> Sample:
    return Sample(uid="s", prompt_ids=(1,), response_ids=[2], logprobs=[-0.1], finish_reason=finish_reason,
                  weight_version=0)


def test_mask_truncated_zeroes_only_responses_cut_at_max_tokens():
    # rewards [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3); the cut response (index 2) keeps its place in the
    # group statistics (the other wrong one is -1/3 / std, not the 2-sample value) but gets advantage 0.
    group = PromptGroup(uid="g", row_index=0, prompt_ids=(1,), rewards=[1.0, 0.0, 0.0],
                        samples=[_sample("stop"), _sample("stop"), _sample("length")])
    adv = group_advantages([group])
    s = math.sqrt(1 / 3) + EPS
    out = mask_truncated([group], adv)
    assert out["g"] == pytest.approx([(2 / 3) / s, (-1 / 3) / s, 0.0], rel=1e-6)
    assert adv["g"][2] == pytest.approx((-1 / 3) / s, rel=1e-6)        # the input is not changed
    with pytest.raises(ValueError, match="2 advantages for 3 samples"):
        mask_truncated([group], {"g": [0.0, 1.0]})
    # the trainer's call: the config decides
    from sage_megatron.config import AlgorithmConfig

    assert step_advantages([group], AlgorithmConfig(mask_truncated=True)) == out
    assert step_advantages([group], AlgorithmConfig()) == adv


def test_overlong_penalty_ramps_over_the_buffer_before_max_tokens():
    # DAPO's formula with L_max = 96, L_cache = 32: 0 up to 64 tokens, ((96 - 32) - len) / 32 after.
    assert [overlong_penalty(n, max_tokens=96, buffer=32) for n in (10, 64, 65, 80, 96)] == \
        [0.0, 0.0, -1 / 32, -0.5, -1.0]
    assert overlong_penalty(80, max_tokens=96, buffer=32, penalty=0.5) == -0.25
    assert overlong_penalty(96, max_tokens=96, buffer=0) == 0.0


def test_step_advantages_rank_long_failures_below_short_ones_and_keep_the_rewards():
    # All three answers wrong: without the penalty the group has no signal; with it, the 96-token (cut)
    # answer is below the 80-token one, which is below the short one. Rewards shaped: [0, -0.5, -1].
    from sage_megatron.config import AlgorithmConfig

    def sample(n, reason="stop"):
        return Sample(uid="s", prompt_ids=(1,), response_ids=[2] * n, logprobs=[-0.1] * n, finish_reason=reason,
                      weight_version=0)

    group = PromptGroup(uid="g", row_index=0, prompt_ids=(1,), rewards=[0.0, 0.0, 0.0],
                        samples=[sample(20), sample(80), sample(96, "length")])
    assert step_advantages([group], AlgorithmConfig(), max_tokens=96)["g"] == [0.0, 0.0, 0.0]
    shaped = torch.tensor([[0.0, -0.5, -1.0]])
    expected = ((shaped - shaped.mean()) / (shaped.std() + EPS))[0].tolist()
    out = step_advantages([group], AlgorithmConfig(overlong_buffer=32), max_tokens=96)["g"]
    assert out == pytest.approx(expected, rel=1e-6) and out[0] > out[1] > out[2]
    assert group.rewards == [0.0, 0.0, 0.0]                 # accuracy and hint triggers read these
    # with overlong filtering as well, the cut answer adds no gradient; the others keep their shaped values
    both = step_advantages([group], AlgorithmConfig(overlong_buffer=32, mask_truncated=True), max_tokens=96)["g"]
    assert both == pytest.approx(expected[:2] + [0.0], rel=1e-6)
    with pytest.raises(ValueError, match="needs max_tokens above it"):
        step_advantages([group], AlgorithmConfig(overlong_buffer=32))


def test_zero_advantage_detection_and_broadcast():
    r = torch.tensor([[1.0, 1, 1], [0.0, 1, 0], [0.0, 0, 0]])
    assert zero_advantage_mask(r).tolist() == [True, False, True]
    assert is_zero_advantage([0.0, 0.0]) and not is_zero_advantage([0.0, 1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
