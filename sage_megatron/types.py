"""Rollout data types carried through every stage: prompt row -> request -> sample -> prompt group,
and the two interfaces the algorithm sees of the outside world (Sampler, RewardFn).

Groups are always keyed by a prompt ``uid`` (never by row position: the SAGE reference code's
defect was to key groups by position while batch balancing reordered rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

RewardFn = Callable[[Sequence[tuple[str, str]]], list[float]]  # [(response, ground truth)] -> rewards


@dataclass(frozen=True)
class PromptRow:
    """One training prompt."""

    index: int          # stable dataset index (unique within the file)
    problem: str        # the question shown to the policy
    solution: str       # reference solution (hints are made from it); "" when not configured
    answer: str         # ground-truth final answer (compared by the reward)
    difficulty: int | None = None   # optional difficulty label (toy: steps); evaluation reports a hard band


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings for one ``generate`` call."""

    n: int = 8                      # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64            # max response tokens
    seed: int | None = None         # per-call seed (engines add the request index)
    stop: tuple[str, ...] = ()      # extra stop strings (EOS always stops)


@dataclass(frozen=True)
class RolloutRequest:
    """One prompt to sample from, already tokenized with the policy's chat template."""

    uid: str                        # stable key of the prompt group, e.g. "step3/row17/hint2"
    prompt_ids: tuple[int, ...]


@dataclass
class Sample:
    """One sampled response with what produced it."""

    uid: str
    prompt_ids: tuple[int, ...]
    response_ids: list[int]
    logprobs: list[float]           # sampling log-prob of each response token, len == len(response_ids)
    finish_reason: str              # "stop" (EOS/stop string) or "length"
    weight_version: int             # actor weight version loaded in the engine that sampled it
    text: str = ""                  # decoded response
    sample_index: int = 0           # 0..n-1 within its prompt


@dataclass
class PromptGroup:
    """The G samples of one prompt as trained on, plus SAGE bookkeeping."""

    uid: str
    row_index: int                  # stable dataset index of the prompt
    prompt_ids: tuple[int, ...]     # the context the samples were drawn under (hinted if hint_level > 0)
    samples: list[Sample] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    hint_level: int = 0             # 0 = no hint
    hint_text: str = ""
    unhinted_prompt_ids: tuple[int, ...] = ()  # original-prompt context (Guide-GRPO style loss option)


class Sampler(Protocol):
    """The rollout engine as the algorithm sees it (the pool, seeded per step by the trainer)."""

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> dict[str, list[Sample]]:
        """``sampling.n`` samples per request, keyed by the request's uid."""
        ...
