"""The toy task generator, checked against an independent evaluator of the problem text.

Design note (why the task is a *cycle* of operations): the first version gave each step its own
labelled operation ("5 a+3 b*7 c-4", line "8 b*7=6"). Finding step j's operation then needs a
content search (an induction head); a 0.14-0.33M-parameter policy trained for 1,500 steps (the CPU
budget) copied the operation wrongly in most long problems, greedy (first wrong token: operation
lookup 114 / value copy 75 of 200 problems), and even the level-3 hint rescued under 25% of the
6-8 step items. With a fixed cycle and a countdown every input of a line is at a fixed distance.
"""
from __future__ import annotations

import json
import random
import re

import pytest

from sage_megatron.algo.hint_json import parse_hint_json
from sage_megatron.algo.reward import extract_last_boxed, integer_reward
from sage_megatron.algo.templates import answer_messages, hint_messages, load_templates
from sage_megatron.tasks import toy_task


def independent_eval(problem: str) -> tuple[int, list[int]]:
    """Evaluate "5 +3 *7 -2 n=4" with Python's own arithmetic: (answer, intermediate values)."""
    *tokens, n = problem.split(" ")
    start, cycle = int(tokens[0]), tokens[1:]
    assert n.startswith("n=")
    value, values = start, []
    for j in range(int(n[2:])):
        value = eval(f"({value}){cycle[j % len(cycle)]}") % 10
        values.append(value)
    return value, values


@pytest.fixture(scope="module")
def rows():
    return toy_task.generate_rows(400, seed=7, steps=range(1, 11))


def test_rows_match_independent_arithmetic(rows):
    for row in rows:
        answer, values = independent_eval(row["problem"])
        assert row["answer"] == str(answer)
        lines = row["solution"].split("\n")
        assert len(lines) == row["steps"] == len(values)
        cycle = row["problem"].split()[1:-1]
        prev = int(row["problem"].split()[0])
        for j, (line, v) in enumerate(zip(lines, values)):
            m = re.fullmatch(r"(\d): (\d)([-+*]\d)=(\d)", line)
            assert m, line
            assert int(m.group(1)) == row["steps"] - 1 - j           # countdown: steps left
            assert m.group(3) == cycle[j % len(cycle)]
            assert int(m.group(2)) == prev and int(m.group(4)) == v
            prev = v
        assert set(row) == {"index", "problem", "solution", "answer", "steps"}
        start, cyc, steps = toy_task.parse_problem(row["problem"])
        assert toy_task.make_row(row["index"], start, cyc, steps) == row


def test_every_op_is_a_bijection_so_one_wrong_step_is_always_wrong(rows):
    """The difficulty argument: changing any one intermediate value changes the final answer."""
    ops = {(line[4], int(line[5])) for r in rows for line in r["solution"].split("\n")}
    assert {op for op, _ in ops} == {"+", "-", "*"}
    for op, d in ops:
        assert sorted(toy_task.apply_op(v, op, d) for v in range(10)) == list(range(10)), (op, d)


def test_deterministic_and_seed_dependent():
    a = toy_task.generate_rows(50, seed=3)
    assert a == toy_task.generate_rows(50, seed=3)
    assert a != toy_task.generate_rows(50, seed=4)
    assert [r["index"] for r in a] == list(range(50))
    assert len({r["problem"] for r in a}) == 50


def test_steps_is_the_difficulty_knob():
    rows = toy_task.generate_rows(300, seed=0, steps=(2, 5), weights=(1, 2))
    counts = {k: sum(r["steps"] == k for r in rows) for k in (2, 5)}
    assert counts[2] + counts[5] == 300 and counts[5] > counts[2] > 50
    with pytest.raises(ValueError, match="distinct problems"):
        toy_task.generate_rows(10_000, seed=0, steps=(1,), spec=toy_task.ToyTaskSpec(cycle=1))  # 10 * 21 exist


