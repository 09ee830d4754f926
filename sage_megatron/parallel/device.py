"""The one device layer: what differs between CPU (gloo, local spec) and GPU (NCCL, TE) runs.

Everything else in the package is device-agnostic. On CPU, megatron-core 0.16.1 makes a few
CUDA assumptions; each shim below names the megatron-core function it covers. They are applied
only when CUDA is absent (``needs_cpu_shims``), once per process, by ``apply_cpu_shims``.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode


def cuda_available() -> bool:
    return torch.cuda.is_available()


def needs_cpu_shims(*, cuda_is_available: bool) -> bool:
    """Shims go in only where CUDA is absent; on a GPU node megatron runs untouched."""
    return not cuda_is_available


def distributed_backend(*, cuda_is_available: bool) -> str:
    """torch.distributed backend: NCCL on GPU nodes, gloo on CPU."""
    return "nccl" if cuda_is_available else "gloo"


def compute_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


_SHIMS_APPLIED = False


def apply_cpu_shims() -> bool:
    """Install the CPU shims if CUDA is absent. Returns whether they are (now) installed."""
    global _SHIMS_APPLIED
    if _SHIMS_APPLIED:
        return True
    if not needs_cpu_shims(cuda_is_available=cuda_available()):
        return False
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mpu_random
    from megatron.core.transformer import utils as transformer_utils

    # rotary_pos_embedding.RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device(),
    # and pipeline p2p / schedules allocate with device=torch.cuda.current_device(): on a
    # CPU-only torch that call raises, so it answers "cpu" (a valid device for .to()/factories).
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]

    # dist_checkpointing/strategies/filesystem_async.preload_tensors (and async_utils) call
    # torch.cuda.synchronize() after device-to-host copies; with no CUDA there is nothing to wait for.
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]

    # transformer/utils.get_default_causal_mask (also imported by fusions/fused_softmax)
    # allocates the causal mask on "cuda".
    @functools.lru_cache(maxsize=32)
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    transformer_utils.get_default_causal_mask = cpu_causal_mask
    fused_softmax.get_default_causal_mask = cpu_causal_mask

    # tensor_parallel/random.model_parallel_cuda_manual_seed and the tracker's fork() read and
    # write CUDA RNG states: a tracker over the CPU generator takes its place.
    mpu_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _SHIMS_APPLIED = True
    return True


def _cpu_rng_tracker_base():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    return CudaRNGStatesTracker


class CpuRNGStatesTracker(_cpu_rng_tracker_base()):
    """megatron's CudaRNGStatesTracker with the CPU default generator in place of CUDA's."""

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites device="cuda" in tensor factories to CPU.

    Scoped (``on_cpu_if_needed()``) around megatron's optimizer construction/step
    (optimizer/__init__.get_megatron_optimizer, optimizer/clip_grads) and the pipeline schedule
    call (pipeline_parallel/schedules), which allocate small tensors on "cuda"; the model's hot
    path runs outside it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and "cuda" in str(dev):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to and args and len(args) > 1 and "cuda" in str(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # optimizer/clip_grads.clip_grad_by_total_norm_fp32 asserts
            # grad.type() == 'torch.cuda.FloatTensor', and optimizer/optimizer.
            # Float16OptimizerWithFloat16Params.__init__ accepts only 'torch.cuda.{Half,BFloat16,Float}Tensor':
            # the query (no target type) answers with the CUDA name of the same dtype.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_cpu_if_needed():
    """Enter CudaToCpuMode when CUDA is absent; a no-op on GPU."""
    if needs_cpu_shims(cuda_is_available=cuda_available()):
        with CudaToCpuMode():
            yield
    else:
        yield
