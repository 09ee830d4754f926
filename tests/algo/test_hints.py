"""Hints: templates, JSON parsing, hint sources, and SAGE / SAGE-light driven by a scripted policy.

The scripted policy stands for the model: it answers problem P<i> correctly (on sample 0 only, so a
solved group has accuracy 1/G) exactly when its prompt holds a hint of level >= need[i], and it writes
hint JSON {"level_l": "HINT-L<l>-P<i>"} when asked with the hint prompt. Every generate call is
recorded, so the tests assert WHICH uids were sampled at each level.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest

from sage_megatron.algo.hint_json import parse_hint_json
from sage_megatron.algo.hint_sources import PolicyHintSource, ReferencePrefixHintSource
from sage_megatron.algo.strategies import GrpoHinting, RolloutSettings, SageHinting, SageLightHinting, SageLightSchedule
from sage_megatron.algo.templates import PAPER_TEMPLATES, answer_messages, fill, hint_messages, load_templates
from sage_megatron.types import PromptRow, RolloutRequest, Sample, SamplingConfig

G = 4
TEMPLATES = load_templates()


def encode(messages):
    """Fake tokenizer: one id per character of "role: content" lines."""
    return tuple(ord(c) for c in "\n".join(f"{m['role']}: {m['content']}" for m in messages))


def decode(ids):
    return "".join(map(chr, ids))


def reward_fn(pairs):
    return [1.0 if text == f"\\boxed{{{answer}}}" else 0.0 for text, answer in pairs]


@dataclass
class ScriptedPolicy:
    need: dict[int, int | None]                            # problem -> lowest hint level that solves it
    bad_hints: set[int] = field(default_factory=set)       # problems whose hint JSON is garbage
    bad_first_attempt: set[int] = field(default_factory=set)  # garbage only on attempt a0
    calls: list[tuple[list[str], SamplingConfig]] = field(default_factory=list)

    def generate(self, requests, sampling):
        self.calls.append(([r.uid for r in requests], sampling))
        out = {}
        for r in reversed(requests):  # replies keyed by uid; order deliberately unrelated to requests
            text = decode(r.prompt_ids)
            p = int(re.search(r"PROBLEM-(\d+)", text).group(1))
            if "Question:" in text:  # the hint-writing prompt
                bad = p in self.bad_hints or (p in self.bad_first_attempt and r.uid.endswith("/a0"))
                reply = "I cannot." if bad else "```json\n" + json.dumps(
                    {f"level_{l}": f"HINT-L{l}-P{p}" for l in (1, 2, 3)}) + "\n```"
                out[r.uid] = [_sample(r, reply, i) for i in range(sampling.n)]
                continue
            m = re.search(r"HINT-L(\d)-P", text)
            level = int(m.group(1)) if m else 0
            solved = self.need.get(p) is not None and level >= self.need[p]
            out[r.uid] = [_sample(r, f"\\boxed{{A{p}}}" if solved and i == 0 else "\\boxed{wrong}", i)
                          for i in range(sampling.n)]
        return out

    def answer_uids(self):
        return [uids for uids, _ in self.calls if not any("/hintgen/" in u for u in uids)]

    def hint_uids(self):
        return [uids for uids, _ in self.calls if any("/hintgen/" in u for u in uids)]


def _sample(request: RolloutRequest, text: str, i: int) -> Sample:
    return Sample(uid=request.uid, prompt_ids=request.prompt_ids, response_ids=[7] * (i + 1), logprobs=[-0.1] * (i + 1),
                  finish_reason="stop", weight_version=0, text=text, sample_index=i)


def rows(*indices):
    return [PromptRow(index=i, problem=f"PROBLEM-{i}: compute it.", solution=f"step one\nstep two\nso A{i}",
                      answer=f"A{i}") for i in indices]


def settings():
    return RolloutSettings(templates=TEMPLATES, encode=encode, sampling=SamplingConfig(n=G))


def hint_source(**kw):
    return PolicyHintSource(templates=TEMPLATES, encode=encode, **kw)


# ============================================================================ templates


def test_paper_templates_and_messages():
    assert "{problem}" in TEMPLATES.answer_user and "{hint}" in TEMPLATES.answer_user_hinted
    assert "\\boxed{}" in TEMPLATES.answer_system
    assert "level_1" in TEMPLATES.hint_system and "never reveal the final answer" in TEMPLATES.hint_system.lower()
    msgs = answer_messages(TEMPLATES, problem="What is 2+2?", hint="Add.")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[1]["content"] == "What is 2+2?\n\nHere is a hint to help you solve the problem:\nAdd."
    assert hint_messages(TEMPLATES, problem="Q", solution="S")[1]["content"] == "Question: Q\n\nSolution: S"


def test_fill_is_single_pass_and_leaves_other_braces():
    # a problem that itself contains "{hint}" must not get the hint spliced in
    assert fill("{problem} | {hint} | \\frac{a}{b}", problem="x{hint}", hint="H") == "x{hint} | H | \\frac{a}{b}"


def test_load_templates_errors(tmp_path):
    for f in PAPER_TEMPLATES.glob("*.txt"):
        (tmp_path / f.name).write_text(f.read_text())
    (tmp_path / "hint_user.txt").write_text("Question: {problem}\n")
    with pytest.raises(ValueError, match=r"hint_user\.txt lacks the placeholder \{solution\}"):
        load_templates(tmp_path)
    (tmp_path / "answer_user_hinted.txt").unlink()
    with pytest.raises(FileNotFoundError, match="has no answer_user_hinted.txt"):
        load_templates(tmp_path)


# ============================================================================ parsing


@pytest.mark.parametrize("text, expected", [
    ('```json\n{"level_1": "a", "level_2": "b", "level_3": "c"}\n```', {1: "a", 2: "b", 3: "c"}),
    ('Sure! {"level_1": " a ", "level_2": "b", "level_3": "c", "note": 1} Done.', {1: "a", 2: "b", 3: "c"}),
    # prose braces before the object are skipped
    ('Let {x} be... then {"level_1": "a", "level_2": "b", "level_3": "c"}', {1: "a", 2: "b", 3: "c"}),
    # LaTeX with single backslashes: \frac is invalid-ish JSON, \theta would decode as TAB + "heta"
    ('{"level_1": "use \\frac{1}{2}", "level_2": "angle \\theta", "level_3": "c"}',
     {1: "use \\frac{1}{2}", 2: "angle \\theta", 3: "c"}),
    ('{"level_1": "a", "level_2": "", "level_3": "c"}', None),          # empty level
    ('{"level_1": "a", "level_2": "b"}', None),                          # missing level_3
    ('{"level_1": "a", "level_2": "b", "level_3": 3}', None),            # not a string
    ("no json at all", None),
])
def test_parse_hint_json(text, expected):
    assert parse_hint_json(text) == expected


# ============================================================================ hint sources


def test_policy_hint_source_retries_only_failures():
    policy = ScriptedPolicy(need={}, bad_hints={2}, bad_first_attempt={1})
    src = hint_source(max_retries=2)
    out = src.write_hints({"u0": rows(0)[0], "u1": rows(1)[0], "u2": rows(2)[0]}, sampler=policy)
    # a0: all three, greedy; a1: the two that failed (1, 2), both retries drawn at once (n=2) at the
    # retry temperature; 1 parses at its first retry sample, 2 never
    assert policy.hint_uids() == [["u0/hintgen/a0", "u1/hintgen/a0", "u2/hintgen/a0"],
                                  ["u1/hintgen/a1", "u2/hintgen/a1"]]
    assert [(s.temperature, s.n) for _, s in policy.calls] == [(0.0, 1), (0.7, 2)]
    assert out["u0"].hints == {1: "HINT-L1-P0", 2: "HINT-L2-P0", 3: "HINT-L3-P0"}
    assert (out["u1"].ok, out["u1"].attempts, out["u1"].parse_failures) == (True, 2, 1)
    assert (out["u2"].ok, out["u2"].attempts, out["u2"].parse_failures) == (False, 3, 3)
    assert (src.total_parse_failures, src.total_failed_prompts) == (4, 1)


def test_policy_hint_source_with_its_own_sampler():
    frozen, policy = ScriptedPolicy(need={}), ScriptedPolicy(need={})
    out = hint_source(sampler=frozen).write_hints({"u": rows(0)[0]}, sampler=policy)
    assert out["u"].ok and len(frozen.calls) == 1 and policy.calls == []


def test_reference_prefix_source():
    # lines (blank ones dropped): [a, b, c, d], n = 4; fractions 1/3, 2/3, 1 -> ceil(4/3)=2, ceil(8/3)=3, 4
    row = PromptRow(index=0, problem="p", solution="a\nb\nc\n\nd", answer="x")
    out = ReferencePrefixHintSource().write_hints({"u": row}, sampler=None)["u"]
    assert out.hints == {1: "a\nb", 2: "a\nb\nc", 3: "a\nb\nc\nd"}
    # paragraphs: [p1 (2 lines), p2, p3]; custom fractions 0.25, 0.5, 0.75 of 3 -> ceil(0.75)=1,
    # ceil(1.5)=2, ceil(2.25)=3 capped at 2: a fraction below 1 never hands over the whole solution
    row = PromptRow(index=0, problem="p", solution="p1\np1b\n\np2\n\n\np3", answer="x")
    out = ReferencePrefixHintSource(unit="paragraphs", fractions=(0.25, 0.5, 0.75)).write_hints({"u": row})["u"]
    assert out.hints == {1: "p1\np1b", 2: "p1\np1b\n\np2", 3: "p1\np1b\n\np2"}
    # a one-line solution ("12 + 7 = 19.") has no prefix short of the answer: no hints with fractions < 1
    one = PromptRow(index=0, problem="p", solution="12 + 7 = 19.", answer="19")
    assert not ReferencePrefixHintSource(fractions=(0.25, 0.5, 0.75)).write_hints({"u": one})["u"].ok
    assert ReferencePrefixHintSource().write_hints({"u": one})["u"].hints[3] == "12 + 7 = 19."
    empty = PromptRow(index=0, problem="p", solution="  \n", answer="x")
    assert not ReferencePrefixHintSource().write_hints({"u": empty})["u"].ok


# ============================================================================ GRPO


def test_grpo_hinting_is_one_rollout():
    policy = ScriptedPolicy(need={0: 0, 1: None})
    out = GrpoHinting(settings()).apply(rows(0, 1), step=3, sampler=policy, reward_fn=reward_fn)
    assert policy.answer_uids() == [["s3/r0", "s3/r1"]] and len(policy.calls) == 1
    assert [g.uid for g in out.groups] == ["s3/r0", "s3/r1"]
    assert out.groups[0].rewards == [1.0, 0.0, 0.0, 0.0]
    assert out.metrics["acc/before_hints"] == 1 / 8   # 1 correct of 2 groups x 4
    assert out.solved_rows == {0}


# ============================================================================ SAGE online

# need: P0 solved unhinted, P1 at level 1, P2 at level 2, P3 never, P4 never but its hint JSON is garbage,
# P5 at level 3
NEED = {0: 0, 1: 1, 2: 2, 3: None, 4: None, 5: 3}


@dataclass
class BatchingPolicy(ScriptedPolicy):
    """The scripted policy with the pool's ``generate_batches``: one recorded call for several batches."""

    def generate_batches(self, batches):
        out = {}
        for requests, sampling in batches:
            out.update(super().generate(requests, sampling))
            del self.calls[-1]
        self.calls.append(([r.uid for requests, _ in batches for r in requests], None))
        return out


