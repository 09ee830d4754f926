"""Training prompts: ``PromptRow`` loading (JSONL, JSON list, Parquet) and a resumable epoch iterator.

A row is (index, problem, solution, answer). ``index`` is the prompt's stable identity (SAGE-light's
per-prompt state and the never-solved metric are keyed by it): a column of the file, or the 0-based
row number when no index column is configured. Every bad row raises ``DataError`` naming the file,
its 1-based row number and what to fix.

``EpochIterator`` yields batches of rows: a seeded shuffle per epoch (same seed -> same order), and a
cursor (epoch, position) in ``state_dict()`` so a resumed run continues with exactly the batch it
would have seen.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from sage_megatron.types import PromptRow


@dataclass(frozen=True)
class Columns:
    """Where each field lives in the file's records."""

    problem: str = "problem"
    solution: str | None = "solution"   # None: no solution column (GRPO-only data; hints impossible)
    answer: str = "answer"
    index: str | None = None            # None: the 0-based row number is the index
    difficulty: str | None = None       # optional integer difficulty column (toy: "steps")

    # Every name may be a dotted path into nested records, as verl-format parquet writes them
    # ("reward_model.ground_truth", "extra_info.index"). A problem given as chat messages (a list of
    # {"role", "content"}) is the content of its last user message.


# The columns of verl-format parquet as the SAGE reference writes it (``write_verl_parquet``).
VERL_COLUMNS = Columns(problem="prompt", solution="extra_info.solution", answer="reward_model.ground_truth",
                       index="extra_info.index")


def write_verl_parquet(path: str | Path, rows: Sequence[dict]) -> Path:
    """Rows {index, problem, solution, answer} as verl-format parquet (chat-message ``prompt``, nested
    ``reward_model.ground_truth`` and ``extra_info.{index, solution}``): hands our generated sets to verl
    and lets the tests read what the SAGE reference reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"data_source": "sage_megatron", "prompt": [{"role": "user", "content": r["problem"]}],
                "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(r["answer"])},
                "extra_info": {"index": int(r["index"]), "solution": r["solution"], "split": "train"}}
               for r in rows]
    pq.write_table(pa.Table.from_pylist(records), str(path))
    return Path(path)


class DataError(ValueError):
    """A data file that cannot be used as it is; the message names the file, row and fix."""


def load_rows(path: str | Path, *, columns: Columns = Columns(), require_solution: bool = True) -> list[PromptRow]:
    """All rows of a ``.jsonl``, ``.json`` (a list of objects) or ``.parquet`` file, validated."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = _read_records(path, columns)
    rows: list[PromptRow] = []
    first_row_of: dict[int, int] = {}
    for number, record in records:
        row = _to_row(record, number=number, path=path, columns=columns, require_solution=require_solution)
        if row.index in first_row_of:
            raise DataError(f"{path}: row {number}: duplicate index {row.index} (first used by row "
                            f"{first_row_of[row.index]}); every {columns.index!r} value must be unique")
        first_row_of[row.index] = number
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _read_records(path: Path, columns: Columns) -> list[tuple[int, Any]]:
    """(1-based row number, record) pairs; blank JSONL lines are skipped but keep their number."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    out.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: row {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        return out
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of objects, got {type(data).__name__}")
        return list(enumerate(data, start=1))
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        schema_names = pq.read_schema(path).names
        wanted = list(dict.fromkeys(c.split(".")[0] for c in (columns.problem, columns.solution, columns.answer,
                                                               columns.index, columns.difficulty) if c is not None))
        missing = [c for c in wanted if c not in schema_names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; the file has {schema_names}; "
                            f"set the data column names to match")
        return list(enumerate(pq.read_table(path, columns=wanted).to_pylist(), start=1))
    raise DataError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json or .parquet")


def _to_row(record: Any, *, number: int, path: Path, columns: Columns, require_solution: bool) -> PromptRow:
    where = f"{path}: row {number}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with keys, got {type(record).__name__}")

    def field(key: str, kinds: tuple[type, ...], what: str) -> Any:
        value = _lookup(record, key)
        if value is None:
            raise DataError(f"{where}: missing {what} key {key!r} (row has {sorted(record)}); "
                            f"add it or set the column name for {what}")
        if isinstance(value, bool) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise DataError(f"{where}: {what} {key!r} must be {names}, got {type(value).__name__} {value!r:.60}")
        return value

    problem = field(columns.problem, (str, list), "problem")
    if isinstance(problem, list):
        problem = _last_user_message(problem, where=where, key=columns.problem)
    if not problem.strip():
        raise DataError(f"{where}: empty problem {columns.problem!r}; remove the row or fill it in")
    answer = str(field(columns.answer, (str, int), "answer"))
    if not answer.strip():
        raise DataError(f"{where}: empty answer {columns.answer!r}; remove the row or fill it in")
    solution = ""
    if columns.solution is not None:
        solution = field(columns.solution, (str,), "solution")
        if require_solution and not solution.strip():
            raise DataError(f"{where}: empty solution {columns.solution!r}; hints are made from it "
                            f"(remove the row, or load with require_solution=False for GRPO)")
    index = number - 1 if columns.index is None else field(columns.index, (int,), "index")
    difficulty = None if columns.difficulty is None else field(columns.difficulty, (int,), "difficulty")
    return PromptRow(index=index, problem=problem, solution=solution, answer=answer, difficulty=difficulty)


def _lookup(record: dict, dotted: str) -> Any:
    """``record["a"]["b"]`` for "a.b"; a key that itself contains dots is tried first. None if absent."""
    if dotted in record:
        return record[dotted]
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _last_user_message(messages: list, *, where: str, key: str) -> str:
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1], str) or not users[-1].strip():
        raise DataError(f"{where}: problem {key!r} is a message list without a non-empty user message; "
                        f"give the problem as text or as [{{'role': 'user', 'content': ...}}]")
    return users[-1]


class EpochIterator:
    """Endless batches of rows: a seeded permutation per epoch, consumed in order.

    With ``drop_last`` (default) an epoch's final partial batch is skipped and the next epoch starts;
    otherwise it is yielded short. The permutation of epoch e is numpy's
    ``default_rng([seed, e]).permutation(len(rows))`` (identity when ``shuffle`` is False).
    """

    def __init__(self, rows: Sequence[PromptRow], *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if drop_last and batch_size > len(rows):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(rows)} rows with drop_last; "
                             f"lower the batch size or set drop_last=False")
        self.rows = list(rows)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)).tolist()

    def next_batch(self) -> list[PromptRow]:
        """The next batch; advances the cursor (and the epoch when one is used up)."""
        left = len(self.rows) - self.cursor
        if left == 0 or (self.drop_last and left < self.batch_size):
            self.epoch += 1
            self.cursor = 0
            self._order = self._permutation(self.epoch)
        take = self._order[self.cursor:self.cursor + self.batch_size]
        self.cursor += len(take)
        return [self.rows[i] for i in take]

    def __iter__(self) -> Iterator[list[PromptRow]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """JSON-serialisable position (plus what must match on resume)."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_rows": len(self.rows),
                "batch_size": self.batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Continues exactly where ``state`` was taken; raises if the data or seed differ."""
        for key, mine in (("seed", self.seed), ("num_rows", len(self.rows)), ("shuffle", self.shuffle)):
            if state.get(key) != mine:
                raise ValueError(f"data iterator state has {key}={state.get(key)!r} but this run has {mine!r}; "
                                 f"resume with the same data file and seed")
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._permutation(self.epoch)
