"""Llama-3 ("llama3") rope scaling with any parameters, computed as HF transformers does.

Why this exists: megatron-core 0.16's ``RotaryEmbedding._apply_scaling`` hard-codes Llama 3.1's
low_freq_factor=1, high_freq_factor=4 and original_max_position_embeddings=8192 (only the factor is
configurable). A checkpoint with other values (e.g. a small model with a short original context) would
silently get different rotary frequencies, hence different logits. So the inverse frequencies are computed here, exactly as transformers'
``modeling_rope_utils._compute_llama3_parameters`` does (same operations, same dtype), and
``model._gpt_model`` hands them to megatron's rotary embedding. Pure: no megatron import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# megatron-core 0.16's RotaryEmbedding._apply_scaling defaults (Llama 3.1's published values).
MEGATRON_LOW_FREQ_FACTOR = 1.0
MEGATRON_HIGH_FREQ_FACTOR = 4.0
MEGATRON_ORIGINAL_MAX_POSITION_EMBEDDINGS = 8192


@dataclass(frozen=True)
class Llama3RopeScaling:
    """HF ``rope_parameters`` of ``rope_type: "llama3"`` (rope_theta is kept on ModelArch)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    @classmethod
    def llama31(cls, factor: float) -> Llama3RopeScaling:
        """The values megatron-core hard-codes (and that metadata written before this class implied)."""
        return cls(factor=float(factor), low_freq_factor=MEGATRON_LOW_FREQ_FACTOR,
                   high_freq_factor=MEGATRON_HIGH_FREQ_FACTOR,
                   original_max_position_embeddings=MEGATRON_ORIGINAL_MAX_POSITION_EMBEDDINGS)


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Unscaled rotary inverse frequencies, float32 on CPU (transformers' ``_compute_default_rope_parameters``)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))


def llama3_inv_freq(scaling: Llama3RopeScaling, *, head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,), float32 on CPU, bit-equal to transformers' ``inv_freq``
    for rope_type "llama3" (``_compute_llama3_parameters``; its attention factor is 1.0)."""
    inv_freq = default_inv_freq(head_dim, theta)
    factor = scaling.factor
    low_freq_factor = scaling.low_freq_factor
    high_freq_factor = scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    # wavelen < high_freq_wavelen: unchanged; wavelen > low_freq_wavelen: divided by factor
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # in between: interpolated with a smooth factor
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