def run_sage(policy_cls=ScriptedPolicy, **kw):
    policy = policy_cls(need=NEED, bad_hints={4})
    sage = SageHinting(settings(), hint_source=hint_source(max_retries=2), **kw)
    return policy, sage.apply(rows(0, 1, 2, 3, 4, 5), step=7, sampler=policy, reward_fn=reward_fn)


def test_hints_drawn_ahead_give_the_groups_of_hints_written_after():
    """speculative_hints: the hints of all rows ride in the unhinted rollout's call; what is trained on
    and every metric but the count of hints written ahead equal the hints-after run."""
    after_policy, after = run_sage(speculative_hints=False)
    ahead_policy, ahead = run_sage(BatchingPolicy, speculative_hints=True)
    rows_ = ["s7/r0", "s7/r1", "s7/r2", "s7/r3", "s7/r4", "s7/r5"]
    assert ahead_policy.calls[0][0] == rows_ + [f"{u}/hintgen/a0" for u in rows_]
    assert ahead_policy.hint_uids()[1:] == [["s7/r4/hintgen/a1"]]   # the retry, only for the row that needs it
    assert ahead_policy.answer_uids() == after_policy.answer_uids()[1:]   # then the levels, as without
    assert len(ahead_policy.calls) == len(after_policy.calls) - 1
    assert [(g.uid, g.prompt_ids, g.rewards, g.hint_text) for g in ahead.groups] == \
        [(g.uid, g.prompt_ids, g.rewards, g.hint_text) for g in after.groups]
    assert ahead.solved_rows == after.solved_rows
    same = {k: v for k, v in after.metrics.items() if k.startswith(("hint/", "acc/")) and k != "hint/written_ahead"}
    assert len(same) == 15 and {k: ahead.metrics[k] for k in same} == same
    assert (after.metrics["hint/written_ahead"], ahead.metrics["hint/written_ahead"]) == (0, 6)
    # a sampler without generate_batches gets the same batches one call each, in the same order
    plain_policy, plain = run_sage(speculative_hints=True)
    assert [uids for uids, _ in plain_policy.calls[:3]] == [rows_, [f"{u}/hintgen/a0" for u in rows_],
                                                              ["s7/r4/hintgen/a1"]]
    assert [g.uid for g in plain.groups] == [g.uid for g in after.groups]


