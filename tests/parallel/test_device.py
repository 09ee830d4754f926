"""The device layer: shims only where CUDA is absent, and the CPU RNG tracker they install."""
import torch

from sage_megatron.parallel import device


def test_shim_decision():
    assert device.needs_cpu_shims(cuda_is_available=False) is True
    assert device.needs_cpu_shims(cuda_is_available=True) is False


def test_backend_decision():
    assert device.distributed_backend(cuda_is_available=True) == "nccl"
    assert device.distributed_backend(cuda_is_available=False) == "gloo"


def test_shims_not_applied_when_cuda_present(monkeypatch):
    monkeypatch.setattr(device, "_SHIMS_APPLIED", False)
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    before = torch.cuda.current_device
    assert device.apply_cpu_shims() is False
    assert torch.cuda.current_device is before


def test_cpu_rng_tracker_fork_is_isolated_and_reproducible():
    tracker = device.CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 1234)
    torch.manual_seed(7)
    outside_expected = torch.rand(3)
    torch.manual_seed(7)
    with tracker.fork():
        inside = torch.rand(3)
    outside = torch.rand(3)
    assert torch.equal(outside, outside_expected)  # fork restored the default generator
    torch.manual_seed(1234)
    assert torch.equal(inside, torch.rand(3))       # the fork drew from seed 1234's stream


def test_cuda_to_cpu_mode_rewrites_factories():
    with device.CudaToCpuMode():
        t = torch.zeros(2, device="cuda")
        u = torch.ones(1).cuda()
    assert t.device.type == "cpu" and u.device.type == "cpu"
