"""Hint sources: one interface (``write_hints``) over who writes a prompt's hints.

PolicyHintSource: a model through a Sampler (the policy itself in SAGE online; give it its own sampler
for a frozen initial policy or an external model). ReferencePrefixHintSource: a prefix of the reference
solution, no model (QuestA / StepHint style).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Literal, Mapping, Protocol, Sequence

from sage_megatron.algo.hint_json import parse_hint_json
from sage_megatron.algo.templates import Encode, Templates, hint_messages
from sage_megatron.types import PromptRow, RolloutRequest, Sampler, SamplingConfig


@dataclass
class HintResult:
    """Hints for one prompt, or why there are none."""

    hints: dict[int, str] | None = None   # {1: minimal, ..., L: detailed}; None: could not be produced
    attempts: int = 0                     # model calls made for this prompt
    parse_failures: int = 0               # outputs that did not parse

    @property
    def ok(self) -> bool:
        return self.hints is not None


class HintSource(Protocol):
    """Writes hints of levels 1..``levels`` for prompts keyed by uid."""

    levels: int

    def write_hints(self, rows: Mapping[str, PromptRow], *, sampler: Sampler,
                    drawn: Mapping[str, list] | None = None) -> dict[str, HintResult]:
        """One HintResult per key of ``rows``. ``sampler`` is the policy's rollout engine; ``drawn``: the
        outputs of ``speculative_batches``' requests, when they were drawn ahead."""
        ...

    def speculative_batches(self, rows: Mapping[str, PromptRow]) -> list[tuple[list[RolloutRequest], SamplingConfig]]:
        """Requests to draw in the same sampler call as the rows' rollout, so hints are ready when it ends;
        [] when there is nothing to draw ahead."""
        ...


class PolicyHintSource:
    """Hints written by a model through a Sampler: the policy itself (SAGE) unless given its own.

    One request per prompt yields all levels as JSON (parse_hint_json). Prompts whose output does not
    parse are retried, the failing ones only, with ``max_retries`` samples drawn in ONE call (n =
    max_retries, the first parsable sample wins): a hint is a long sequential decode, so retry rounds
    one after another would multiply its latency. Greedy retries would repeat the same text, so
    retries sample at ``retry_temperature`` (None: ``sampling``'s temperature).
    Pass ``sampler`` for a frozen copy of the initial policy or an external model; leave it None to
    use the sampler of each call (the current policy, SAGE online).
    ``speculative_batches`` lets the caller draw the first round for every row ahead, alongside the
    rollout; ``write_hints(..., drawn=...)`` then reads it for the rows that need hints (same parsing)
    and draws only the retries.
    """

    def __init__(self, *, templates: Templates, encode: Encode, levels: int = 3,
                 sampling: SamplingConfig = SamplingConfig(n=1, temperature=0.0, max_tokens=2048),
                 max_retries: int = 2, retry_temperature: float | None = 0.7,
                 sampler: Sampler | None = None) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.templates = templates
        self.encode = encode
        self.levels = levels
        self.sampling = replace(sampling, n=1)
        self.max_retries = max_retries
        self.retry_temperature = retry_temperature
        self.sampler = sampler
        self.total_parse_failures = 0   # over the source's life (logs)
        self.total_failed_prompts = 0

    def write_hints(self, rows: Mapping[str, PromptRow], *, sampler: Sampler,
                    drawn: Mapping[str, list] | None = None) -> dict[str, HintResult]:
        """Round after round for the rows still without a parsable hint. A round whose requests are in
        ``drawn`` (the outputs of ``speculative_batches``' requests) is read from there, not drawn again."""
        engine = self.sampler if self.sampler is not None else sampler
        results = {uid: HintResult() for uid in rows}
        prompt_ids = self._prompt_ids(rows)
        pending = list(rows)
        for attempt, sampling in enumerate(self._rounds()):
            if not pending:
                break
            outputs = drawn or {}
            if any(self._request_uid(uid, attempt) not in outputs for uid in pending):
                outputs = engine.generate([self._request(uid, attempt, prompt_ids[uid]) for uid in pending], sampling)
            for uid in pending:
                self._absorb(results[uid], outputs.get(self._request_uid(uid, attempt)))
            pending = [uid for uid in pending if not results[uid].ok]
        self.total_parse_failures += sum(r.parse_failures for r in results.values())
        self.total_failed_prompts += len(pending)
        return results

    def speculative_batches(self, rows: Mapping[str, PromptRow]) -> list[tuple[list[RolloutRequest], SamplingConfig]]:
        """The first round's request of every row, to draw in the sampler call that rolls the rows out.

        ``write_hints(..., drawn=outputs)`` then reads that round for the rows that turn out to need
        hints, and draws the retries of those whose output did not parse. Costs the hints of rows that
        do not need them; saves the wait for the rollout before hints start. [] when this source writes
        with its own sampler (that engine cannot share the call).
        """
        if self.sampler is not None:
            return []
        prompt_ids = self._prompt_ids(rows)
        return [([self._request(uid, 0, prompt_ids[uid]) for uid in rows], self.sampling)]

    def _prompt_ids(self, rows: Mapping[str, PromptRow]) -> dict[str, tuple[int, ...]]:
        return {uid: self.encode(hint_messages(self.templates, problem=row.problem, solution=row.solution))
                for uid, row in rows.items()}

    def _rounds(self) -> list[SamplingConfig]:
        return [self.sampling] + ([self._retry_sampling()] if self.max_retries else [])

    @staticmethod
    def _request_uid(uid: str, attempt: int) -> str:
        return f"{uid}/hintgen/a{attempt}"

    def _request(self, uid: str, attempt: int, prompt_ids: tuple[int, ...]) -> RolloutRequest:
        return RolloutRequest(uid=self._request_uid(uid, attempt), prompt_ids=prompt_ids)

    def _absorb(self, result: HintResult, samples: list | None) -> None:
        """Reads one round's samples into ``result``, in sample order: the first parsable one wins."""
        for sample in samples or []:
            result.attempts += 1
            result.hints = parse_hint_json(sample.text, levels=self.levels)
            if result.hints is not None:
                return
            result.parse_failures += 1

    def _retry_sampling(self) -> SamplingConfig:
        temperature = self.sampling.temperature if self.retry_temperature is None else self.retry_temperature
        seed = None if self.sampling.seed is None else self.sampling.seed + 1
        return replace(self.sampling, n=self.max_retries, temperature=temperature, seed=seed)


