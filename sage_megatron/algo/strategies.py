"""Hinted GRPO: the per-step hinting strategies (GRPO, SAGE, SAGE-light).

The training loop makes one call per step, whatever the algorithm (no algorithm branches in the loop):

    out = hinting.apply(rows, step=step, sampler=sampler, reward_fn=reward_fn)
    out.groups        # list[PromptGroup], one per row, in row order; each keyed by its uid
    out.metrics       # dict[str, float]: accuracy before/after hints, hints per level, time per phase
    out.solved_rows   # dataset indices with at least one correct rollout this step (any hint level)
    ... hinting.state_dict() / load_state_dict() in checkpoints ({} when stateless)

Strategies (docs/sage.md):
  GrpoHinting       one rollout, no hints.
  SageHinting       SAGE online: roll out unhinted; for the prompts the trigger marks unresolved
                    (all wrong, or accuracy <= threshold) write hints fresh this step, then escalate
                    l = 1..L re-sampling ONLY the still-unresolved prompts; the hinted group replaces
                    the prompt's group (or is mixed into it: Scaf-GRPO); stop at the first level that
                    resolves it; level L's group is kept even if all wrong. A prompt whose hint cannot
                    be written keeps its unhinted group. By default the policy's hints are drawn
                    ahead, in the unhinted rollout's sampler call (``speculative_hints``).
  SageLightHinting  SAGE-light: a per-prompt level from the accuracy last seen (SageLightSchedule),
                    hints for every prompt with level >= 1, ONE rollout of the batch.
Hint sources (one interface, ``write_hints``): PolicyHintSource (the policy through the rollout
engine; give it another sampler for a frozen initial policy or an external model) and
ReferencePrefixHintSource (a prefix of the reference solution, no model).

Loss context: "hinted" (SAGE, default: the group's prompt_ids are the hinted prompt and training is
on-policy) or "original" (Guide-GRPO: the group also carries ``unhinted_prompt_ids``; the trainer
computes the current log-probs on that context and uses losses.is_corrected_policy_loss with the
hinted sampling log-probs as the behaviour policy). Per-sample contexts are in Sample.prompt_ids
(authoritative: in "mix" mode one group holds samples drawn under different prompts).

Uids: "s{step}/r{index}" for a row's unhinted group, + "/h{level}" for its hinted group,
+ "/hintgen/a{attempt}" for hint-writing requests. Groups are matched by uid, never by position.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Mapping, Protocol, Sequence

from sage_megatron.algo.hint_sources import HintResult, HintSource
from sage_megatron.algo.templates import Encode, Templates, answer_messages
from sage_megatron.metrics import PhaseTimer
from sage_megatron.types import PromptGroup, PromptRow, RewardFn, RolloutRequest, Sample, Sampler, SamplingConfig


@dataclass(frozen=True)
class RolloutSettings:
    """What every hinting strategy needs to turn rows into scored groups."""

    templates: Templates
    encode: Encode
    sampling: SamplingConfig        # rollout sampling; sampling.n is the group size G
    correct_reward: float = 1.0     # a sample is correct iff its reward >= this


@dataclass
class HintingOutput:
    """One step's groups and what happened on the way."""

    groups: list[PromptGroup]                         # one per input row, in row order
    metrics: dict[str, float] = field(default_factory=dict)
    solved_rows: set[int] = field(default_factory=set)  # rows with >= 1 correct rollout this step


@dataclass(frozen=True)
class _Job:
    uid: str
    row: PromptRow
    hint_level: int = 0
    hint_text: str = ""


def prompt_uid(step: int, index: int) -> str:
    """The uid of row ``index``'s unhinted group at ``step``."""
    return f"s{step}/r{index}"


def _check_rows(rows: Sequence[PromptRow]) -> None:
    seen: set[int] = set()
    for row in rows:
        if row.index in seen:
            raise ValueError(f"row index {row.index} appears twice in one batch; groups are keyed by it")
        seen.add(row.index)


