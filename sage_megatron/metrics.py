"""Per-step metrics: phase timers, JSONL + TensorBoard logging, a one-line progress display.

    timer = PhaseTimer()
    with timer.phase("update"): ...
    writer = MetricsWriter(run_dir, tensorboard=True, progress=True)   # rank 0 only
    writer.log(step, {**metrics, **timer.metrics()})
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

METRICS_FILE = "metrics.jsonl"
EVALS_FILE = "evals.jsonl"       # one held-out evaluation per line: {"step", "accuracy", "accuracy_ci95", ...}


class PhaseTimer:
    """Wall-clock seconds per named phase ("time/<name>"). Phases named at construction are always
    reported (0 when skipped), so log keys are stable from step to step."""

    def __init__(self, *names: str) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(names, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The JSONL records of a run, in step order (the last record of a step wins after a resume)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def read_evals(run_dir: str | Path) -> list[dict]:
    """The held-out evaluations of a run, in step order (the last of a step wins after a resume)."""
    path = Path(run_dir) / EVALS_FILE
    if not path.is_file():
        return []
    by_step = {int(r["step"]): r for r in map(json.loads, filter(str.strip, path.read_text().splitlines()))}
    return [by_step[s] for s in sorted(by_step)]


class MetricsWriter:
    """Appends one JSON record per step to run_dir/metrics.jsonl, mirrors scalars to TensorBoard, prints a line."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, progress: bool = True,
                 total_steps: int | None = None, start_step: int = 0) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / METRICS_FILE
        self._truncate_after(start_step)
        self.progress = progress
        self.total_steps = total_steps
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tb"))

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: drop them from the file."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and int(json.loads(line)["step"]) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: Mapping[str, float], *, extra: Mapping | None = None) -> None:
        rec = {"step": step, **{k: _clean(v) for k, v in metrics.items()}, **(extra or {})}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.progress:
            print(progress_line(step, metrics, total=self.total_steps), flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def progress_line(step: int, m: Mapping[str, float], *, total: int | None = None) -> str:
    """One line: step, accuracy before hints, prompt usage, hinted, never-solved, loss, grad norm, time."""
    hinted = sum(v for k, v in m.items() if k.startswith("hint/hinted_l") or
                 (k.startswith("hint/level_l") and not k.endswith("l0")))
    parts = [f"step {step}" + (f"/{total}" if total else ""),
             f"acc {m.get('acc/before_hints', float('nan')):.3f}",
             f"usage {m.get('groups/prompt_usage', float('nan')):.2f}",
             f"hinted {int(hinted)}",
             f"never {m.get('prompts/never_solved_share', float('nan')):.2f}",
             f"loss {m.get('train/loss', float('nan')):+.4f}",
             f"gnorm {m.get('train/grad_norm', float('nan')):.3f}",
             f"len {m.get('response_len/mean', float('nan')):.0f}",
             f"{m.get('time/step', float('nan')):.1f}s"]
    return " | ".join(parts)
