"""Process helpers shared by the launcher, the rollout pool, the reward worker and the test cluster."""
from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A TCP port free on ``host`` right now ("" = every interface; "127.0.0.1" for loopback-only use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def proc_start_time(pid: int) -> str | None:
    """Start time of ``pid`` from /proc (field 22, clock ticks since boot): with the pid it identifies a
    process, so a recorded (pid, start time) never matches a recycled pid. None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (PR_SET_PDEATHSIG), even mid-computation,
    so no orphan holds a collective or a worker pipe. Elsewhere a no-op."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except Exception:  # noqa: BLE001 - not Linux
        pass


def reap_children(timeout_s: float = 2.0) -> None:
    """End the multiprocessing children this process started (megatron's dist_checkpointing keeps a
    Manager server per process): orphaned, they would hold the launcher's stdout/stderr pipes open, so a
    caller reading them would never see end-of-file."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=timeout_s)
