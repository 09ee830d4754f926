"""GRPO group advantages: A_i = (R_i - mean_g R) / (std_g R + eps), one scalar per response.

std_mode:
  "unbiased"   (DEFAULT) std with 1/(G-1), as the SAGE reference code (verl's torch.std) computes it;
  "population" std with 1/G, as the paper writes it;
  "none"       no division: A_i = R_i - mean_g R (Dr. GRPO; verl's norm_adv_by_std_in_grpo=False), so a
               group's advantages keep the scale of its reward differences (a small length penalty stays
               small instead of being scaled up to a correct answer's weight in a group where all fail).
eps = 1e-6 in both. A group of one sample (G = 1) has mean 0 and std 1, so A = R (verl's convention;
"unbiased" std is undefined there). A group whose rewards are all equal has A = 0 for every sample:
it carries no learning signal ("zero-advantage group"); with SAGE that is what hints try to fix.

Shapes: N prompt groups of G samples -> (N, G); ragged groups (SAGE "mix" mode may change a group's
size) use the flat (B,) form with a group index per sample.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from sage_megatron.types import PromptGroup

StdMode = Literal["unbiased", "population", "none"]
DEFAULT_STD_MODE: StdMode = "unbiased"
DEFAULT_EPS = 1e-6


def grpo_advantages(rewards: torch.Tensor, *, std_mode: StdMode = DEFAULT_STD_MODE,
                    eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Group-normalised advantages of equal-size groups.

    rewards: (N, G) float, one row per prompt group.  Returns (N, G).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (N, G), got shape {tuple(rewards.shape)}")
    out_dtype = _float_dtype(rewards)
    r = rewards.to(torch.float64)
    if r.shape[1] == 1:
        return r.to(out_dtype)  # mean 0, std 1 (see module docstring)
    mean = r.mean(dim=1, keepdim=True)                                     # (N, 1)
    if _correction(std_mode) is None:
        return (r - mean).to(out_dtype)
    std = r.std(dim=1, keepdim=True, correction=_correction(std_mode))    # (N, 1)
    return ((r - mean) / (std + eps)).to(out_dtype)


def grpo_advantages_ragged(rewards: torch.Tensor, group_index: torch.Tensor, *,
                           std_mode: StdMode = DEFAULT_STD_MODE, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Group-normalised advantages when groups have different sizes.

    rewards: (B,) float; group_index: (B,) long in [0, num_groups). Returns (B,).
    """
    if rewards.shape != group_index.shape or rewards.dim() != 1:
        raise ValueError(f"rewards and group_index must both be (B,), got {tuple(rewards.shape)} "
                         f"and {tuple(group_index.shape)}")
    r = rewards.to(torch.float64)
    k = int(group_index.max().item()) + 1 if group_index.numel() else 0
    count = torch.zeros(k, dtype=torch.float64).index_add_(0, group_index, torch.ones_like(r))    # (K,)
    mean = torch.zeros(k, dtype=torch.float64).index_add_(0, group_index, r) / count.clamp(min=1)
    single = count[group_index] == 1
    correction = _correction(std_mode)
    if correction is None:
        adv = r - mean[group_index]
    else:
        sq = torch.zeros(k, dtype=torch.float64).index_add_(0, group_index, (r - mean[group_index]) ** 2)
        std = (sq / (count - correction).clamp(min=1)).sqrt()
        adv = (r - mean[group_index]) / (std[group_index] + eps)
    return torch.where(single, r, adv).to(_float_dtype(rewards))


def group_advantages(groups: Sequence[PromptGroup], *, std_mode: StdMode = DEFAULT_STD_MODE,
                     eps: float = DEFAULT_EPS) -> dict[str, list[float]]:
    """Per-sample advantages of each group, keyed by the group's uid (never by position)."""
    uids = [g.uid for g in groups]
    if len(set(uids)) != len(uids):
        raise ValueError(f"duplicate group uids: {sorted({u for u in uids if uids.count(u) > 1})}")
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float64)
    index = torch.tensor([i for i, g in enumerate(groups) for _ in g.rewards], dtype=torch.long)
    adv = grpo_advantages_ragged(rewards, index, std_mode=std_mode, eps=eps).tolist()
    out: dict[str, list[float]] = {}
    pos = 0
    for g in groups:
        out[g.uid] = adv[pos:pos + len(g.rewards)]
        pos += len(g.rewards)
    return out


