r"""The embedded default task: a cycle of digit operations applied n times, mod 10.

A problem is a start digit, a cycle of three operations and a step count n; the operations are
applied in turn (repeating the cycle) for n steps, mod 10::

    problem   "5 +3 *7 -2 n=4"
    solution  "3: 5+3=8\n2: 8*7=6\n1: 6-2=4\n0: 4+3=7"   (one line per step: steps left, the step)
    answer    "7"                                         (the policy ends with \boxed{7})

Why this shape (the README's main command runs GRPO vs SAGE on it in minutes on 2 CPU cores):

* verifiable: the answer is an integer, graded by the last ``\boxed{...}`` like any math answer;
* difficulty = n. Every operation is a bijection mod 10 (+d, -d, *3, *7, *9), so one wrong step
  always makes the final answer wrong (a wrong chain is right only when later errors cancel): at
  temperature 1 accuracy falls like (per-step accuracy)^n;
* learnable in CPU minutes by a ~0.3M-parameter char-level model: everything a line needs sits at
  a FIXED distance from it (the previous line's result and countdown, the operation three lines up
  or, for the first three lines, in the fixed-length problem), so no content search (induction
  head) is needed. A first design with a different operation per step ("5 a+3 b*7 c-4") needed one
  and the tiny policy never learned it in budget: see tests/tasks/test_toy_task.py's module notes;
* the reference solution makes a hard item easy: every line carries the whole state, so the level-3
  hint (the three lines before the last) leaves one step to compute, and the hinted response
  continues after the hint. Hints never contain the final line.

Rows are plain dicts ``{index, problem, solution, answer, steps}`` (the trainer's data format), made
deterministically from a seed. ``make_splits`` gives a mixed-difficulty train split and a held-out
hard split whose problems never occur in train.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

MODULUS = 10
DATA_VERSION = 2        # bump when make_splits' output changes (names the cached data folder)
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates" / "toy"   # read by algo.templates.load_templates
HINT_KEYS = ("level_1", "level_2", "level_3")


@dataclass(frozen=True)
class ToyTaskSpec:
    """What a generated problem may contain."""

    ops: str = "+-*"                      # operations drawn uniformly for each cycle slot
    cycle: int = 3                        # operations in the cycle
    modulus: int = MODULUS                # every value is reduced mod this (the templates say "mod 10")
    mul_operands: tuple[int, ...] = (3, 7, 9)   # units of Z/10: "*" stays a bijection
    max_steps: int = 10                   # the countdown label is one digit


DEFAULT_SPEC = ToyTaskSpec()


def apply_op(value: int, op: str, operand: int, *, modulus: int = MODULUS) -> int:
    """One step: ``value op operand`` reduced mod ``modulus``."""
    if op == "+":
        return (value + operand) % modulus
    if op == "-":
        return (value - operand) % modulus
    if op == "*":
        return (value * operand) % modulus
    raise ValueError(f"unknown op {op!r}; the toy task uses '+', '-', '*'")


def solution_lines(start: int, cycle: Sequence[tuple[str, int]], steps: int, *, modulus: int = MODULUS,
                   slip: Callable[[int, int], int] | None = None, first: int = 0,
                   value: int | None = None) -> tuple[list[str], int]:
    """Lines ``first``..``steps``-1 of the solution and the final value.

    ``value`` is the value before line ``first`` (default: ``start``, with ``first`` = 0). ``slip``
    (line number, correct result) -> written result models a sloppy solver: later lines continue
    from what was written.
    """
    value = start if value is None else value
    lines = []
    for j in range(first, steps):
        op, operand = cycle[j % len(cycle)]
        new = apply_op(value, op, operand, modulus=modulus)
        if slip is not None:
            new = slip(j, new)
        lines.append(f"{steps - 1 - j}: {value}{op}{operand}={new}")
        value = new
    return lines, value


def make_row(index: int, start: int, cycle: Sequence[tuple[str, int]], steps: int, *,
             modulus: int = MODULUS) -> dict:
    """The row for ``start``, the operation ``cycle`` [(op, operand), ...] and ``steps``."""
    if not 1 <= steps <= 10:
        raise ValueError(f"a toy problem has 1..10 steps (one-digit countdown), got {steps}")
    lines, value = solution_lines(start, cycle, steps, modulus=modulus)
    problem = " ".join([str(start)] + [f"{op}{operand}" for op, operand in cycle] + [f"n={steps}"])
    return {"index": index, "problem": problem, "solution": "\n".join(lines),
            "answer": str(value), "steps": steps}


def parse_problem(problem: str) -> tuple[int, list[tuple[str, int]], int]:
    """(start, cycle, steps) of a problem string (the inverse of ``make_row``)."""
    m = re.fullmatch(r"(\d) ((?:[-+*]\d )+)n=(\d+)", problem)
    if not m:
        raise ValueError(f"not a toy problem: {problem!r} (expected like '5 +3 *7 -2 n=4')")
    cycle = [(t[0], int(t[1])) for t in m.group(2).split()]
    return int(m.group(1)), cycle, int(m.group(3))


def sample_row(rng: random.Random, steps: int, *, index: int = 0, spec: ToyTaskSpec = DEFAULT_SPEC) -> dict:
    """One random problem with ``steps`` steps."""
    cycle = []
    for _ in range(spec.cycle):
        op = rng.choice(spec.ops)
        cycle.append((op, rng.choice(spec.mul_operands) if op == "*" else rng.randint(1, spec.modulus - 1)))
    return make_row(index, rng.randrange(spec.modulus), cycle, steps, modulus=spec.modulus)


def generate_rows(
    n: int,
    *,
    seed: int,
    steps: Sequence[int] = tuple(range(1, 9)),
    weights: Sequence[float] | None = None,
    spec: ToyTaskSpec = DEFAULT_SPEC,
    exclude: Iterable[str] = (),
    unique: bool = True,
) -> list[dict]:
    """``n`` rows with step counts drawn from ``steps`` (optionally ``weights``), indices 0..n-1.

    Deterministic in ``seed``. ``unique`` drops repeated problems, ``exclude`` drops given problem
    strings (used to keep held-out problems out of train). Raises if the space is too small.
    """
    rng = random.Random(f"toy-task/{seed}")
    seen, rows = set(exclude), []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"could only make {len(rows)} of {n} distinct problems with steps={list(steps)}; "
                             "allow more steps or set unique=False")
        k = rng.choices(list(steps), weights=weights)[0]
        row = sample_row(rng, k, index=len(rows), spec=spec)
        if unique and row["problem"] in seen:
            continue
        seen.add(row["problem"])
        rows.append(row)
    return rows


def make_splits(
    *,
    seed: int = 0,
    n_train: int = 512,
    n_heldout: int = 192,
    train_steps: Sequence[int] = tuple(range(1, 9)),
    spec: ToyTaskSpec = DEFAULT_SPEC,
) -> dict[str, list[dict]]:
    """{"train": mixed difficulty (uniform over train_steps), "heldout": the same difficulties, balanced}.

    The held-out split has ``n_heldout // len(train_steps)`` problems per step count, interleaved (row i
    has step count train_steps[i % len]) so any prefix of it is balanced too; its problems are drawn
    first and excluded from train, so the two never share a problem. The hard band is a filter on
    ``steps`` at evaluation time (eval.hard_min_difficulty).
    """
    per_step = n_heldout // len(train_steps)
    by_step = [generate_rows(per_step, seed=seed * 2 + 1 + 7919 * k, steps=(k,), spec=spec) for k in train_steps]
    heldout = [dict(rows[i], index=i * len(train_steps) + j)
               for i in range(per_step) for j, rows in enumerate(by_step)]
    train = generate_rows(n_train, seed=seed * 2, steps=train_steps, spec=spec,
                          exclude={r["problem"] for r in heldout})
    return {"train": train, "heldout": heldout}


# ----------------------------------------------------------------------------- hints


def hint_windows(steps: int) -> tuple[tuple[int, int], ...]:
    """Solution lines [first, end) each hint level holds: level l = the l lines that end 3 - l steps
    before the last one, so it leaves 4 - l steps to compute (level 3 leaves one). Never the last
    line; an empty window (short problems) is written as the first operation, "3: 5+3=?".
    """
    windows = []
    for level in (1, 2, 3):
        end = max(0, steps - 4 + level)
        windows.append((max(0, end - level), end))
    return tuple(windows)


def hint_levels(row: dict) -> dict[str, str]:
    """The three reference hints of a row: short windows of its solution, never the final line.

    Each line carries the whole state (value, steps left), so a window works like the prefix that
    ends with it: level_1 leaves 3 steps, level_2 leaves 2, level_3 leaves 1 ("all but the last
    step"). Windows rather than whole prefixes keep every hint line at a fixed distance from the
    solution it is copied from, so the tiny policy can write its own hints (see toy_pretrain).
    """
    lines = row["solution"].split("\n")
    first_op = lines[0].split("=")[0] + "=?"
    return {key: ("\n".join(lines[a:b]) if b > a else first_op)
            for key, (a, b) in zip(HINT_KEYS, hint_windows(len(lines)))}


def hint_json(row: dict) -> str:
    """The hint prompt's target output: the hints as one JSON object (what the hint parser reads)."""
    return json.dumps(hint_levels(row), ensure_ascii=False)


def _hinted_lines(row: dict, hint: str | None) -> int:
    """How many solution lines are done once ``hint`` is given: the end of the run of solution
    lines the hint holds (0 without a hint, or when the hint is not a run of solution lines)."""
    if not hint:
        return 0
    lines, given = row["solution"].split("\n"), hint.split("\n")
    for start in range(len(lines) - len(given) + 1):
        if lines[start:start + len(given)] == given:
            return start + len(given)
    return 0


def target_response(row: dict, *, hint: str | None = None) -> str:
    """What a correct policy writes: the solution's steps, then the boxed answer.

    With a ``hint`` (a run of the solution's lines) the response continues after it: the steps
    after the hint's last line, then the boxed answer.
    """
    lines = row["solution"].split("\n")
    return "\n".join(lines[_hinted_lines(row, hint):] + [f"\\boxed{{{row['answer']}}}"])


def sloppy_response(row: dict, rng: random.Random, *, slip_rate: float, hint: str | None = None) -> str:
    """``target_response`` as written by a solver that slips: each step's result is, with probability
    ``slip_rate``, a uniformly random WRONG digit; later steps continue from it, and the boxed answer
    is where the chain ended (so one slip makes the answer wrong).
    """
    start, cycle, steps = parse_problem(row["problem"])
    done = _hinted_lines(row, hint)
    value = start if done == 0 else int(row["solution"].split("\n")[done - 1].rsplit("=", 1)[1])

    def slip(_line: int, correct: int) -> int:
        if rng.random() < slip_rate:
            return (correct + rng.randint(1, MODULUS - 1)) % MODULUS
        return correct

    lines, final = solution_lines(start, cycle, steps, slip=slip, first=done, value=value)
    return "\n".join(lines + [f"\\boxed{{{final}}}"])


# ----------------------------------------------------------------------------- io


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line (parents created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (blank lines skipped)."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def write_default_dataset(out_dir: str | Path, *, seed: int = 0, n_train: int = 512,
                          n_heldout: int = 192) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` of ``make_splits`` to ``out_dir``."""
    splits = make_splits(seed=seed, n_train=n_train, n_heldout=n_heldout)
    return {name: write_jsonl(Path(out_dir) / f"{name}.jsonl", rows) for name, rows in splits.items()}


def iter_steps(rows: Iterable[dict]) -> Iterator[int]:
    """The distinct step counts of ``rows``, ascending."""
    yield from sorted({r["steps"] for r in rows})
