"""A small arithmetic word-problem set with step-by-step reference solutions (the SmolLM2 config's data).

    python -m sage_megatron.tasks.arith_data --out runs/data/arith_train.jsonl --n 256 --seed 0

Problems are generated, not downloaded (no hub here): a story of 1-4 operations on small integers
("Mia has 12 apples. She buys 7 more and then gives 5 to a friend. How many apples does Mia have
now?"), the reference solution one sentence per operation ("Mia starts with 12 apples. She buys 7
more: 12 + 7 = 19. ..."), and the integer answer. Difficulty grows with the number of operations,
and a prefix of the solution makes a long item easy, which is what SAGE's hints need. Rows use the
trainer's data format ``{index, problem, solution, answer, steps}``; the same seed gives the same file.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Sam", "Ivy", "Max")
ITEMS = ("apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells")


def _operation(rng: random.Random, value: int) -> tuple[str, str, int]:
    """(story clause, solution clause, new value) of one operation on ``value`` (results stay 0..999)."""
    kind = rng.choice(("add", "sub", "mul", "div") if value > 1 else ("add", "mul"))
    if kind == "add":
        k = rng.randint(2, 30)
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


def make_row(index: int, rng: random.Random, steps: int) -> dict:
    """One problem with ``steps`` operations."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = value = rng.randint(3, 40)
    story, solution = [], [f"{name} starts with {start} {item}."]
    for _ in range(steps):
        clause, worked, value = _operation(rng, value)
        story.append(clause)
        solution.append(f"{name} {worked}.")
    actions = ", then ".join(story)
    problem = (f"{name} has {start} {item}. {name} {actions}. "
               f"How many {item} does {name} have now?")
    solution.append(f"So {name} has {value} {item}.")
    return {"index": index, "problem": problem, "solution": "\n".join(solution), "answer": str(value),
            "steps": steps}


def make_rows(n: int, *, seed: int = 0, max_steps: int = 4) -> list[dict]:
    """``n`` rows, operations 1..max_steps in equal shares, deterministic in ``seed``."""
    rng = random.Random(f"arith/{seed}")
    return [make_row(i, rng, 1 + i % max_steps) for i in range(n)]


def write_arith_dataset(path: str | Path, *, n: int = 256, seed: int = 0) -> Path:
    """Write the JSONL file and return its path."""
    from sage_megatron.tasks.toy_task import write_jsonl

    return write_jsonl(Path(path), make_rows(n, seed=seed))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(write_arith_dataset(a.out, n=a.n, seed=a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