def mask_truncated(groups: Sequence[PromptGroup], advantages: dict[str, list[float]]) -> dict[str, list[float]]:
    """DAPO's overlong filtering: a response cut at max_tokens (finish_reason "length") gets advantage 0,
    so it adds no policy gradient; its reward still counted in its group's mean and std.

    Why: a small model's unfinished rambles are most of a hard batch, and pushing their sampled tokens
    down (a negative advantage over 100s of tokens) raises entropy and length instead of teaching the
    answer. Returns a new dict; ``advantages`` is not changed.
    """
    out: dict[str, list[float]] = {}
    for g in groups:
        adv = advantages[g.uid]
        if len(adv) != len(g.samples):
            raise ValueError(f"group {g.uid!r}: {len(adv)} advantages for {len(g.samples)} samples")
        out[g.uid] = [0.0 if s.finish_reason == "length" else a for s, a in zip(g.samples, adv)]
    return out


def overlong_penalty(length: int, *, max_tokens: int, buffer: int, penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 up to ``max_tokens - buffer`` response tokens, then falling
    linearly to ``-penalty`` at ``max_tokens`` (a response cut there gets the whole penalty).

    Why: with only the correctness reward, a group whose samples all fail has every advantage 0, so nothing
    stops a small model's answers from drifting longer until most are cut off (SmolLM2 on arith: truncated
    share 0.19 -> 0.75 in 16 GRPO steps); the penalty ranks a group's long answers below its short ones."""
    if buffer <= 0:
        return 0.0
    start = max_tokens - buffer
    return -penalty * min(max(length - start, 0), buffer) / buffer


def shaped_rewards(groups: Sequence[PromptGroup], *, max_tokens: int, buffer: int,
                   penalty: float = 1.0) -> list[PromptGroup]:
    """Copies of ``groups`` whose rewards include ``overlong_penalty`` (for the advantages only: accuracy,
    hint triggers and solved-prompt counts keep reading the correctness rewards of ``groups``)."""
    from dataclasses import replace

    out = []
    for g in groups:
        if len(g.rewards) != len(g.samples):
            raise ValueError(f"group {g.uid!r}: {len(g.rewards)} rewards for {len(g.samples)} samples")
        out.append(replace(g, rewards=[r + overlong_penalty(len(s.response_ids), max_tokens=max_tokens,
                                                            buffer=buffer, penalty=penalty)
                                       for s, r in zip(g.samples, g.rewards)]))
    return out


def step_advantages(groups: Sequence[PromptGroup], algorithm, *, max_tokens: int = 0) -> dict[str, list[float]]:
    """The training step's advantages under an ``AlgorithmConfig``: group advantages (its std_mode, adv_eps)
    of the rewards, less the soft overlong penalty when ``algorithm.overlong_buffer`` > 0 (``max_tokens``:
    the rollout's limit), then ``mask_truncated`` when the config asks for it."""
    if algorithm.overlong_buffer > 0:
        if max_tokens <= algorithm.overlong_buffer:
            raise ValueError(f"algorithm.overlong_buffer={algorithm.overlong_buffer} needs max_tokens above it, "
                             f"got {max_tokens}")
        groups = shaped_rewards(groups, max_tokens=max_tokens, buffer=algorithm.overlong_buffer,
                                penalty=algorithm.overlong_penalty)
    adv = group_advantages(groups, std_mode=algorithm.std_mode, eps=algorithm.adv_eps)
    return mask_truncated(groups, adv) if algorithm.mask_truncated else adv


def zero_advantage_mask(rewards: torch.Tensor) -> torch.Tensor:
    """True for groups whose rewards are all equal (every advantage is exactly 0).

    rewards: (N, G). Returns (N,) bool.
    """
    return rewards.max(dim=1).values == rewards.min(dim=1).values


def is_zero_advantage(rewards: Sequence[float]) -> bool:
    """True when one group's rewards are all equal (no learning signal); an empty group is too."""
    return len(set(rewards)) <= 1


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence advantages repeated over each response's tokens.

    advantages: (B,); mask: (B, T) 0/1 response mask. Returns (B, T), zero where mask is 0.
    """
    return advantages.to(_float_dtype(mask))[:, None] * mask


def _float_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float32


def _correction(std_mode: str) -> int | None:
    """The std's degrees-of-freedom correction, or None for no division ("none")."""
    if std_mode == "unbiased":
        return 1
    if std_mode == "population":
        return 0
    if std_mode == "none":
        return None
    raise ValueError(f"std_mode must be 'unbiased', 'population' or 'none', got {std_mode!r}")