def test_splits_are_disjoint_and_heldout_is_balanced_and_interleaved():
    splits = toy_task.make_splits(seed=1, n_train=300, n_heldout=64)
    train, held = splits["train"], splits["heldout"]
    assert [r["steps"] for r in held] == list(range(1, 9)) * 8          # every prefix is balanced
    assert [r["index"] for r in held] == list(range(64))
    assert len({r["problem"] for r in held}) == 64
    assert {r["steps"] for r in train} == set(range(1, 9))
    assert not {r["problem"] for r in train} & {r["problem"] for r in held}
    assert splits == toy_task.make_splits(seed=1, n_train=300, n_heldout=64)


def test_hints_are_windows_before_the_final_line_leaving_4_minus_l_steps(rows):
    for row in rows:
        lines = row["solution"].split("\n")
        k = row["steps"]
        levels = toy_task.hint_levels(row)
        assert list(levels) == ["level_1", "level_2", "level_3"]
        assert parse_hint_json(toy_task.hint_json(row)) == {i: levels[k] for i, k in enumerate(toy_task.HINT_KEYS, 1)}
        for level, key in enumerate(toy_task.HINT_KEYS, start=1):
            hint = levels[key]
            left = 4 - level                                    # steps the hint leaves to compute
            if k <= left:                                       # nothing to reveal: the first operation
                assert hint == lines[0].split("=")[0] + "=?"
                assert not hint.endswith("=" + row["answer"])
                continue
            got = hint.split("\n")
            end = k - left
            assert got == lines[max(0, end - level): end]      # a run of solution lines ...
            assert lines[-1] not in got[-1:] or k == 1         # ... never the final line
            assert len(got) == min(level, end)
        if k >= 4:                                              # long items: nested windows
            assert levels["level_3"].startswith(levels["level_2"]) and \
                levels["level_2"].startswith(levels["level_1"])


def test_hinted_response_continues_after_the_hint(rows):
    for row in rows[:150]:
        full = toy_task.target_response(row)
        assert full == row["solution"] + "\n\\boxed{" + row["answer"] + "}"
        for level, hint in enumerate(toy_task.hint_levels(row).values(), start=1):
            cont = toy_task.target_response(row, hint=hint)
            if hint.endswith("=?"):
                assert cont == full
            else:
                assert cont.count("\n") == 4 - level                  # 4 - l steps, then the box
                assert full.endswith(hint + "\n" + cont)
            assert integer_reward(cont, row["answer"]) == 1.0


def test_sloppy_response_slips_propagate_and_rate_holds(rows):
    rng = random.Random(0)
    for row in rows[:50]:
        assert toy_task.sloppy_response(row, rng, slip_rate=0.0) == toy_task.target_response(row)
        hint = toy_task.hint_levels(row)["level_3"]
        assert toy_task.sloppy_response(row, rng, slip_rate=0.0, hint=hint) == \
            toy_task.target_response(row, hint=hint)
    slips = steps = 0
    for row in rows:
        text = toy_task.sloppy_response(row, rng, slip_rate=0.3)
        lines = text.split("\n")
        start, cycle, n = toy_task.parse_problem(row["problem"])
        value = start
        for j, line in enumerate(lines[:-1]):
            m = re.fullmatch(r"(\d): (\d)([-+*])(\d)=(\d)", line)
            assert int(m.group(2)) == value                      # continues from what was written
            correct = toy_task.apply_op(value, m.group(3), int(m.group(4)))
            value = int(m.group(5))
            slips += value != correct
            steps += 1
        assert lines[-1] == f"\\boxed{{{value}}}"
        assert (integer_reward(text, row["answer"]) == 1.0) == (value == int(row["answer"]))
    assert 0.25 < slips / steps < 0.35, slips / steps