def test_levels_drawn_ahead_give_the_groups_of_levels_drawn_one_by_one():
    """speculative_levels: levels 1..L of every hinted prompt in ONE call; escalation reads them in order
    and stops where the level-by-level run stops: same groups, same metrics, only reached levels scored."""
    one_by_one_policy, one_by_one = run_sage(speculative_hints=False)
    scored = []

    def counting_reward(pairs):
        scored.append(len(pairs))
        return reward_fn(pairs)

    policy = ScriptedPolicy(need=NEED, bad_hints={4})
    sage = SageHinting(settings(), hint_source=hint_source(max_retries=2), speculative_hints=False,
                       speculative_levels=True)
    ahead = sage.apply(rows(0, 1, 2, 3, 4, 5), step=7, sampler=policy, reward_fn=counting_reward)
    hinted = ["s7/r1", "s7/r2", "s7/r3", "s7/r5"]          # P4's hint never parses: not re-sampled
    assert policy.answer_uids() == [one_by_one_policy.answer_uids()[0],
                                    [f"{u}/h{level}" for level in (1, 2, 3) for u in hinted]]
    assert policy.hint_uids() == one_by_one_policy.hint_uids()
    assert [(g.uid, g.prompt_ids, g.rewards, g.hint_text) for g in ahead.groups] == \
        [(g.uid, g.prompt_ids, g.rewards, g.hint_text) for g in one_by_one.groups]
    assert ahead.solved_rows == one_by_one.solved_rows
    same = {k: v for k, v in one_by_one.metrics.items() if k.startswith(("hint/", "acc/"))}
    assert len(same) == 16 and {k: ahead.metrics[k] for k in same} == same
    # 4 prompts x 3 levels drawn; escalation reached 4 + 3 + 2 groups, and scored only those
    assert ahead.metrics["hint/groups_drawn_unused"] == 3 and "hint/groups_drawn_unused" not in one_by_one.metrics
    assert scored == [6 * G, 4 * G, 3 * G, 2 * G]


