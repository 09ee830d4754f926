"""The catalogue the performance model reads: hardware peaks (H100 SXM, this CPU machine, and
`measure_cpu_hardware`, which re-measures the CPU) and model shapes (`ModelSpec`, the `MODELS`
presets). Data only, plus the one measuring function; the formulas are in `formulas.py`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------
# hardware


@dataclass(frozen=True)
class Hardware:
    """Per-GPU (or per-"node" for CPU profiles) peak numbers. Bandwidths are per direction."""

    name: str
    peak_flops: float
    """Dense bf16 tensor FLOP/s per device (no sparsity)."""
    peak_flops_fp8: float
    """Dense FP8 FLOP/s per device."""
    hbm_bw: float
    """Device memory bandwidth, bytes/s."""
    hbm_bytes: float
    """Device memory capacity, bytes."""
    intra_bw: float
    """Intra-node device-to-device bandwidth per device per direction (NVLink), bytes/s."""
    inter_bw: float
    """Inter-node bandwidth per device per direction (one NIC per GPU), bytes/s."""
    devices_per_node: int
    host_bw: float = 25e9
    """Device <-> host memory bandwidth achieved per device (PCIe Gen5 x16: 64 GB/s peak), bytes/s;
    used for the colocated hand-over (offload training state, wake the engine)."""
    intra_latency_s: float = 3e-6
    """Latency of one small collective inside a node."""
    inter_latency_s: float = 10e-6
    """Latency of one small collective across nodes."""


H100_SXM = Hardware(
    name="H100 SXM 80GB",
    peak_flops=989e12,       # bf16 dense (1979 is the 2:4-sparsity figure)
    peak_flops_fp8=1979e12,  # fp8 dense
    hbm_bw=3.35e12,          # HBM3
    hbm_bytes=80e9,
    intra_bw=450e9,          # NVLink 4: 900 GB/s per GPU total, 450 per direction
    inter_bw=400e9 / 8,      # InfiniBand NDR 400 Gb/s per GPU (8 NICs per node) = 50 GB/s
    devices_per_node=8,
)

# Dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name (first match wins: the specific
# names before "H100"); vendor datasheet figures without sparsity. H200 has H100 SXM's compute.
GPU_BF16_DENSE_PEAKS = (("H200", H100_SXM.peak_flops), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
                        ("H100", H100_SXM.peak_flops), ("GH200", H100_SXM.peak_flops), ("B200", 2250e12),
                        ("A100", 312e12), ("L40S", 362e12))

# This machine as measured in Nov 2026 (docs/platform.md; `measure_cpu_hardware` re-measures):
# one core ~90 GFLOP/s fp32 / ~360 bf16 (AMX) matmul, memcpy ~12 GB/s per core. Emulated Slurm
# nodes are network namespaces on one host: "inter-node" traffic is a veth bridge (~1-3 GB/s via
# TCP loopback-like paths). One "device" per emulated node. The real trainer's efficiency factors on
# this machine are fitted to its runs: perf.formulas.CPU_FITTED_EFFICIENCY (bench/scaling.py --fit).
CPU_THIS_MACHINE = Hardware(
    name="this CPU (1 core per emulated node)",
    peak_flops=90e9, peak_flops_fp8=90e9, hbm_bw=12e9, hbm_bytes=8e9,
    intra_bw=12e9, inter_bw=1.5e9, devices_per_node=1,
    intra_latency_s=20e-6, inter_latency_s=100e-6,
)


# ----------------------------------------------------------------------------------------------
# models


@dataclass(frozen=True)
class ModelSpec:
    """A dense decoder-only transformer (Llama / Qwen2 family: GQA attention, SwiGLU MLP)."""

    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0
    """0 = hidden // heads (Qwen3 sets it independently)."""
    tied_embeddings: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def params(self) -> int:
        """N = L * (h*(H*d) + 2*h*(K*d) + (H*d)*h + 3*h*f + 2*h) + V*h*(1 or 2) + h.

        Attention q, k, v, o projections (H heads, K kv-heads of size d), SwiGLU gate/up/down
        (3*h*f), two RMSNorms per layer, embeddings (untied: input + output), final norm.
        Biases (Qwen2 has q/k/v biases, ~0.01% of N) are left out.
        """
        h, d = self.hidden, self.hd
        attn = h * self.heads * d + 2 * h * self.kv_heads * d + self.heads * d * h
        per_layer = attn + 3 * h * self.ffn + 2 * h
        emb = self.vocab * h * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + emb + h

    @property
    def tensors(self) -> int:
        """Weight tensors in HF layout: 9 per layer (q, k, v, o, gate, up, down, 2 norms) +
        embeddings, final norm, and the output head when untied."""
        return 9 * self.layers + 2 + (0 if self.tied_embeddings else 1)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV cache per token: 2 (K and V) * L * K * d * bytes."""
        return 2 * self.layers * self.kv_heads * self.hd * dtype_bytes


MODELS: dict[str, ModelSpec] = {
    # Qwen2.5-7B-Instruct config.json
    "7b": ModelSpec("Qwen2.5-7B", layers=28, hidden=3584, ffn=18944, heads=28, kv_heads=4, vocab=152064),
    # Qwen2.5-32B-Instruct
    "32b": ModelSpec("Qwen2.5-32B", layers=64, hidden=5120, ffn=27648, heads=40, kv_heads=8, vocab=152064),
    # Llama-3.1-70B-Instruct
    "70b": ModelSpec("Llama-3.1-70B", layers=80, hidden=8192, ffn=28672, heads=64, kv_heads=8, vocab=128256),
    # for comparisons with published runs
    "llama3.1-8b": ModelSpec("Llama-3.1-8B", layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8,
                             vocab=128256),
    "qwen3-32b": ModelSpec("Qwen3-32B", layers=64, hidden=5120, ffn=25600, heads=64, kv_heads=8,
                           vocab=151936, head_dim=128),
    # the stand-in workload of bench/scaling.py (CPU)
    "tiny": ModelSpec("tiny-cpu", layers=4, hidden=256, ffn=1024, heads=4, kv_heads=2, vocab=512),
}


# ----------------------------------------------------------------------------------------------
# measured


def measure_cpu_hardware(*, threads: int = 1, seconds: float = 0.5, inter_bw: float | None = None) -> Hardware:
    """Measures this machine (matmul FLOP/s and copy bandwidth with `threads` threads) and
    returns a one-device-per-node Hardware. inter_bw (emulated-node network) is taken as given
    (bench/scaling.py measures it with Ray)."""
    import time

    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(512, 512)
        b = torch.randn(512, 512)
        a @ b
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        flops = 2 * 512 ** 3 * n / (time.perf_counter() - t0)
        x = torch.empty(32 * 2 ** 20 // 4)
        y = torch.empty_like(x)
        y.copy_(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            y.copy_(x)
            n += 1
        bw = x.numel() * 4 * n / (time.perf_counter() - t0)  # bytes read (copy also writes as much)
    finally:
        torch.set_num_threads(old)
    base = CPU_THIS_MACHINE
    return dataclasses.replace(base, name=f"this CPU ({threads} thread(s), measured)", peak_flops=flops,
                               peak_flops_fp8=flops, hbm_bw=bw, intra_bw=bw,
                               inter_bw=inter_bw if inter_bw is not None else base.inter_bw)
