"""torch.distributed + megatron parallel state for one process of a (tp, pp, dp) layout."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from sage_megatron.parallel.device import apply_cpu_shims, cuda_available, distributed_backend
from sage_megatron.parallel.layout import ParallelLayout


def init_parallel(layout: ParallelLayout, *, seed: int = 1234, timeout_s: int = 600) -> None:
    """Initialise the default process group (env:// rendezvous) and megatron's model-parallel groups."""
    from megatron.core import parallel_state

    on_gpu = cuda_available()
    if on_gpu:   # a Ray rank actor sees its one GPU as device 0; a torchrun rank sees the node's GPUs
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    else:
        apply_cpu_shims()
    if not dist.is_initialized():
        dist.init_process_group(
            backend=distributed_backend(cuda_is_available=on_gpu),
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    world = dist.get_world_size()
    if world != layout.world_size:
        raise RuntimeError(f"world size {world} != tp*pp*dp = {layout.world_size}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
    )
    seed_parallel(seed)


def seed_parallel(seed: int) -> None:
    """Megatron's per-rank RNG streams (model-parallel, data-parallel, expert) from ``seed``; again before
    each run of a session, so that a run draws the same numbers wherever it runs in the session."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def describe_rank() -> str:
    """``rank R (tp T, pp P, dp D) on HOST (IP)``: this process's place in the layout and the cluster."""
    import socket

    from megatron.core import parallel_state as ps

    host = socket.gethostname()
    ip = os.environ.get("SAGE_NODE_IP") or socket.gethostbyname(host)
    return (f"rank {dist.get_rank()} (tp {ps.get_tensor_model_parallel_rank()}, "
            f"pp {ps.get_pipeline_model_parallel_rank()}, dp {ps.get_data_parallel_rank()}) on {host} ({ip})")


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