def test_sage_escalates_only_the_unresolved_subset():
    policy, out = run_sage(speculative_hints=False)
    # unhinted rollout of all; hints for the 5 unresolved (P4 retried: 2 samples, one call); then only the unresolved
    assert policy.answer_uids() == [
        ["s7/r0", "s7/r1", "s7/r2", "s7/r3", "s7/r4", "s7/r5"],
        ["s7/r1/h1", "s7/r2/h1", "s7/r3/h1", "s7/r5/h1"],          # P4 has no hint: not re-sampled
        ["s7/r2/h2", "s7/r3/h2", "s7/r5/h2"],                      # P1 resolved at level 1
        ["s7/r3/h3", "s7/r5/h3"],                                  # P2 resolved at level 2
    ]
    assert policy.hint_uids() == [["s7/r1/hintgen/a0", "s7/r2/hintgen/a0", "s7/r3/hintgen/a0",
                                   "s7/r4/hintgen/a0", "s7/r5/hintgen/a0"],
                                  ["s7/r4/hintgen/a1"]]
    # final groups, in row order: P0 unhinted, P1..P2 at their solving level, P3 keeps level 3 (all wrong),
    # P4 keeps its unhinted group, P5 at level 3
    assert [g.uid for g in out.groups] == ["s7/r0", "s7/r1/h1", "s7/r2/h2", "s7/r3/h3", "s7/r4", "s7/r5/h3"]
    assert [g.hint_level for g in out.groups] == [0, 1, 2, 3, 0, 3]
    assert [g.rewards for g in out.groups] == [[1.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0], [0.0] * 4,
                                               [0.0] * 4, [1.0, 0, 0, 0]]
    p2 = out.groups[2]
    assert p2.hint_text == "HINT-L2-P2" and "HINT-L2-P2" in decode(p2.prompt_ids)
    assert all(s.prompt_ids == p2.prompt_ids and s.uid == p2.uid for s in p2.samples)
    assert p2.unhinted_prompt_ids == ()                        # loss context "hinted"
    m = out.metrics
    assert (m["hint/triggered"], m["hint/source_failed"], m["hint/parse_failures"]) == (5, 1, 3)
    assert (m["hint/hinted_l1"], m["hint/solved_l1"], m["hint/success_rate_l1"]) == (4, 1, 1 / 4)
    assert (m["hint/hinted_l2"], m["hint/solved_l2"], m["hint/success_rate_l2"]) == (3, 1, 1 / 3)
    assert (m["hint/hinted_l3"], m["hint/solved_l3"], m["hint/success_rate_l3"]) == (2, 1, 1 / 2)
    assert m["hint/unresolved_after"] == 1
    assert m["acc/before_hints"] == 1 / 24                    # only P0: 1 of 6 x 4
    assert m["acc/after_hints"] == 4 / 24                     # P0, P1, P2, P5 one each
    assert out.solved_rows == {0, 1, 2, 5}
    assert {"time/rollout", "time/reward", "time/hint_gen", "time/hint_rollout"} <= set(m)