def generate_together(sampler: Sampler, batches: Sequence[tuple[Sequence[RolloutRequest], SamplingConfig]]
                      ) -> dict[str, list[Sample]]:
    """Several ``(requests, sampling)`` batches in one sampler call when the sampler can (the pool's
    ``generate_batches``: decoded side by side), else one ``generate`` per batch; keyed by uid."""
    together = getattr(sampler, "generate_batches", None)
    if together is not None:
        return together([(list(requests), sampling) for requests, sampling in batches])
    outputs: dict[str, list[Sample]] = {}
    for requests, sampling in batches:
        outputs.update(sampler.generate(list(requests), sampling))
    return outputs


def _answer_requests(jobs: Sequence[_Job], settings: RolloutSettings) -> list[RolloutRequest]:
    """One request per job: the answer prompt, with the job's hint when it has one."""
    requests = []
    for job in jobs:
        hint = job.hint_text if job.hint_level > 0 else None
        ids = settings.encode(answer_messages(settings.templates, problem=job.row.problem, hint=hint))
        requests.append(RolloutRequest(uid=job.uid, prompt_ids=ids))
    return requests


def _rollout(jobs: Sequence[_Job], *, settings: RolloutSettings, sampler: Sampler, reward_fn: RewardFn,
             timer: PhaseTimer, phase: str, alongside: Sequence[tuple[Sequence[RolloutRequest], SamplingConfig]] = (),
             drawn: Mapping[str, list[Sample]] | None = None
             ) -> tuple[dict[str, PromptGroup], dict[str, list[Sample]]]:
    """Samples G responses per job, scores them, and returns the groups keyed by job uid, with the
    outputs of the ``alongside`` batches (drawn in the same sampler call) keyed by their uids.
    ``drawn``: outputs drawn earlier (SAGE's levels drawn ahead); when it holds every job's uid, nothing
    is sampled and only those jobs' samples are scored."""
    if not jobs:
        return {}, {}
    requests = _answer_requests(jobs, settings)
    if drawn is not None and not alongside and all(r.uid in drawn for r in requests):
        outputs: Mapping[str, list[Sample]] = drawn
    else:
        with timer.phase(phase):
            outputs = generate_together(sampler, [(requests, settings.sampling), *alongside])
    for request in requests:
        samples = outputs.get(request.uid)
        if not samples:
            raise RuntimeError(f"sampler returned no samples for uid {request.uid!r}")
        wrong = [s.uid for s in samples if s.uid != request.uid]
        if wrong:
            raise RuntimeError(f"sampler put samples of uid {wrong[0]!r} under {request.uid!r}")
    pairs = [(s.text, job.row.answer) for job, r in zip(jobs, requests) for s in outputs[r.uid]]
    with timer.phase("reward"):
        flat = [float(x) for x in reward_fn(pairs)]
    if len(flat) != len(pairs):
        raise RuntimeError(f"reward_fn returned {len(flat)} rewards for {len(pairs)} responses")
    groups, pos = {}, 0
    for job, request in zip(jobs, requests):
        samples = outputs[request.uid]
        groups[job.uid] = PromptGroup(uid=job.uid, row_index=job.row.index, prompt_ids=request.prompt_ids,
                                      samples=list(samples), rewards=flat[pos:pos + len(samples)],
                                      hint_level=job.hint_level, hint_text=job.hint_text)
        pos += len(samples)
    return groups, outputs


def _accuracy(rewards: Sequence[float], correct_reward: float) -> float:
    return sum(r >= correct_reward for r in rewards) / len(rewards) if rewards else 0.0


def _mean_accuracy(groups: Sequence[PromptGroup], correct_reward: float) -> float:
    rewards = [r for g in groups for r in g.rewards]
    return _accuracy(rewards, correct_reward)


def _with_original_context(group: PromptGroup, unhinted_prompt_ids: tuple[int, ...]) -> PromptGroup:
    return replace(group, unhinted_prompt_ids=tuple(unhinted_prompt_ids))


# ============================================================================ strategies


