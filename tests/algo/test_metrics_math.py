"""Per-step group metrics and the never-solved tracker, against hand-counted values."""
from __future__ import annotations

import json

import pytest

from sage_megatron.algo.metrics_math import SolvedTracker, step_group_metrics
from sage_megatron.types import PromptGroup, Sample


def _group(uid, rewards, lengths, *, hint_level=0, cut=()):
    samples = [Sample(uid=uid, prompt_ids=(1,), response_ids=[0] * n, logprobs=[0.0] * n,
                      finish_reason="length" if i in cut else "stop", weight_version=0, sample_index=i)
               for i, n in enumerate(lengths)]
    return PromptGroup(uid=uid, row_index=0, prompt_ids=(1,), samples=samples, rewards=rewards, hint_level=hint_level)


def test_step_group_metrics():
    groups = [_group("a", [1.0, 0.0], [2, 4]),                       # signal
              _group("b", [0.0, 0.0], [6, 8], hint_level=2, cut=(1,)),  # all wrong: zero advantage
              _group("c", [1.0, 1.0], [10, 10])]                     # all right: zero advantage
    m = step_group_metrics(groups)
    assert m["groups/zero_adv_share"] == 2 / 3
    assert m["groups/prompt_usage"] == pytest.approx(1 / 3)
    assert m["groups/hinted_share"] == 1 / 3
    assert m["acc/trained"] == 3 / 6
    # lengths 2, 4, 6, 8, 10, 10: mean 40 / 6; one of six cut at the limit
    assert m["response_len/mean"] == 40 / 6
    assert (m["response_len/max"], m["response_len/min"], m["response_len/clip_share"]) == (10.0, 2.0, 1 / 6)
    assert step_group_metrics([])["groups/zero_adv_share"] == 0.0


def test_solved_tracker():
    t = SolvedTracker()
    t.update(seen=[0, 1, 2, 3], solved=[1])
    assert t.never_solved_share() == 3 / 4
    t.update(seen=[0, 4], solved=[0])          # seen {0..4}, solved {0, 1} -> 3 of 5 never solved
    assert t.metrics() == {"prompts/seen": 5.0, "prompts/never_solved_share": 3 / 5}
    u = SolvedTracker()
    u.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert (u.seen, u.solved) == ({0, 1, 2, 3, 4}, {0, 1})


def test_mean_ci95_by_hand():
    from sage_megatron.algo.metrics_math import mean_ci95

    # scores 0, 0.5, 1, 0.5: mean 0.5, sample variance (0.25 + 0 + 0.25 + 0) / 3 = 1/6
    mean, half = mean_ci95([0.0, 0.5, 1.0, 0.5])
    assert mean == 0.5 and half == pytest.approx(1.96 * (1 / 6 / 4) ** 0.5)
    assert mean_ci95([]) == (0.0, 0.0) and mean_ci95([0.25]) == (0.25, 0.0)
    assert mean_ci95([1.0] * 9)[1] == 0.0                        # no spread, no interval


def test_heldout_summary_splits_the_hard_band():
    from sage_megatron.algo.metrics_math import heldout_summary

    per_prompt = [(1.0, 1), (0.75, 2), (0.25, 6), (0.0, 7), (0.5, None)]
    s = heldout_summary(per_prompt, hard_min_difficulty=6)
    assert s["accuracy"] == pytest.approx(2.5 / 5) and s["prompts"] == 5
    assert s["hard_accuracy"] == pytest.approx(0.125) and s["hard_prompts"] == 2
    # hard band 0.25, 0.0: sample variance 0.03125, half-width 1.96 * sqrt(0.03125 / 2)
    assert s["hard_accuracy_ci95"] == pytest.approx(1.96 * (0.03125 / 2) ** 0.5)
    assert "hard_accuracy" not in heldout_summary([(1.0, None)], hard_min_difficulty=6)


def test_paired_gain_is_the_mean_of_per_prompt_differences():
    from sage_megatron.algo.metrics_math import paired_gain

    # rows [index, difficulty, score], end listed in another order: matched by index
    start = [[0, 1, 0.5], [1, 6, 0.0], [2, 7, 0.25], [3, None, 1.0]]
    end = [[3, None, 1.0], [2, 7, 0.75], [0, 1, 0.75], [1, 6, 0.25]]
    g = paired_gain(start, end, hard_min_difficulty=6)
    # differences 0.25, 0.25, 0.5, 0.0: mean 0.25, sample variance (0 + 0 + 0.0625 + 0.0625) / 3
    assert g["gain"] == pytest.approx(0.25) and g["gain_ci95"] == pytest.approx(1.96 * (0.125 / 3 / 4) ** 0.5)
    # hard band (difficulty >= 6): differences 0.25, 0.5
    assert g["hard_gain"] == pytest.approx(0.375) and g["hard_gain_ci95"] == pytest.approx(1.96 * (0.03125 / 2) ** 0.5)
    # the same shift on every prompt: no interval, however different the prompts' accuracies
    shifted = [[i, d, a + 0.125] for i, d, a in start]
    assert paired_gain(start, shifted, hard_min_difficulty=6)["gain_ci95"] == 0.0
    with pytest.raises(ValueError, match="different prompts"):
        paired_gain(start, end[:3], hard_min_difficulty=6)


def test_logprob_gap_only_on_response_tokens():
    import torch

    from sage_megatron.algo.metrics_math import logprob_gap

    engine = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, 9.0]])
    actor = torch.tensor([[0.0, -1.5, -2.0], [0.0, -0.25, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])               # the 9.0 is padding: not counted
    assert logprob_gap(engine, actor, mask) == {"logp_gap_mean": pytest.approx(0.25), "logp_gap_max": 0.5}
