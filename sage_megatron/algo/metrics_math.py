"""Per-step training metrics computed from the step's prompt groups (pure Python, no torch).

    step_group_metrics(groups)        zero-advantage share, prompt usage, accuracy, response lengths
    SolvedTracker                     never-solved share so far (a set of solved dataset indices)

Accuracy before hints, hints per level and their success, and parse failures come from the hinting
strategy (strategies.HintingOutput.metrics); entropy, clip fraction and grad norm from the update.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from sage_megatron.algo.advantages import is_zero_advantage
from sage_megatron.types import PromptGroup


def zero_advantage_share(groups: Sequence[PromptGroup]) -> float:
    """Share of groups whose rewards are all equal (every advantage 0: no learning signal)."""
    return sum(is_zero_advantage(g.rewards) for g in groups) / len(groups) if groups else 0.0


def prompt_usage(groups: Sequence[PromptGroup]) -> float:
    """Share of prompts whose group has a non-zero advantage (1 - zero_advantage_share)."""
    return 1.0 - zero_advantage_share(groups) if groups else 0.0


def accuracy(groups: Sequence[PromptGroup], *, correct_reward: float = 1.0) -> float:
    """Share of samples with reward >= ``correct_reward`` over all groups."""
    rewards = [r for g in groups for r in g.rewards]
    return sum(r >= correct_reward for r in rewards) / len(rewards) if rewards else 0.0


def response_length_stats(groups: Sequence[PromptGroup]) -> dict[str, float]:
    """Mean / max / min response length in tokens and the share cut at the length limit."""
    lengths = [len(s.response_ids) for g in groups for s in g.samples]
    if not lengths:
        return {"response_len/mean": 0.0, "response_len/max": 0.0, "response_len/min": 0.0,
                "response_len/clip_share": 0.0}
    clipped = sum(s.finish_reason == "length" for g in groups for s in g.samples)
    return {"response_len/mean": sum(lengths) / len(lengths), "response_len/max": float(max(lengths)),
            "response_len/min": float(min(lengths)), "response_len/clip_share": clipped / len(lengths)}


def step_group_metrics(groups: Sequence[PromptGroup], *, correct_reward: float = 1.0) -> dict[str, float]:
    """The group-level metrics of one step, on the groups as trained on (after hints)."""
    hinted = [g for g in groups if g.hint_level > 0]
    return {"groups/zero_adv_share": zero_advantage_share(groups),
            "groups/prompt_usage": prompt_usage(groups),
            "groups/hinted_share": len(hinted) / len(groups) if groups else 0.0,
            "acc/trained": accuracy(groups, correct_reward=correct_reward),
            **response_length_stats(groups)}


class SolvedTracker:
    """Which training prompts have ever had a correct rollout (hinted or not), for the never-solved share.

    The paper's "share of training prompts that never got a correct rollout" is, at the end of
    training, ``never_solved_share()`` over the prompts seen.
    """

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.solved: set[int] = set()

    def update(self, *, seen: Iterable[int], solved: Iterable[int]) -> None:
        """Adds this step's prompt indices and those among them with a correct rollout."""
        self.seen.update(seen)
        self.solved.update(solved)

    def never_solved_share(self) -> float:
        """Share of prompts seen so far that never had a correct rollout."""
        return len(self.seen - self.solved) / len(self.seen) if self.seen else 0.0

    def metrics(self) -> dict[str, float]:
        return {"prompts/seen": float(len(self.seen)), "prompts/never_solved_share": self.never_solved_share()}

    def state_dict(self) -> dict:
        return {"seen": sorted(self.seen), "solved": sorted(self.solved)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = {int(i) for i in state["seen"]}
        self.solved = {int(i) for i in state["solved"]}


def mean_ci95(scores: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% interval) of per-prompt scores: 1.96 * sample std / sqrt(n), the
    normal approximation over prompts (each prompt's score is its mean over k samples). (0, 0) when
    empty; the half-width is 0 for a single prompt."""
    n = len(scores)
    if n == 0:
        return 0.0, 0.0
    mean = sum(scores) / n
    if n == 1:
        return mean, 0.0
    var = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return mean, 1.96 * (var / n) ** 0.5


def heldout_summary(per_prompt: Sequence[tuple[float, int | None]], *, hard_min_difficulty: int) -> dict[str, float]:
    """Accuracy with its 95% half-width over every prompt and over the hard band (difficulty >=
    ``hard_min_difficulty``), from (per-prompt score, difficulty) pairs; hard keys only when labelled."""
    acc, ci = mean_ci95([s for s, _ in per_prompt])
    out = {"accuracy": acc, "accuracy_ci95": ci, "prompts": float(len(per_prompt))}
    hard = [s for s, d in per_prompt if d is not None and d >= hard_min_difficulty]
    if hard:
        out["hard_accuracy"], out["hard_accuracy_ci95"] = mean_ci95(hard)
        out["hard_prompts"] = float(len(hard))
    return out


def paired_gain(start: Sequence[Sequence], end: Sequence[Sequence], *, hard_min_difficulty: int) -> dict[str, float]:
    """Held-out gain end - start with its 95% interval over the per-prompt DIFFERENCES (the same prompts
    evaluated twice: each prompt's difficulty cancels, so this interval is the one that says whether
    training moved accuracy; the two accuracies' own intervals also hold the spread between prompts).
    ``start``/``end``: evaluations' ``per_prompt`` rows [index, difficulty, score]; prompts are matched
    by index and must be the same set. Keys gain, gain_ci95 and, with labelled difficulties,
    hard_gain, hard_gain_ci95."""
    before = {int(i): (d, a) for i, d, a in start}
    after = {int(i): a for i, _, a in end}
    if set(before) != set(after):
        raise ValueError(f"paired_gain: the evaluations scored different prompts ({len(before)} vs {len(after)}, "
                         f"{len(set(before) ^ set(after))} not in both); evaluate the same held-out set")
    diffs = [(after[i] - a, d) for i, (d, a) in before.items()]
    out = dict(zip(("gain", "gain_ci95"), mean_ci95([x for x, _ in diffs])))
    hard = [x for x, d in diffs if d is not None and d >= hard_min_difficulty]
    if hard:
        out["hard_gain"], out["hard_gain_ci95"] = mean_ci95(hard)
    return out


def logprob_gap(engine_logp, actor_logp, mask) -> dict[str, float]:
    """Mean and max |engine - actor| log-prob over response tokens ((B, T) tensors, mask 0/1): the rollout
    engine's sampling log-probs against the trainer's recomputation on the same weights. Near 0 when the
    weight sync and both numerics agree; a large gap makes the update off-policy."""
    m = mask.bool()
    diff = (engine_logp - actor_logp).abs()[m]
    if diff.numel() == 0:
        return {"logp_gap_mean": 0.0, "logp_gap_max": 0.0}
    return {"logp_gap_mean": float(diff.mean()), "logp_gap_max": float(diff.max())}