def test_sage_original_loss_context_keeps_unhinted_prompt():
    _, out = run_sage(loss_context="original")
    p1 = out.groups[1]
    assert "HINT-L1-P1" in decode(p1.prompt_ids)
    assert decode(p1.unhinted_prompt_ids) == decode(encode(answer_messages(TEMPLATES, problem=rows(1)[0].problem)))
    assert out.groups[0].unhinted_prompt_ids == ()            # unhinted groups need no correction


def test_sage_mix_mode_injects_correct_hinted_samples():
    policy, out = run_sage(mode="mix", mix_count=1)
    assert len(policy.answer_uids()) == 4                     # same escalation as replace mode
    p1 = out.groups[1]
    # P1 keeps its uid and unhinted group; the correct level-1 sample replaces the lowest-reward slot
    # (all 0 -> the last position, 3)
    assert p1.uid == "s7/r1" and p1.hint_level == 1 and p1.rewards == [0.0, 0.0, 0.0, 1.0]
    assert "HINT-L1-P1" in decode(p1.samples[3].prompt_ids) and p1.samples[3].sample_index == 3
    assert "HINT" not in decode(p1.samples[0].prompt_ids) and "HINT" not in decode(p1.prompt_ids)
    p3 = out.groups[3]                                        # no correct hinted sample: unchanged
    assert p3.uid == "s7/r3" and p3.hint_level == 0
    assert out.metrics["hint/mixed_samples"] == 3             # P1, P2, P5