class ReferencePrefixHintSource:
    """Hints = prefixes of the reference solution (QuestA / StepHint style); no model call.

    The solution is split into units (non-empty "lines", or "paragraphs" separated by blank lines);
    level l gets the first ceil(f_l * n) units (at least 1), f_l = ``fractions[l-1]``, by default
    l / L. NOTE: with the default f_L = 1 the last level is the whole solution, final answer
    included; pass e.g. fractions=(0.25, 0.5, 0.75) to keep it out: with every fraction below 1 no level
    gets the whole solution, and a one-unit solution gets no hints at all.
    """

    def __init__(self, *, levels: int = 3, unit: Literal["lines", "paragraphs"] = "lines",
                 fractions: Sequence[float] | None = None) -> None:
        fr = tuple(fractions) if fractions is not None else tuple(l / levels for l in range(1, levels + 1))
        if len(fr) != levels or not all(0 < f <= 1 for f in fr):
            raise ValueError(f"fractions must be {levels} numbers in (0, 1], got {fr}")
        if unit not in ("lines", "paragraphs"):
            raise ValueError(f"unit must be 'lines' or 'paragraphs', got {unit!r}")
        self.levels = levels
        self.unit = unit
        self.fractions = fr

    def write_hints(self, rows: Mapping[str, PromptRow], *, sampler: Sampler | None = None,
                    drawn: Mapping[str, list] | None = None) -> dict[str, HintResult]:
        return {uid: self._hints(row.solution) for uid, row in rows.items()}

    def speculative_batches(self, rows: Mapping[str, PromptRow]) -> list:
        return []   # no model call: nothing to draw ahead

    def _hints(self, solution: str) -> HintResult:
        if self.unit == "lines":
            units, joiner = [s for s in solution.split("\n") if s.strip()], "\n"
        else:
            units, joiner = [p.strip() for p in re.split(r"\n\s*\n", solution) if p.strip()], "\n\n"
        if not units:
            return HintResult(hints=None)
        n = len(units)
        limit = n if max(self.fractions) >= 1 else n - 1   # fractions below 1 never give the whole solution
        if limit < 1:
            return HintResult(hints=None)
        counts = [min(limit, max(1, math.ceil(f * n - 1e-9))) for f in self.fractions]
        return HintResult(hints={l: joiner.join(units[:k]) for l, k in enumerate(counts, start=1)})