class Hinting(Protocol):
    """What the training loop calls once per step (GrpoHinting, SageHinting, SageLightHinting)."""

    def apply(self, rows: Sequence[PromptRow], *, step: int, sampler: Sampler, reward_fn: RewardFn) -> HintingOutput:
        """Rolls out ``rows`` (with hints as the strategy decides) and returns the scored groups."""
        ...

    def state_dict(self) -> dict:
        """JSON-serialisable state for checkpoints ({} when stateless)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        ...


class GrpoHinting:
    """No hints: one rollout of the batch (plain GRPO), same interface as the SAGE strategies."""

    def __init__(self, settings: RolloutSettings) -> None:
        self.settings = settings

    def apply(self, rows: Sequence[PromptRow], *, step: int, sampler: Sampler, reward_fn: RewardFn) -> HintingOutput:
        _check_rows(rows)
        timer = PhaseTimer("rollout", "reward")
        jobs = [_Job(uid=prompt_uid(step, row.index), row=row) for row in rows]
        groups, _ = _rollout(jobs, settings=self.settings, sampler=sampler, reward_fn=reward_fn, timer=timer,
                             phase="rollout")
        final = [groups[j.uid] for j in jobs]
        acc = _mean_accuracy(final, self.settings.correct_reward)
        solved = {g.row_index for g in final if any(r >= self.settings.correct_reward for r in g.rewards)}
        metrics = {"acc/before_hints": acc, "acc/after_hints": acc, **timer.metrics()}
        return HintingOutput(groups=final, metrics=metrics, solved_rows=solved)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SageHinting:
    """SAGE online hinting (see the module docstring), with the related methods' options.

    trigger:       "all_wrong" (SAGE) or "threshold" (accuracy <= trigger_threshold).
                   A group is resolved when the trigger no longer fires; escalation stops there.
    mode:          "replace" (SAGE): the last tried level's group replaces the prompt's group.
                   "mix" (Scaf-GRPO): the unhinted group is kept and up to ``mix_count`` correct
                   hinted samples (of the last tried level) replace its lowest-reward samples
                   (later positions first on ties); with no correct hinted sample it is unchanged.
    loss_context:  "hinted" (default) or "original" (sets unhinted_prompt_ids on hinted groups).
    speculative_hints: the first round of hints is drawn for EVERY row in the same sampler call as
                   the unhinted rollout, and read afterwards for the rows that trigger (their
                   retries, when needed, are drawn after). It computes what writing hints after the
                   rollout computes (same hint prompt, same policy weights, same parsing), without
                   the wait: with the pool, hint decoding runs in the engines' batch next to the
                   rollout instead of after it. Costs the hints of rows that do not trigger.
                   Off: hints for the triggered rows only, after the rollout.
    speculative_levels: the hinted groups of ALL levels 1..L of every prompt with hints are drawn in
                   ONE sampler call; escalation then reads them level by level and stops where it
                   would have stopped (scoring only the levels it reaches), so the groups trained on
                   are chosen exactly as when each level is drawn after the previous one failed. One
                   decode wait instead of up to L; costs the groups of levels escalation does not reach
                   (``hint/groups_drawn_unused``). Off: level l + 1 is drawn for the prompts level l
                   left unresolved.
    """

    def __init__(self, settings: RolloutSettings, *, hint_source: HintSource, levels: int = 3,
                 trigger: Literal["all_wrong", "threshold"] = "all_wrong", trigger_threshold: float = 0.0,
                 mode: Literal["replace", "mix"] = "replace", mix_count: int = 1,
                 loss_context: Literal["hinted", "original"] = "hinted", speculative_hints: bool = True,
                 speculative_levels: bool = False) -> None:
        if getattr(hint_source, "levels", levels) != levels:
            raise ValueError(f"hint source writes {hint_source.levels} levels but SAGE escalates over {levels}")
        _check_choice("trigger", trigger, ("all_wrong", "threshold"))
        _check_choice("mode", mode, ("replace", "mix"))
        _check_choice("loss_context", loss_context, ("hinted", "original"))
        if mix_count < 1:
            raise ValueError(f"mix_count must be >= 1, got {mix_count}")
        self.settings = settings
        self.hint_source = hint_source
        self.levels = levels
        self.trigger = trigger
        self.trigger_threshold = trigger_threshold
        self.mode = mode
        self.mix_count = mix_count
        self.loss_context = loss_context
        self.speculative_hints = speculative_hints
        self.speculative_levels = speculative_levels

    def triggered(self, rewards: Sequence[float]) -> bool:
        """Whether a group counts as unresolved (and gets hints)."""
        acc = _accuracy(rewards, self.settings.correct_reward)
        return acc == 0.0 if self.trigger == "all_wrong" else acc <= self.trigger_threshold

    def apply(self, rows: Sequence[PromptRow], *, step: int, sampler: Sampler, reward_fn: RewardFn) -> HintingOutput:
        _check_rows(rows)
        cr = self.settings.correct_reward
        timer = PhaseTimer("rollout", "reward", "hint_gen", "hint_rollout")
        row_of = {prompt_uid(step, row.index): row for row in rows}
        ahead = self.hint_source.speculative_batches(row_of) if self.speculative_hints else []
        base, drawn = _rollout([_Job(uid=u, row=r) for u, r in row_of.items()], settings=self.settings,
                               sampler=sampler, reward_fn=reward_fn, timer=timer, phase="rollout", alongside=ahead)
        solved = {g.row_index for g in base.values() if any(r >= cr for r in g.rewards)}
        unresolved = [u for u in row_of if self.triggered(base[u].rewards)]
        hints: dict[str, HintResult] = {}
        if unresolved:
            with timer.phase("hint_gen"):
                hints = self.hint_source.write_hints({u: row_of[u] for u in unresolved}, sampler=sampler, drawn=drawn)
        pending = [u for u in unresolved if hints[u].ok]
        metrics: dict[str, float] = {
            "hint/triggered": len(unresolved),
            "hint/source_failed": len(unresolved) - len(pending),
            "hint/parse_failures": sum(h.parse_failures for h in hints.values()),
            "hint/written_ahead": sum(len(requests) for requests, _ in ahead),
        }

        def level_jobs(level: int, uids: Sequence[str]) -> list[_Job]:
            return [_Job(uid=f"{u}/h{level}", row=row_of[u], hint_level=level, hint_text=hints[u].hints[level])
                    for u in uids]

        levels_drawn: dict[str, list[Sample]] | None = None
        if self.speculative_levels and pending:
            every_level = [job for level in range(1, self.levels + 1) for job in level_jobs(level, pending)]
            with timer.phase("hint_rollout"):
                levels_drawn = generate_together(sampler, [(_answer_requests(every_level, self.settings),
                                                            self.settings.sampling)])
        last_tried: dict[str, PromptGroup] = {}
        for level in range(1, self.levels + 1):
            hinted, _ = _rollout(level_jobs(level, pending), settings=self.settings, sampler=sampler,
                                 reward_fn=reward_fn, timer=timer, phase="hint_rollout", drawn=levels_drawn)
            still = []
            for u in pending:
                group = last_tried[u] = hinted[f"{u}/h{level}"]
                if any(r >= cr for r in group.rewards):
                    solved.add(group.row_index)
                if self.triggered(group.rewards):
                    still.append(u)
            metrics[f"hint/hinted_l{level}"] = len(pending)
            metrics[f"hint/solved_l{level}"] = len(pending) - len(still)
            metrics[f"hint/success_rate_l{level}"] = (len(pending) - len(still)) / len(pending) if pending else 0.0
            pending = still
        metrics["hint/unresolved_after"] = len(pending)
        if levels_drawn is not None:
            reached = sum(metrics[f"hint/hinted_l{level}"] for level in range(1, self.levels + 1))
            metrics["hint/groups_drawn_unused"] = metrics["hint/hinted_l1"] * self.levels - reached
        final = {u: base[u] for u in row_of}
        mixed = 0
        for u, group in last_tried.items():
            final[u], n = self._combine(base[u], group)
            mixed += n
        if self.mode == "mix":
            metrics["hint/mixed_samples"] = mixed
        groups = [final[u] for u in row_of]
        metrics["acc/before_hints"] = _mean_accuracy(list(base.values()), cr)
        metrics["acc/after_hints"] = _mean_accuracy(groups, cr)
        metrics.update(timer.metrics())
        return HintingOutput(groups=groups, metrics=metrics, solved_rows=solved)

    def _combine(self, original: PromptGroup, hinted: PromptGroup) -> tuple[PromptGroup, int]:
        """The group trained on for a hinted prompt, and how many hinted samples it holds (mix mode)."""
        if self.mode == "replace":
            group = hinted
            if self.loss_context == "original":
                group = _with_original_context(group, original.prompt_ids)
            return group, 0
        cr = self.settings.correct_reward
        donors = [(s, r) for s, r in zip(hinted.samples, hinted.rewards) if r >= cr][:self.mix_count]
        if not donors:
            return original, 0
        by_badness = sorted(range(len(original.rewards)), key=lambda i: (original.rewards[i], -i))
        slots = sorted(by_badness[:len(donors)])
        samples, rewards = list(original.samples), list(original.rewards)
        for slot, (sample, reward) in zip(slots, donors):
            samples[slot] = replace(sample, sample_index=slot)
            rewards[slot] = reward
        group = replace(original, samples=samples, rewards=rewards, hint_level=hinted.hint_level,
                        hint_text=hinted.hint_text)
        if self.loss_context == "original":
            group = _with_original_context(group, original.prompt_ids)
        return group, len(donors)

    def state_dict(self) -> dict:
        return {}  # SAGE online keeps nothing across steps: hints are written fresh every step

    def load_state_dict(self, state: dict) -> None:
        pass


class SageLightSchedule:
    """Per-prompt hint level for SAGE-light, keyed by dataset index; JSON-serialisable state.

    First visit: level 0 (no hint). Later visits, from the level l and accuracy a recorded last time:
      a <= min_threshold                         -> min(l + 1, L)
      a >  max_threshold (unless escalate_only)  -> max(l - 1, 0)       (reference code)
      otherwise                                  -> l
    The paper's variant only escalates, with one threshold alpha = 0.35: ``SageLightSchedule.paper()``.
    Reference script values: min 0.1, max 0.35 (with G = 8, 0.1 means 0 of 8 correct).
    The last hints that parsed for a prompt are kept as the fallback for a later parse failure.
    """

    def __init__(self, *, levels: int = 3, min_threshold: float = 0.1, max_threshold: float = 0.35,
                 escalate_only: bool = False, keep_fallback_hints: bool = True) -> None:
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if not escalate_only and min_threshold > max_threshold:
            raise ValueError(f"min_threshold {min_threshold} > max_threshold {max_threshold}")
        self.levels = levels
        self.min_threshold = min_threshold
        self.max_threshold = max_threshold
        self.escalate_only = escalate_only
        self.keep_fallback_hints = keep_fallback_hints
        self._state: dict[int, dict] = {}

    @classmethod
    def paper(cls, *, levels: int = 3, alpha: float = 0.35) -> "SageLightSchedule":
        """The paper's rule: escalate when accuracy <= alpha, never de-escalate."""
        return cls(levels=levels, min_threshold=alpha, max_threshold=alpha, escalate_only=True)

    def plan(self, index: int) -> int:
        """The hint level to use for prompt ``index`` now (does not change the state)."""
        st = self._state.get(index)
        if st is None:
            return 0
        level, acc = st["level"], st["acc"]
        if acc <= self.min_threshold:
            return min(level + 1, self.levels)
        if not self.escalate_only and acc > self.max_threshold:
            return max(level - 1, 0)
        return level

    def record(self, index: int, *, level: int, accuracy: float, hints: Mapping[int, str] | None = None) -> None:
        """Stores the level used this visit and the accuracy it got (and the hints, if they parsed)."""
        old = self._state.get(index, {})
        kept = dict(old.get("hints", {}))
        if hints is not None and self.keep_fallback_hints:
            kept = {int(k): v for k, v in hints.items()}
        self._state[index] = {"level": int(level), "acc": float(accuracy), "hints": kept}

    def fallback_hint(self, index: int, level: int) -> str | None:
        """The last good hint of ``level`` for prompt ``index``, if any."""
        return self._state.get(index, {}).get("hints", {}).get(level)

    def __len__(self) -> int:
        return len(self._state)

    def state_dict(self) -> dict:
        return {"levels": self.levels,
                "prompts": {str(i): {"level": s["level"], "acc": s["acc"],
                                     "hints": {str(l): t for l, t in s["hints"].items()}}
                            for i, s in sorted(self._state.items())}}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("levels", self.levels)) != self.levels:
            raise ValueError(f"SAGE-light state has {state.get('levels')} hint levels, this run {self.levels}")
        self._state = {int(i): {"level": int(s["level"]), "acc": float(s["acc"]),
                                "hints": {int(l): t for l, t in s.get("hints", {}).items()}}
                       for i, s in state.get("prompts", {}).items()}