def test_sage_threshold_trigger():
    # accuracy <= 0.3 triggers. P0 solved unhinted with 1/4 = 0.25 -> triggered; hints keep it at 0.25,
    # so it is re-sampled at every level and keeps level 3. With all_wrong it would not be touched.
    policy = ScriptedPolicy(need={0: 0})
    sage = SageHinting(settings(), hint_source=hint_source(), trigger="threshold", trigger_threshold=0.3)
    out = sage.apply(rows(0), step=0, sampler=policy, reward_fn=reward_fn)
    assert policy.answer_uids() == [["s0/r0"], ["s0/r0/h1"], ["s0/r0/h2"], ["s0/r0/h3"]]
    assert out.groups[0].uid == "s0/r0/h3" and out.metrics["hint/unresolved_after"] == 1
    assert out.solved_rows == {0}


def test_sage_rejects_bad_options_and_duplicate_rows():
    with pytest.raises(ValueError, match="mode must be one of"):
        SageHinting(settings(), hint_source=hint_source(), mode="blend")
    with pytest.raises(ValueError, match="2 levels"):
        SageHinting(settings(), hint_source=hint_source(levels=2))
    with pytest.raises(ValueError, match="appears twice"):
        SageHinting(settings(), hint_source=hint_source()).apply(rows(1, 1), step=0, sampler=ScriptedPolicy({}),
                                                                 reward_fn=reward_fn)


# ============================================================================ SAGE-light


def test_schedule_transitions_reference_rule():
    s = SageLightSchedule()          # min 0.1, max 0.35, L = 3
    assert s.plan(7) == 0            # first visit: no hint
    steps = [  # (level recorded, accuracy) -> expected next plan
        ((0, 0.0), 1),               # 0 <= 0.1 -> 0+1
        ((1, 0.125), 1),             # 0.1 < 0.125 <= 0.35 -> keep
        ((1, 0.1), 2),               # 0.1 <= 0.1 -> escalate (inclusive)
        ((2, 0.0), 3),
        ((3, 0.0), 3),               # capped at L
        ((3, 0.35), 3),              # 0.35 is not > 0.35 -> keep
        ((3, 0.5), 2),               # 0.5 > 0.35 -> 3-1
        ((0, 1.0), 0),               # floored at 0
    ]
    for (level, acc), expected in steps:
        s.record(7, level=level, accuracy=acc)
        assert s.plan(7) == expected, (level, acc)


def test_schedule_paper_rule_only_escalates():
    s = SageLightSchedule.paper()    # alpha = 0.35
    s.record(1, level=0, accuracy=0.35)
    assert s.plan(1) == 1            # 0.35 <= 0.35 -> escalate
    s.record(1, level=1, accuracy=0.9)
    assert s.plan(1) == 1            # never de-escalates


def test_schedule_state_round_trip_through_json():
    s = SageLightSchedule()
    s.record(3, level=1, accuracy=0.0, hints={1: "h1", 2: "h2", 3: "h3"})
    s.record(3, level=2, accuracy=0.0, hints=None)            # a failed hint keeps the last good ones
    s.record(9, level=0, accuracy=0.5)
    t = SageLightSchedule()
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert (t.plan(3), t.plan(9), t.plan(4)) == (3, 0, 0)
    assert t.fallback_hint(3, 2) == "h2" and t.fallback_hint(9, 1) is None
    with pytest.raises(ValueError, match="hint levels"):
        SageLightSchedule(levels=2).load_state_dict(s.state_dict())


