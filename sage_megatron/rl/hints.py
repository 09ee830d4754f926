"""Hinted GRPO: prompt templates, hint parsing, hint sources, and the per-step hinting strategies.

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
                    be written keeps its unhinted group.
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

import json
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Protocol, Sequence

from sage_megatron.rl.data import PromptRow
from sage_megatron.types import PromptGroup, RolloutRequest, Sample, SamplingConfig

Message = dict[str, str]
Encode = Callable[[list[Message]], tuple[int, ...]]          # chat messages -> prompt token ids
RewardFn = Callable[[Sequence[tuple[str, str]]], list[float]]  # [(response, ground truth)] -> rewards


class Sampler(Protocol):
    """The rollout engine as the hinting code sees it."""

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> dict[str, list[Sample]]:
        """``sampling.n`` samples per request, keyed by the request's uid."""
        ...


# ============================================================================ templates

PAPER_TEMPLATES = Path(__file__).resolve().parent / "templates" / "paper"
TEMPLATE_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "answer_system": (),
    "answer_user": ("problem",),
    "answer_user_hinted": ("problem", "hint"),
    "hint_system": (),
    "hint_user": ("problem", "solution"),
}


@dataclass(frozen=True)
class Templates:
    """The five prompt texts of a template set (see templates/paper/)."""

    answer_system: str        # "reason step by step ... \boxed{}"
    answer_user: str          # {problem}
    answer_user_hinted: str   # {problem} + a line introducing the hint + {hint}
    hint_system: str          # tutor role, three levels, never the final answer, JSON format
    hint_user: str            # "Question: {problem}\n\nSolution: {solution}"


def load_templates(directory: str | Path = PAPER_TEMPLATES) -> Templates:
    """Reads ``<name>.txt`` for each template (one trailing newline dropped) and checks placeholders."""
    d = Path(directory)
    texts = {}
    for name, needed in TEMPLATE_PLACEHOLDERS.items():
        path = d / f"{name}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"template set {d} has no {name}.txt (a set needs "
                                    f"{', '.join(n + '.txt' for n in TEMPLATE_PLACEHOLDERS)})")
        text = path.read_text(encoding="utf-8")
        text = text[:-1] if text.endswith("\n") else text
        for placeholder in needed:
            if "{" + placeholder + "}" not in text:
                raise ValueError(f"template {path} lacks the placeholder {{{placeholder}}} "
                                 f"(it needs {', '.join('{' + p + '}' for p in needed)})")
        texts[name] = text
    return Templates(**texts)


def fill(template: str, **values: str) -> str:
    """``template`` with ``{name}`` replaced for each given name, in one pass.

    Values are never re-scanned (a problem containing "{hint}" stays as it is) and other braces
    (LaTeX, JSON examples) are left alone.
    """
    if not values:
        return template
    pattern = re.compile(r"\{(" + "|".join(re.escape(k) for k in values) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


def answer_messages(templates: Templates, *, problem: str, hint: str | None = None) -> list[Message]:
    """[system, user] of the answer prompt; hinted when ``hint`` is given."""
    if hint is None:
        user = fill(templates.answer_user, problem=problem)
    else:
        user = fill(templates.answer_user_hinted, problem=problem, hint=hint)
    return [{"role": "system", "content": templates.answer_system}, {"role": "user", "content": user}]


def hint_messages(templates: Templates, *, problem: str, solution: str) -> list[Message]:
    """[system, user] of the hint-writing prompt (question and reference solution)."""
    user = fill(templates.hint_user, problem=problem, solution=solution)
    return [{"role": "system", "content": templates.hint_system}, {"role": "user", "content": user}]


def chat_encoder(tokenizer: Any, **chat_template_kwargs: Any) -> Encode:
    """An ``Encode`` through a Hugging Face tokenizer's own chat template (generation prompt added).

    The template renders text (``tokenize=False``, so the transformers 4/5 return types do not
    matter), then the text is tokenized without adding special tokens a second time.
    ``chat_template_kwargs`` go to the template (e.g. ``enable_thinking=False`` for Qwen3).
    """
    def encode(messages: list[Message]) -> tuple[int, ...]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **chat_template_kwargs)
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    return encode


# ============================================================================ hint parsing

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.S)
_LEVEL1_OPEN = re.compile(r'\{\s*"level_1"')
_VALID_ESCAPE = re.compile(r'\\(\\|"|/|u[0-9a-fA-F]{4}|[bfnrt](?![a-z]))?')
_MAX_PARSE_CHARS = 200_000
_MAX_CANDIDATES = 64