class SageLightHinting:
    """SAGE-light: per-prompt levels from a SageLightSchedule, fresh hints, one rollout.

    Hints are written for every prompt planned at level >= 1; a prompt whose hint fails uses the last
    good hint of that level, or (none kept) goes unhinted this step; the schedule records the
    PLANNED level with the accuracy measured, so a failed hint does not reset its progress.
    "acc/before_hints" here is the accuracy of the prompts planned at level 0.
    """

    def __init__(self, settings: RolloutSettings, *, hint_source: HintSource, schedule: SageLightSchedule,
                 loss_context: Literal["hinted", "original"] = "hinted") -> None:
        if getattr(hint_source, "levels", schedule.levels) != schedule.levels:
            raise ValueError(f"hint source writes {hint_source.levels} levels, the schedule uses {schedule.levels}")
        _check_choice("loss_context", loss_context, ("hinted", "original"))
        self.settings = settings
        self.hint_source = hint_source
        self.schedule = schedule
        self.loss_context = loss_context

    def apply(self, rows: Sequence[PromptRow], *, step: int, sampler: Sampler, reward_fn: RewardFn) -> HintingOutput:
        _check_rows(rows)
        cr, levels = self.settings.correct_reward, self.schedule.levels
        timer = PhaseTimer("rollout", "reward", "hint_gen")
        row_of = {prompt_uid(step, row.index): row for row in rows}
        plan = {u: self.schedule.plan(r.index) for u, r in row_of.items()}
        need = {u: row_of[u] for u in row_of if plan[u] >= 1}
        hints: dict[str, HintResult] = {}
        if need:
            with timer.phase("hint_gen"):
                hints = self.hint_source.write_hints(need, sampler=sampler)
        jobs, fallback, failed = [], 0, 0
        for u, row in row_of.items():
            level, text = plan[u], None
            if level >= 1:
                result = hints[u]
                text = result.hints[level] if result.ok else self.schedule.fallback_hint(row.index, level)
                fallback += int(not result.ok and text is not None)
                failed += int(text is None)
            if text is None:
                jobs.append(_Job(uid=u, row=row))
            else:
                jobs.append(_Job(uid=f"{u}/h{level}", row=row, hint_level=level, hint_text=text))
        groups_by_uid, _ = _rollout(jobs, settings=self.settings, sampler=sampler, reward_fn=reward_fn,
                                    timer=timer, phase="rollout")
        groups = [groups_by_uid[j.uid] for j in jobs]
        for u, group in zip(row_of, groups):
            result = hints.get(u)
            self.schedule.record(group.row_index, level=plan[u], accuracy=_accuracy(group.rewards, cr),
                                 hints=result.hints if result is not None and result.ok else None)
        if self.loss_context == "original":
            groups = [_with_original_context(g, self.settings.encode(
                answer_messages(self.settings.templates, problem=j.row.problem))) if g.hint_level > 0 else g
                for g, j in zip(groups, jobs)]
        metrics: dict[str, float] = {"hint/fallback_used": fallback, "hint/source_failed": failed,
                                     "hint/parse_failures": sum(h.parse_failures for h in hints.values())}
        for level in range(levels + 1):
            at = [g for g in groups if g.hint_level == level]
            metrics[f"hint/level_l{level}"] = len(at)
            if level >= 1:
                ok = sum(any(r >= cr for r in g.rewards) for g in at)
                metrics[f"hint/success_rate_l{level}"] = ok / len(at) if at else 0.0
        metrics["acc/before_hints"] = _mean_accuracy([g for g in groups if g.hint_level == 0], cr)
        metrics["acc/after_hints"] = _mean_accuracy(groups, cr)
        metrics.update(timer.metrics())
        solved = {g.row_index for g in groups if any(r >= cr for r in g.rewards)}
        return HintingOutput(groups=groups, metrics=metrics, solved_rows=solved)

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