def test_sage_light_over_three_visits_with_fallback_and_resume():
    # P0 solved unhinted (acc 0.25), P1 needs level 2, P2 never, P3 needs level 1 and its hint JSON
    # breaks from the third visit on (fallback to the hint kept from the second)
    policy = ScriptedPolicy(need={0: 0, 1: 2, 2: None, 3: 1})
    make = lambda: SageLightHinting(settings(), hint_source=hint_source(max_retries=1),  # noqa: E731
                                    schedule=SageLightSchedule())
    light = make()
    batch = rows(0, 1, 2, 3)
    out0 = light.apply(batch, step=0, sampler=policy, reward_fn=reward_fn)
    # visit 1: every level 0, one rollout, no hint call
    assert policy.calls and len(policy.calls) == 1
    assert [g.uid for g in out0.groups] == ["s0/r0", "s0/r1", "s0/r2", "s0/r3"]
    out1 = light.apply(batch, step=1, sampler=policy, reward_fn=reward_fn)
    # visit 2: P0 acc 0.25 in (0.1, 0.35] keeps 0; the others had 0 -> level 1; hints then ONE rollout
    assert policy.hint_uids()[-1] == ["s1/r1/hintgen/a0", "s1/r2/hintgen/a0", "s1/r3/hintgen/a0"]
    assert policy.answer_uids()[-1] == ["s1/r0", "s1/r1/h1", "s1/r2/h1", "s1/r3/h1"]
    assert [g.rewards[0] for g in out1.groups] == [1.0, 0.0, 0.0, 1.0]
    assert out1.metrics["hint/level_l1"] == 3 and out1.metrics["hint/success_rate_l1"] == 1 / 3
    state = json.loads(json.dumps(light.state_dict()))

    policy.bad_hints = {3}
    out2 = light.apply(batch, step=2, sampler=policy, reward_fn=reward_fn)
    # visit 3: P1, P2 had 0 at level 1 -> 2; P3 had 0.25 at level 1 -> keep 1, hint from the fallback
    assert policy.answer_uids()[-1] == ["s2/r0", "s2/r1/h2", "s2/r2/h2", "s2/r3/h1"]
    assert out2.groups[3].hint_text == "HINT-L1-P3" and out2.groups[1].rewards[0] == 1.0
    m = out2.metrics
    assert (m["hint/fallback_used"], m["hint/source_failed"], m["hint/parse_failures"]) == (1, 0, 2)
    assert (m["hint/level_l0"], m["hint/level_l1"], m["hint/level_l2"]) == (1, 1, 2)
    assert m["hint/success_rate_l2"] == 1 / 2 and m["acc/before_hints"] == 1 / 4

    # resume from the state after visit 2: the same visit 3
    resumed_policy = ScriptedPolicy(need=policy.need, bad_hints={3})
    resumed = make()
    resumed.load_state_dict(state)
    again = resumed.apply(batch, step=2, sampler=resumed_policy, reward_fn=reward_fn)
    assert [g.uid for g in again.groups] == [g.uid for g in out2.groups]
    assert [g.hint_text for g in again.groups] == [g.hint_text for g in out2.groups]
    assert resumed.state_dict() == light.state_dict()


def test_sage_light_original_context_and_unrecoverable_hint():
    policy = ScriptedPolicy(need={0: 1}, bad_hints={0})
    light = SageLightHinting(settings(), hint_source=hint_source(max_retries=0), schedule=SageLightSchedule(),
                             loss_context="original")
    light.apply(rows(0), step=0, sampler=policy, reward_fn=reward_fn)
    out = light.apply(rows(0), step=1, sampler=policy, reward_fn=reward_fn)
    # planned level 1, no parsable hint and no fallback -> rolled out unhinted this time
    assert out.groups[0].uid == "s1/r0" and out.metrics["hint/source_failed"] == 1
    assert light.schedule.plan(0) == 2       # the planned level 1 was recorded with acc 0
    policy.bad_hints = set()
    out = light.apply(rows(0), step=2, sampler=policy, reward_fn=reward_fn)
    g = out.groups[0]
    assert g.uid == "s2/r0/h2" and "HINT" not in decode(g.unhinted_prompt_ids)
