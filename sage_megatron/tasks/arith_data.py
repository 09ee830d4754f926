"""A small arithmetic word-problem set with step-by-step reference solutions (the SmolLM2 config's data).

    python -m sage_megatron.tasks.arith_data --out runs/data/arith --set arith --seed 0

Problems are generated, not downloaded (no hub here): a bare sum ("What is 12 + 7?", difficulty 0) or a
story of 1-3 operations on small integers
("Mia has 12 apples. She buys 7 more and then gives 5 to a friend. How many apples does Mia have
now?"), the reference solution one sentence per operation ("Mia starts with 12 apples. She buys 7
more: 12 + 7 = 19. ..."), and the integer answer. Difficulty grows with the number of operations,
and a prefix of the solution makes a long item easy, which is what SAGE's hints need. Rows use the
trainer's data format ``{index, problem, solution, answer, steps}``; the same seed gives the same file.
Two named sets (``SETS``): "arith" (starting numbers and addends up to 40) and "arith_small" (up to 12).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

VERSION = 2   # bump when the generated rows change (the cache folder is named by it)
TEMPLATE_DIR = Path(__file__).parent / "templates" / "arith"   # prompts a small model can follow
NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Sam", "Ivy", "Max")
DEFAULT_MAX_NUMBER = 40   # largest starting number and addend of "arith" (its rows must not change)
ITEMS = ("apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells")


def _operation(rng: random.Random, value: int, max_number: int = DEFAULT_MAX_NUMBER) -> tuple[str, str, int]:
    """(story clause, solution clause, new value) of one operation on ``value`` (results stay 0..999)."""
    kind = rng.choice(("add", "sub", "mul", "div") if value > 1 else ("add", "mul"))
    if kind == "add":
        k = rng.randint(2, min(30, max_number))
        return f"buys {k} more", f"buys {k} more: {value} + {k} = {value + k}", value + k
    if kind == "sub" and value > 2:
        k = rng.randint(1, value - 1)
        return f"gives {k} to a friend", f"gives away {k}: {value} - {k} = {value - k}", value - k
    if kind == "div":
        divisors = [d for d in (2, 3, 4, 5) if value % d == 0]
        if divisors:
            d = rng.choice(divisors)
            return (f"shares them equally among {d} boxes and keeps one box",
                    f"keeps one of {d} equal boxes: {value} / {d} = {value // d}", value // d)
    k = rng.choice((2, 3)) if value <= 300 else 1
    if k == 1:
        return "counts them again", f"counts again: still {value}", value
    word = {2: "doubles", 3: "triples"}[k]
    return f"{word} the collection", f"{word} them: {value} * {k} = {value * k}", value * k


def make_row(index: int, rng: random.Random, steps: int, max_number: int = DEFAULT_MAX_NUMBER) -> dict:
    """One problem with ``steps`` operations; ``steps=0`` is a bare sum ("What is 12 + 7?"). Starting
    numbers and addends are at most ``max_number``."""
    if steps == 0:
        a, b = rng.randint(2, max_number), rng.randint(2, max_number)
        return {"index": index, "problem": f"What is {a} + {b}?", "solution": f"{a} + {b} = {a + b}.",
                "answer": str(a + b), "steps": 0}
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = value = rng.randint(3, max_number)
    story, solution = [], [f"{name} starts with {start} {item}."]
    for _ in range(steps):
        clause, worked, value = _operation(rng, value, max_number)
        story.append(clause)
        solution.append(f"{name} {worked}.")
    actions = ", then ".join(story)
    problem = (f"{name} has {start} {item}. {name} {actions}. "
               f"How many {item} does {name} have now?")
    solution.append(f"So {name} has {value} {item}.")
    return {"index": index, "problem": problem, "solution": "\n".join(solution), "answer": str(value),
            "steps": steps}


MIN_STEPS, MAX_STEPS = 0, 3   # difficulty levels: a bare sum, then word problems of 1..3 operations
SETS = {"arith": DEFAULT_MAX_NUMBER, "arith_small": 12}
"""The named generated sets and their largest starting number and addend. With "arith_small" the sums
are within SmolLM2-135M's reach, yet it answers only part of them (temperature 0.6, 24 held-out prompts x 4
per level: 0.32, 0.10, 0.04, 0.03 for 0-3 operations): it often writes the right sum, then rambles on to
other numbers. Those mixed groups are what GRPO learns from (configs/smollm2_arith.yaml)."""


def make_rows(n: int, *, seed: int = 0, min_steps: int = MIN_STEPS, max_steps: int = MAX_STEPS,
              max_number: int = DEFAULT_MAX_NUMBER) -> list[dict]:
    """``n`` rows, operations min_steps..max_steps in equal shares, deterministic in ``seed``."""
    rng = random.Random(f"arith/{seed}")
    levels = max_steps - min_steps + 1
    return [make_row(i, rng, min_steps + i % levels, max_number) for i in range(n)]


def make_heldout_rows(n: int, *, seed: int = 0, train_n: int = 256, min_steps: int = MIN_STEPS,
                      max_steps: int = MAX_STEPS, max_number: int = DEFAULT_MAX_NUMBER) -> list[dict]:
    """``n`` held-out rows (operations min_steps..max_steps in equal shares) whose problems are not among
    the ``train_n`` training rows of the same ``seed``."""
    seen = {r["problem"] for r in make_rows(train_n, seed=seed, min_steps=min_steps, max_steps=max_steps,
                                            max_number=max_number)}
    rng = random.Random(f"arith-heldout/{seed}")
    levels = max_steps - min_steps + 1
    rows: list[dict] = []
    while len(rows) < n:
        row = make_row(len(rows), rng, min_steps + len(rows) % levels, max_number)
        if row["problem"] not in seen:
            rows.append(row)
    return rows


def write_arith_set(folder: str | Path, *, name: str = "arith", seed: int = 0, train_n: int = 256,
                    heldout_n: int = 96) -> dict[str, Path]:
    """Write the named set's ``train.jsonl`` and ``heldout.jsonl`` into ``folder``; returns their paths."""
    from sage_megatron.tasks.toy_task import write_jsonl

    if name not in SETS:
        raise ValueError(f"no generated set {name!r}; use one of {sorted(SETS)}")
    folder, max_number = Path(folder), SETS[name]
    return {"train": write_jsonl(folder / "train.jsonl", make_rows(train_n, seed=seed, max_number=max_number)),
            "heldout": write_jsonl(folder / "heldout.jsonl",
                                   make_heldout_rows(heldout_n, seed=seed, train_n=train_n, max_number=max_number))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for train.jsonl and heldout.jsonl")
    ap.add_argument("--set", default="arith", choices=sorted(SETS))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for path in write_arith_set(a.out, name=a.set, seed=a.seed).values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
