"""report: PNG plots of several runs overlaid, from metrics.jsonl."""
from __future__ import annotations

from sage_megatron.metrics import MetricsWriter, progress_line, read_metrics
from sage_megatron.report import make_report


def _fake_run(path, *, light: bool):
    w = MetricsWriter(path, tensorboard=True, progress=False)
    for step in range(1, 4):
        hints = ({f"hint/level_l{l}": float(step + l) for l in range(4)} if light
                 else {f"hint/hinted_l{l}": float(4 - l) for l in (1, 2, 3)})
        w.log(step, {"acc/before_hints": 0.1 * step, "groups/prompt_usage": 0.5, "time/step": 1.0,
                     "prompts/never_solved_share": 1.0 / step, **hints})
    w.close()


def test_report_writes_pngs_for_overlaid_runs(tmp_path, capsys):
    from sage_megatron.cli import main

    _fake_run(tmp_path / "sage", light=False)
    _fake_run(tmp_path / "light", light=True)
    assert list((tmp_path / "sage" / "tb").iterdir())      # TensorBoard events written
    out = make_report([tmp_path / "sage", tmp_path / "light"], tmp_path / "plots")
    assert {p.name for p in out} == {"accuracy.png", "prompt_usage.png", "never_solved.png", "hints_per_level.png"}
    for p in out:
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 1000
    assert main(["report", str(tmp_path / "sage"), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "accuracy.png").is_file()


def test_metrics_resume_truncates_later_steps(tmp_path):
    _fake_run(tmp_path, light=False)
    MetricsWriter(tmp_path, tensorboard=False, progress=False, start_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    line = progress_line(3, {"acc/before_hints": 0.25, "hint/hinted_l1": 2, "hint/hinted_l2": 1, "time/step": 2.0}, total=8)
    assert line.startswith("step 3/8 | acc 0.250") and "hinted 3" in line