def parse_hint_json(text: str, *, levels: int = 3) -> dict[int, str] | None:
    """Hints ``{1: ..., L: ...}`` from a model's output, or None when unusable.

    Candidates, in order: fenced ```json blocks; objects starting ``{"level_1"``; then each
    top-level balanced ``{...}``. The first candidate that is a JSON object with non-empty string
    values for every key level_1..level_L wins (extra keys ignored, values stripped). LaTeX written
    with single backslashes ("\\frac", "\\theta": invalid or silently wrong JSON escapes) is repaired
    (see _loads_lenient). Only the last 200k characters are read (hints come at the end, after
    any reasoning).
    """
    text = text[-_MAX_PARSE_CHARS:]
    for candidate in _hint_candidates(text):
        hints = _validated_hints(_loads_lenient(candidate), levels)
        if hints is not None:
            return hints
    return None


def _hint_candidates(text: str) -> Iterator[str]:
    count = 0
    for m in _FENCE.finditer(text):
        yield m.group(1).strip()
        count += 1
    for m in _LEVEL1_OPEN.finditer(text):
        end = _balanced_end(text, m.start(), json_strings=True)
        if end is not None:
            yield text[m.start():end]
        count += 1
        if count >= _MAX_CANDIDATES:
            return
    depth, start = 0, -1
    for i, ch in enumerate(text):  # top-level {...} spans, one linear pass
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                yield text[start:i + 1]
                count += 1
                if count >= _MAX_CANDIDATES:
                    return


def _balanced_end(text: str, start: int, *, json_strings: bool) -> int | None:
    """Index after the ``}`` matching ``text[start] == "{"``; JSON strings are skipped if asked."""
    depth, in_str, i = 0, False, start
    while i < len(text):
        ch = text[i]
        if in_str:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_str = False
        elif ch == '"' and json_strings:
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _loads_lenient(candidate: str) -> Any:
    r"""json.loads of the LaTeX-repaired text when the repair changed anything, else plain json.loads.

    Repair: every backslash that does not start ``\\``, ``\"``, ``\/``, ``\uXXXX`` or a one-letter
    escape ``\b \f \n \r \t`` NOT followed by a lowercase letter is doubled, so "\frac", "\theta",
    "\nu", "\sqrt" survive as LaTeX while "\n" and "\nThe" stay newlines.
    """
    repaired = _VALID_ESCAPE.sub(lambda m: m.group(0) if m.group(1) else "\\\\", candidate)
    for text in ((repaired, candidate) if repaired != candidate else (candidate,)):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            continue
    return None


def _validated_hints(obj: Any, levels: int) -> dict[int, str] | None:
    if not isinstance(obj, dict):
        return None
    hints = {}
    for level in range(1, levels + 1):
        value = obj.get(f"level_{level}")
        if not isinstance(value, str) or not value.strip():
            return None
        hints[level] = value.strip()
    return hints


# ============================================================================ hint sources


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

    def write_hints(self, rows: Mapping[str, PromptRow], *, sampler: Sampler) -> dict[str, HintResult]:
        """One HintResult per key of ``rows``. ``sampler`` is the policy's rollout engine."""
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

    def write_hints(self, rows: Mapping[str, PromptRow], *, sampler: Sampler) -> dict[str, HintResult]:
        engine = self.sampler if self.sampler is not None else sampler
        results = {uid: HintResult() for uid in rows}
        prompt_ids = {uid: self.encode(hint_messages(self.templates, problem=row.problem, solution=row.solution))
                      for uid, row in rows.items()}
        pending = list(rows)
        rounds = [self.sampling] + ([self._retry_sampling()] if self.max_retries else [])
        for attempt, sampling in enumerate(rounds):
            if not pending:
                break
            requests = [RolloutRequest(uid=f"{uid}/hintgen/a{attempt}", prompt_ids=prompt_ids[uid]) for uid in pending]
            outputs = engine.generate(requests, sampling)
            still = []
            for uid, request in zip(pending, requests):
                result = results[uid]
                for sample in outputs.get(request.uid) or []:   # sample order: the first parsable one wins
                    result.attempts += 1
                    result.hints = parse_hint_json(sample.text, levels=self.levels)
                    if result.hints is not None:
                        break
                    result.parse_failures += 1
                if result.hints is None:
                    still.append(uid)
            pending = still
        self.total_parse_failures += sum(r.parse_failures for r in results.values())
        self.total_failed_prompts += len(pending)
        return results

    def _retry_sampling(self) -> SamplingConfig:
        temperature = self.sampling.temperature if self.retry_temperature is None else self.retry_temperature
        seed = None if self.sampling.seed is None else self.sampling.seed + 1
        return replace(self.sampling, n=self.max_retries, temperature=temperature, seed=seed)


