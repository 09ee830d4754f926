"""Run a function on N real processes with a torch.distributed env:// rendezvous (gloo on CPU).

Used by the converter, logit comparison and the multi-process tests. Under torchrun or srun the
caller is already one rank: ``launched_externally()`` tells, and nothing is spawned.
"""
from __future__ import annotations

import os
import pickle
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from sage_megatron.procs import die_with_parent, free_port, reap_children


def launched_externally() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _child(rank: int, world_size: int, port: int, threads: int, fn, args, kwargs, queue) -> None:
    die_with_parent()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # All ranks are on this machine: gloo must pair over loopback, not over whatever address the
    # hostname resolves to (a bridge or a namespace veth on a test cluster host hangs the rendezvous).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent dumps our stacks on a time-out
    import torch

    torch.set_num_threads(threads)
    try:
        # Plain pickle bytes: tensors would otherwise travel as shared-memory descriptors that can
        # vanish when this rank exits before the parent has read them (ConnectionResetError).
        queue.put((rank, "ok", pickle.dumps(fn(*args, **kwargs))))
    except BaseException:  # report every failure with its traceback to the parent
        queue.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        try:
            from sage_megatron.parallel.distributed import destroy_parallel

            destroy_parallel()
        except Exception:
            pass
        reap_children()


def _dump_stacks(procs) -> None:
    import signal
    import time

    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGUSR1)
    time.sleep(1.0)


def run_distributed(fn: Callable, *, world_size: int, args: tuple = (), kwargs: dict | None = None,
                    timeout_s: float | None = None, threads_per_rank: int | None = None) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return each rank's result.

    ``fn`` must be importable (module level) and return something picklable. The first failing rank's
    traceback is raised in the caller.
    """
    timeout_s = timeout_s or float(os.environ.get("SAGE_DIST_TIMEOUT_S", "1800"))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port("127.0.0.1")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    procs = [ctx.Process(target=_child, args=(r, world_size, port, threads, fn, args, kwargs or {}, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world_size:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    _dump_stacks(procs)
                    raise TimeoutError(f"distributed run of {fn.__name__} exceeded {timeout_s:.0f} s "
                                       "(rank stacks dumped to stderr above)")
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in errors]
                if dead and not errors:
                    # A rank died without reporting (killed, segfault): wait briefly for stragglers' reports.
                    time.sleep(2)
                    if queue.empty():
                        raise RuntimeError(f"rank(s) {dead} of {fn.__name__} died with exit codes "
                                           f"{[procs[r].exitcode for r in dead]} before reporting")
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
            if errors:
                break
    finally:
        # Ranks that reported still tear down (process groups, their own helper processes): let them
        # exit on their own before terminating stragglers, or their children outlive them.
        grace = time.monotonic() + 30
        for p in procs:
            p.join(timeout=max(0.1, grace - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {fn.__name__} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
