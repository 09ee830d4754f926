"""Stop requests: checkpoint at the next step boundary and exit so that Slurm requeues the job.

A request is a file (``$SAGE_STOP_FILE``, else ``run.dir/STOP_REQUESTED``), so that whoever learns of
the preemption can make it: the trainer's own SIGTERM / SIGUSR1 handler, or train.sbatch's trap of
Slurm's time-limit warning (``--signal=B:USR1@...``), on any node of a shared file system. Rank 0
looks for it after each step and broadcasts the answer; the run then saves a checkpoint (unless that
step just saved one), ends with ``preempted`` in its result, and the CLI exits with PREEMPTED_EXIT.
A fresh start of the run removes a stale request.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

PREEMPTED_EXIT = 75          # EX_TEMPFAIL: "checkpointed on request, run me again"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def stop_file(run_dir: str | Path) -> Path:
    return Path(os.environ.get("SAGE_STOP_FILE") or Path(run_dir) / "STOP_REQUESTED")


def request_stop(path: Path, reason: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reason + "\n")


@contextlib.contextmanager
def stop_on_signals(*paths: Path):
    """While inside: SIGTERM and SIGUSR1 write the stop request (to each of ``paths``: the runs of a session)
    instead of killing this process (a second SIGTERM kills as usual). Only from the main thread (Python's
    rule for signal handlers)."""
    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if any(p.exists() for p in paths) and signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        for path in paths:
            request_stop(path, name)
        print(f"[train] {name}: checkpoint at the next step boundary, then exit for requeue", file=sys.stderr,
              flush=True)

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