def test_toy_hint_json_variants_through_the_trainers_parser():
    good = {"level_1": "x", "level_2": "y", "level_3": "z"}
    want = {1: "x", 2: "y", 3: "z"}
    assert parse_hint_json("noise " + json.dumps(good) + " tail") == want
    assert parse_hint_json("```json\n" + json.dumps(good) + "\n```") == want
    assert parse_hint_json('{"level_1": "a", "level_2": "b"}') is None
    assert parse_hint_json('{"level_1": "a", ') is None
    assert parse_hint_json("") is None


def test_grade_and_boxed_extraction():
    assert extract_last_boxed(r"\boxed{1} then \boxed{{2}}") == "{2}"
    assert extract_last_boxed(r"\boxed{3") is None
    assert integer_reward("a 1+2=3\n\\boxed{3}", "3") == 1.0
    assert integer_reward("\\boxed{03}", "3") == 1.0
    assert integer_reward("\\boxed{ 3 }", "3") == 1.0
    assert integer_reward("\\boxed{4}", "3") == 0.0
    assert integer_reward("3", "3") == 0.0
    assert integer_reward("\\boxed{3x}", "3") == 0.0
    assert integer_reward("\\boxed{" + "9" * 100_000 + "}", "3") == 0.0


def test_grade_agrees_with_math_verify():
    """The trainer's reward compares boxed answers with math-verify; ours must agree on toy outputs."""
    import math_verify

    rng = random.Random(0)
    cases = [(f"x\n\\boxed{{{g}}}", str(a)) for a in range(10) for g in ("0", str(a), str((a + 1) % 10),
                                                                          f"0{a}", "-1")]
    cases += [("no box", "3"), ("\\boxed{}", "3")]
    rng.shuffle(cases)
    for response, answer in cases:
        gold = math_verify.parse(f"${answer}$")
        pred = math_verify.parse(response)
        mv = float(bool(pred) and math_verify.verify(gold, pred))
        assert integer_reward(response, answer) == mv, (response, answer)


def test_jsonl_round_trip(tmp_path, rows):
    path = toy_task.write_jsonl(tmp_path / "sub" / "train.jsonl", rows)
    assert toy_task.read_jsonl(path) == rows
    paths = toy_task.write_default_dataset(tmp_path / "ds", seed=2, n_train=40, n_heldout=10)
    assert len(toy_task.read_jsonl(paths["train"])) == 40
    assert len(toy_task.read_jsonl(paths["heldout"])) == 8        # 10 // 8 per step count


def test_templates_render_and_round_trip_through_the_char_tokenizer():
    from sage_megatron.testing.tiny_models import build_char_tokenizer

    tok = build_char_tokenizer()
    templates = load_templates(toy_task.TEMPLATE_DIR)
    row = toy_task.generate_rows(1, seed=0, steps=(8,))[0]
    hint = toy_task.hint_levels(row)["level_3"]
    for messages, completion in [
        (answer_messages(templates, problem=row["problem"]), toy_task.target_response(row)),
        (answer_messages(templates, problem=row["problem"], hint=hint), toy_task.target_response(row, hint=hint)),
        (hint_messages(templates, problem=row["problem"], solution=row["solution"]), toy_task.hint_json(row)),
    ]:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert "{problem}" not in text and "{hint}" not in text and "{solution}" not in text
        assert row["problem"] in text
        ids = tok.encode(text + completion, add_special_tokens=False)
        assert tok.decode(ids) == text + completion              # every character is in the vocabulary
        assert len(ids) < 400                                     # fits the tiny model's context (512)


def test_parse_problem_rejects_garbage():
    with pytest.raises(ValueError, match="not a toy problem"):
        toy_task.parse_problem("5 a+3 b*7")


def test_integer_reward_agrees_with_the_trainers_math_verify_reward():
    from sage_megatron.algo import reward

    pairs = [(f"0: 1+1=2\n\\boxed{{{g}}}", "2") for g in ("2", "02", "3", "", "x")] + [("no box", "2")]
    assert [integer_reward(r, a) for r, a in pairs] == reward.batch_math_reward(pairs)
