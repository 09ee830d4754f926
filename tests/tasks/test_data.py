"""Prompt rows from JSONL / JSON / Parquet, actionable errors, and the resumable epoch iterator."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sage_megatron.tasks.data import VERL_COLUMNS, Columns, DataError, EpochIterator, load_rows, write_verl_parquet
from sage_megatron.types import PromptRow


def _jsonl(path, records, *, blank_after_first=False):
    lines = [json.dumps(r) for r in records]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


ROWS = [{"problem": "1+1?", "solution": "1+1=2", "answer": "2"},
        {"problem": "2*3?", "solution": "2*3=6", "answer": 6}]


def test_jsonl_row_number_index_and_int_answer(tmp_path):
    rows = load_rows(_jsonl(tmp_path / "d.jsonl", ROWS))
    assert rows == [PromptRow(index=0, problem="1+1?", solution="1+1=2", answer="2"),
                    PromptRow(index=1, problem="2*3?", solution="2*3=6", answer="6")]


def test_json_list_and_index_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([dict(r, id=10 + i) for i, r in enumerate(ROWS)]))
    rows = load_rows(path, columns=Columns(index="id"))
    assert [r.index for r in rows] == [10, 11]


def test_parquet_with_custom_columns(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"q": ["a?", "b?"], "ref": ["sa", "sb"], "gt": ["1", "2"], "uid": [7, 3]}), path)
    rows = load_rows(path, columns=Columns(problem="q", solution="ref", answer="gt", index="uid"))
    assert rows == [PromptRow(7, "a?", "sa", "1"), PromptRow(3, "b?", "sb", "2")]
    with pytest.raises(DataError, match=r"d\.parquet: missing column\(s\) \['problem'"):
        load_rows(path)


def test_no_solution_column_for_grpo(tmp_path):
    rows = load_rows(_jsonl(tmp_path / "d.jsonl", [{"problem": "p", "answer": "1"}]),
                     columns=Columns(solution=None))
    assert rows[0].solution == ""


@pytest.mark.parametrize("record, message", [
    ({"solution": "s", "answer": "1"}, r"row 2: missing problem key 'problem'"),
    ({"problem": 5, "solution": "s", "answer": "1"}, r"row 2: problem 'problem' must be str or list, got int"),
    ({"problem": "  ", "solution": "s", "answer": "1"}, r"row 2: empty problem"),
    ({"problem": "p", "solution": "s", "answer": None}, r"row 2: missing answer key 'answer'"),
    ({"problem": "p", "solution": "s", "answer": [1]}, r"row 2: answer 'answer' must be str or int, got list"),
    ({"problem": "p", "solution": "", "answer": "1"}, r"row 2: empty solution"),
    ([1, 2], r"row 2: expected an object"),
])
def test_bad_rows_name_file_and_row(tmp_path, record, message):
    path = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], record])
    with pytest.raises(DataError, match=r"bad\.jsonl: " + message):
        load_rows(path)


def test_row_numbers_count_blank_lines_and_invalid_json(tmp_path):
    # line 1 valid, line 2 blank, line 3 the bad record -> "row 3"
    path = _jsonl(tmp_path / "d.jsonl", [ROWS[0], {"problem": "p", "solution": "s"}], blank_after_first=True)
    with pytest.raises(DataError, match="row 3: missing answer"):
        load_rows(path)
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="row 2: not valid JSON"):
        load_rows(path)


def test_duplicate_index_and_bad_index_type(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [dict(ROWS[0], id=4), dict(ROWS[1], id=9), dict(ROWS[0], id=4)])
    with pytest.raises(DataError, match=r"row 3: duplicate index 4 \(first used by row 1\)"):
        load_rows(path, columns=Columns(index="id"))
    path = _jsonl(tmp_path / "e.jsonl", [dict(ROWS[0], id="4")])
    with pytest.raises(DataError, match="row 1: index 'id' must be int, got str"):
        load_rows(path, columns=Columns(index="id"))


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format '.csv'"):
        load_rows(tmp_path / "d.csv")
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "nope.jsonl")


def _rows(n):
    return [PromptRow(index=i, problem=f"p{i}", solution="s", answer="a") for i in range(n)]


def test_iterator_without_shuffle_drop_last():
    # 5 rows, batch 2, drop_last: [0,1] [2,3] then row 4 is dropped and epoch 1 starts [0,1]
    it = EpochIterator(_rows(5), batch_size=2, shuffle=False)
    got = [[r.index for r in it.next_batch()] for _ in range(3)]
    assert got == [[0, 1], [2, 3], [0, 1]]
    assert it.epoch == 1 and it.cursor == 2
    # without drop_last the short batch [4] is yielded
    it = EpochIterator(_rows(5), batch_size=2, shuffle=False, drop_last=False)
    assert [[r.index for r in it.next_batch()] for _ in range(4)] == [[0, 1], [2, 3], [4], [0, 1]]


def test_iterator_shuffle_is_seeded_and_covers_each_epoch():
    a = EpochIterator(_rows(6), batch_size=3, seed=1)
    b = EpochIterator(_rows(6), batch_size=3, seed=1)
    ea = [r.index for _ in range(2) for r in a.next_batch()]
    eb = [r.index for _ in range(2) for r in b.next_batch()]
    assert ea == eb and sorted(ea) == list(range(6))
    epoch1 = [r.index for _ in range(2) for r in a.next_batch()]
    assert sorted(epoch1) == list(range(6))


def test_iterator_resume_continues_exactly():
    a = EpochIterator(_rows(7), batch_size=3, seed=5)
    for _ in range(3):  # into epoch 1
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = EpochIterator(_rows(7), batch_size=3, seed=5)
    b.load_state_dict(state)
    for _ in range(5):
        assert [r.index for r in a.next_batch()] == [r.index for r in b.next_batch()]
    with pytest.raises(ValueError, match="seed=5 but this run has 6"):
        EpochIterator(_rows(7), batch_size=3, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size 8 exceeds the 7 rows"):
        EpochIterator(_rows(7), batch_size=8)


def test_verl_format_parquet_through_dotted_columns(tmp_path):
    rows = [{"index": 10 + i, "problem": f"p{i}", "solution": f"s{i}", "answer": str(i)} for i in range(3)]
    path = write_verl_parquet(tmp_path / "train.parquet", rows)
    got = load_rows(path, columns=VERL_COLUMNS)
    assert got == [PromptRow(index=10 + i, problem=f"p{i}", solution=f"s{i}", answer=str(i)) for i in range(3)]


def test_difficulty_column_and_message_list_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"problem": [{"role": "system", "content": "x"}], "solution": "s", "answer": "1"})
                    + "\n")
    with pytest.raises(DataError, match="row 1: problem 'problem' is a message list without a non-empty user"):
        load_rows(path)
    path.write_text(json.dumps({"problem": "p", "solution": "s", "answer": "1", "meta": {"steps": 4}}) + "\n")
    assert load_rows(path, columns=Columns(difficulty="meta.steps"))[0].difficulty == 4
    with pytest.raises(DataError, match="missing difficulty key 'steps'"):
        load_rows(path, columns=Columns(difficulty="steps"))