class ReferencePrefixHintSource:
    """Hints = prefixes of the reference solution (QuestA / StepHint style); no model call.

    The solution is split into units (non-empty "lines", or "paragraphs" separated by blank lines);
    level l gets the first ceil(f_l * n) units (at least 1), f_l = ``fractions[l-1]``, by default
    l / L. NOTE: with the default f_L = 1 the last level is the whole solution, final answer
    included; pass e.g. fractions=(0.25, 0.5, 0.75) to keep it out.
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

    def write_hints(self, rows: Mapping[str, PromptRow], *, sampler: Sampler | None = None) -> dict[str, HintResult]:
        return {uid: self._hints(row.solution) for uid, row in rows.items()}

    def _hints(self, solution: str) -> HintResult:
        if self.unit == "lines":
            units, joiner = [s for s in solution.split("\n") if s.strip()], "\n"
        else:
            units, joiner = [p.strip() for p in re.split(r"\n\s*\n", solution) if p.strip()], "\n\n"
        if not units:
            return HintResult(hints=None)
        n = len(units)
        counts = [min(n, max(1, math.ceil(f * n - 1e-9))) for f in self.fractions]
        return HintResult(hints={l: joiner.join(units[:k]) for l, k in enumerate(counts, start=1)})


# ============================================================================ rollout core


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


class _Timer:
    """Seconds per phase; the named phases are always reported (0 when skipped) for stable log keys."""

    def __init__(self, *names: str) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(names, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def prompt_uid(step: int, index: int) -> str:
    """The uid of row ``index``'s unhinted group at ``step``."""
    return f"s{step}/r{index}"


def _check_rows(rows: Sequence[PromptRow]) -> None:
    seen: set[int] = set()
    for row in rows:
        if row.index in seen:
            raise ValueError(f"row index {row.index} appears twice in one batch; groups are keyed by it")
        seen.add(row.index)


def _rollout(jobs: Sequence[_Job], *, settings: RolloutSettings, sampler: Sampler, reward_fn: RewardFn,
             timer: _Timer, phase: str) -> dict[str, PromptGroup]:
    """Samples G responses per job, scores them, and returns the groups keyed by job uid."""
    if not jobs:
        return {}
    requests = []
    for job in jobs:
        hint = job.hint_text if job.hint_level > 0 else None
        ids = settings.encode(answer_messages(settings.templates, problem=job.row.problem, hint=hint))
        requests.append(RolloutRequest(uid=job.uid, prompt_ids=ids))
    with timer.phase(phase):
        outputs = sampler.generate(requests, settings.sampling)
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
    return groups


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
        timer = _Timer("rollout", "reward")
        jobs = [_Job(uid=prompt_uid(step, row.index), row=row) for row in rows]
        groups = _rollout(jobs, settings=self.settings, sampler=sampler, reward_fn=reward_fn, timer=timer,
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
    """

    def __init__(self, settings: RolloutSettings, *, hint_source: HintSource, levels: int = 3,
                 trigger: Literal["all_wrong", "threshold"] = "all_wrong", trigger_threshold: float = 0.0,
                 mode: Literal["replace", "mix"] = "replace", mix_count: int = 1,
                 loss_context: Literal["hinted", "original"] = "hinted") -> None:
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

    def triggered(self, rewards: Sequence[float]) -> bool:
        """Whether a group counts as unresolved (and gets hints)."""
        acc = _accuracy(rewards, self.settings.correct_reward)
        return acc == 0.0 if self.trigger == "all_wrong" else acc <= self.trigger_threshold

    def apply(self, rows: Sequence[PromptRow], *, step: int, sampler: Sampler, reward_fn: RewardFn) -> HintingOutput:
        _check_rows(rows)
        cr = self.settings.correct_reward
        timer = _Timer("rollout", "reward", "hint_gen", "hint_rollout")
        row_of = {prompt_uid(step, row.index): row for row in rows}
        base = _rollout([_Job(uid=u, row=r) for u, r in row_of.items()], settings=self.settings, sampler=sampler,
                        reward_fn=reward_fn, timer=timer, phase="rollout")
        solved = {g.row_index for g in base.values() if any(r >= cr for r in g.rewards)}
        unresolved = [u for u in row_of if self.triggered(base[u].rewards)]
        hints: dict[str, HintResult] = {}
        if unresolved:
            with timer.phase("hint_gen"):
                hints = self.hint_source.write_hints({u: row_of[u] for u in unresolved}, sampler=sampler)
        pending = [u for u in unresolved if hints[u].ok]
        metrics: dict[str, float] = {
            "hint/triggered": len(unresolved),
            "hint/source_failed": len(unresolved) - len(pending),
            "hint/parse_failures": sum(h.parse_failures for h in hints.values()),
        }
        last_tried: dict[str, PromptGroup] = {}
        for level in range(1, self.levels + 1):
            jobs = [_Job(uid=f"{u}/h{level}", row=row_of[u], hint_level=level, hint_text=hints[u].hints[level])
                    for u in pending]
            hinted = _rollout(jobs, settings=self.settings, sampler=sampler, reward_fn=reward_fn, timer=timer,
                              phase="hint_rollout")
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
        timer = _Timer("rollout", "reward", "hint_gen")
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
        groups_by_uid = _rollout(jobs, settings=self.settings, sampler=sampler, reward_fn=reward_fn, timer=timer,
                                 phase="rollout")
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
