"""The CLI's bad-input paths: one line naming what is wrong, exit status 2, before anything starts."""
from __future__ import annotations

import time

from sage_megatron.cli import main


def test_eval_of_a_missing_model_is_one_line_before_any_engine_starts(tmp_path, capsys):
    t0 = time.monotonic()
    rc = main(["eval", "--model", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: --model ") and "no config.json" in err[0], err
    assert time.monotonic() - t0 < 30       # refused up front: no Ray, no vLLM


def test_eval_of_a_missing_data_file_is_one_line(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    rc = main(["eval", "--model", str(model), "--data", str(tmp_path / "rows.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "rows.jsonl: no such file" in err[0], err
