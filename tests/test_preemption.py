"""Stop requests: SIGUSR1 / SIGTERM to `sage-megatron train` -> checkpoint at the next step boundary, exit
75 (PREEMPTED_EXIT); the same command run again resumes there and finishes, every step logged once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sage_megatron.preemption import PREEMPTED_EXIT, stop_file, stop_on_signals


def test_signals_write_the_stop_request_instead_of_killing(tmp_path, monkeypatch):
    monkeypatch.delenv("SAGE_STOP_FILE", raising=False)
    path, later_run = stop_file(tmp_path), stop_file(tmp_path / "later")   # a session's runs: each gets it
    with stop_on_signals(path, later_run):
        os.kill(os.getpid(), signal.SIGUSR1)
        assert path.read_text().strip() == later_run.read_text().strip() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL    # handlers restored


def records(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


@pytest.mark.vllm
@pytest.mark.multiproc
def test_sigusr1_checkpoints_exits_75_and_the_rerun_resumes(tmp_path, tiny_hf_factory):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "sage_megatron.cli", "train", "--config", "configs/toy.yaml",
           f"model.hf_dir={tiny_hf_factory('llama')}", f"model.cache_dir={tmp_path / 'cache'}",
           "algorithm.name=sage", "algorithm.hint_source=reference_prefix", "rollout.max_tokens=12",
           "rollout.group_size=4", "data.batch_size=4", "eval.data=", "run.steps=4", f"run.dir={run}",
           "run.checkpoint_every=0", "logging.tensorboard=false"]
    env = {k: v for k, v in os.environ.items() if k != "SAGE_STOP_FILE"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while not records(run):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, out
    steps = [r["step"] for r in records(run)]
    [ckpt] = sorted((run / "checkpoints").glob("step_*"))
    assert int(ckpt.name.split("_")[1]) == steps[-1] < 4, (steps, ckpt)   # saved at the step it stopped after
    assert "stop requested: checkpoint of step" in out

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]
    assert f'"resumed_from": "{ckpt}"' in again.stdout
    assert not stop_file(run).exists()
