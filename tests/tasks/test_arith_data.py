"""The generated arithmetic word problems (the SmolLM2 config's data), checked by re-doing the arithmetic."""
from __future__ import annotations

import re

import pytest

from sage_megatron.tasks.arith_data import SETS, make_rows, write_arith_set


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_solution_step_and_answer_is_right(name):
    max_number = SETS[name]
    rows = make_rows(200, seed=3, max_number=max_number)
    assert [r["index"] for r in rows] == list(range(200))
    assert {r["steps"] for r in rows} == {0, 1, 2, 3}
    for r in rows:
        if r["steps"] == 0:                                # "What is a + b?"
            a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", r["problem"]).groups())
            assert r["answer"] == str(a + b) and r["solution"] == f"{a} + {b} = {a + b}."
            assert 2 <= a <= max_number and 2 <= b <= max_number
            continue
        lines = r["solution"].split("\n")
        start = int(re.search(r"starts with (\d+)", lines[0]).group(1))
        assert f"has {start} " in r["problem"] and r["problem"].endswith("have now?") and start <= max_number
        value = start
        for line in lines[1:-1]:
            m = re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)\.$", line)
            if m is None:                                  # "counts again: still N"
                assert line.endswith(f"still {value}.")
                continue
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert a == value
            exact = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
            assert exact == c, line                        # divisions are exact
            assert op != "+" or b <= max_number, line
            value = c
        assert r["answer"] == str(value) and lines[-1].endswith(f"has {value} {lines[-1].split()[-1]}")
        assert len(lines) == r["steps"] + 2 and 0 < value < 1000


def test_deterministic_in_seed_and_written_as_jsonl(tmp_path):
    import json

    from sage_megatron.tasks.arith_data import make_heldout_rows

    assert make_rows(20, seed=1) == make_rows(20, seed=1) != make_rows(20, seed=2)
    paths = write_arith_set(tmp_path / "a", name="arith_small", seed=1, train_n=10, heldout_n=4)
    assert [json.loads(line) for line in paths["train"].read_text().splitlines()] == make_rows(10, seed=1,
                                                                                                max_number=12)
    assert ([json.loads(line) for line in paths["heldout"].read_text().splitlines()]
            == make_heldout_rows(4, seed=1, train_n=10, max_number=12))


def test_the_default_set_is_unchanged():
    """Committed results were measured on "arith": its rows must not move when generation gains options."""
    assert make_rows(1, seed=0)[0]["problem"] == "What is 37 + 38?"
    assert make_rows(2, seed=0)[1]["solution"] == ("Mia starts with 40 coins.\nMia keeps one of 2 equal boxes: "
                                                   "40 / 2 = 20.\nSo Mia has 20 coins.")
    assert make_rows(1, seed=0, max_number=SETS["arith_small"])[0]["problem"] == "What is 10 + 11?"


def test_generated_sets_resolve_to_cached_files_and_bad_names_fail(tmp_path):
    from sage_megatron.run_inputs import eval_data_path, generated_data_paths
    from sage_megatron.tasks.arith_data import VERSION

    files = generated_data_paths("arith_small", tmp_path, seed=0)
    assert files["train"].parent == files["heldout"].parent == tmp_path / f"arith_small_data-v{VERSION}-seed0"
    assert eval_data_path("arith_small", tmp_path, seed=0) == files["heldout"]
    assert generated_data_paths("some/file.jsonl", tmp_path) is None
    with pytest.raises(ValueError, match="no generated set 'arith_big'"):
        write_arith_set(tmp_path / "x", name="arith_big")


def test_reward_accepts_the_reference_answer():
    from sage_megatron.algo.reward import math_reward

    r = make_rows(4, seed=0)[3]
    assert math_reward(f"... so the answer is \\boxed{{{r['answer']}}}", r["answer"]) == 1.0
    assert math_reward(f"\\boxed{{{int(r['answer']) + 1}}}", r["answer"]) == 0.0


def test_heldout_rows_are_new_problems_over_every_level():
    from sage_megatron.tasks.arith_data import make_heldout_rows

    train = {r["problem"] for r in make_rows(256, seed=0)}
    heldout = make_heldout_rows(96, seed=0)
    assert [r["steps"] for r in heldout[:8]] == [0, 1, 2, 3] * 2
    assert not train & {r["problem"] for r in heldout}
    assert len({r["problem"] for r in heldout}) > 90      # few repeats within the set itself
