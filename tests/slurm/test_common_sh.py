"""scripts/slurm/common.sh failure paths that a real local cluster cannot produce on demand.

A worker that starts but never joins (a network partition between nodes) needs packet filtering,
which these machines lack (no iptables, no tc actions). So srun, scontrol, hostname and ray are
replaced by tiny fakes on PATH (the process boundary) and the real common.sh runs against them.
The real-cluster paths (both nodes join; a step fails; a node dies mid-run) are in test_slurm_jobs.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FAKES = {
    # srun: drop options (and -w NODE), remember the node, run the command.
    "srun": """#!/bin/bash
while [ $# -gt 0 ]; do case "$1" in -w) export FAKE_NODE=$2; shift 2 ;; -*) shift ;; *) break ;; esac; done
exec "$@"
""",
    "scontrol": """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && { echo n1; echo n2; exit 0; }
exit 1
""",
    "hostname": """#!/bin/bash
case "$1" in --ip-address|-I) [ "$FAKE_NODE" = n2 ] && echo 10.9.0.2 || echo 10.9.0.1 ;; *) echo "${FAKE_NODE:-n1}" ;; esac
""",
    # ray: the head starts; `ray status` answers per FAKE_STATUS; the worker behaves per FAKE_WORKER.
    "ray": """#!/bin/bash
case "$1" in
  status)
    [ "$FAKE_STATUS" = down ] && exit 1
    printf 'Node status\\n----\\nActive:\\n 1 node_aaaa\\nPending:\\n (no pending nodes)\\n'; exit 0 ;;
  start)
    if [[ " $* " == *" --head "* ]]; then echo "Ray runtime started."; exec sleep 1001; fi
    [ "$FAKE_WORKER" = die ] && { echo "worker: cannot reach GCS" >&2; exit 3; }
    exec sleep 1002 ;;
esac
""",
}


def run_bringup(tmp_path: Path, **env: str) -> tuple[int, str, float]:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name, text in FAKES.items():
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    full_env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
                "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_SUBMIT_DIR": str(REPO), "SAGE_VENV": "none",
                "SAGE_LOG_DIR": str(tmp_path / "logs"), "SAGE_RAY_TIMEOUT": "4", **env}
    t0 = time.monotonic()
    p = subprocess.run(["bash", "-c", f'set -euo pipefail; source "{REPO}/scripts/slurm/common.sh"; '
                       "sage_setup; sage_ray_up; echo UP"],
                       capture_output=True, text=True, env=full_env, timeout=60)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t0


def no_fake_sleepers() -> bool:
    ps = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout.splitlines()
    return not any(ln.strip() in ("sleep 1001", "sleep 1002") for ln in ps)


def test_worker_that_never_joins_is_named_after_the_timeout(tmp_path):
    rc, out, took = run_bringup(tmp_path)
    assert rc == 1, out
    assert "only 1 of 2 nodes joined the Ray cluster within 4s; not joined: n2" in out, out
    assert "UP" not in out and took < 30
    assert no_fake_sleepers(), "the EXIT trap must stop the background Ray steps"


def test_worker_that_dies_fails_fast_with_its_log(tmp_path):
    rc, out, took = run_bringup(tmp_path, FAKE_WORKER="die", SAGE_RAY_TIMEOUT="60")
    assert rc == 1, out
    assert "Ray worker on n2 exited" in out and "worker: cannot reach GCS" in out, out
    assert "a Ray step died during start-up" in out
    assert took < 30, f"should fail fast, took {took:.0f} s"
    assert no_fake_sleepers()


def test_head_that_never_answers_times_out_naming_it(tmp_path):
    rc, out, _ = run_bringup(tmp_path, FAKE_STATUS="down", SAGE_RAY_TIMEOUT="3")
    assert rc == 1, out
    assert "Ray head on n1 (10.9.0.1:6379) did not answer `ray status` within 3s" in out, out
    assert no_fake_sleepers()


def test_node_ifname_selects_the_address(tmp_path):
    # GLOO_SOCKET_IFNAME naming one interface becomes the node-address interface; a missing one fails.
    rc, out, _ = run_bringup(tmp_path, GLOO_SOCKET_IFNAME="no_such_if0")
    assert rc == 1 and "no IPv4 address on interface no_such_if0" in out, out
