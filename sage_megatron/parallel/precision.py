"""Precision options (dtype, FP8) mapped onto megatron-core TransformerConfig fields.

FP8 runs only with the Transformer Engine layer spec on Hopper-class GPUs. The mapping is pure and
imports no TE, so it is unit-tested on CPU; ``require_te_for`` fails early with an actionable error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Fp8Options:
    """FP8 training settings (Transformer Engine only)."""

    format: str | None = None          # None (off), "e4m3" (fwd+bwd e4m3) or "hybrid" (e4m3 fwd, e5m2 grads)
    recipe: str = "delayed"            # "delayed" (amax history), "tensorwise" (current scaling), "blockwise" (1x128/128x128)
    amax_history_len: int = 1024       # delayed recipe only
    amax_compute_algo: str = "max"     # delayed recipe only: "max" or "most_recent"
    margin: int = 0
    fp8_param: bool = False            # keep parameters in FP8 (saves memory; needs TE >= 1.x)
    first_last_layers_bf16: bool = False  # keep the first/last layer in bf16 (stability)


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def precision_config_kwargs(*, dtype: torch.dtype, fp8: Fp8Options | None, use_te: bool) -> dict:
    """TransformerConfig keyword arguments for a dtype and optional FP8 options."""
    kwargs: dict = {
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
    }
    if fp8 is None or fp8.format is None:
        return kwargs
    if fp8.format not in FP8_FORMATS:
        raise ValueError(f"fp8.format={fp8.format!r}: choose one of {FP8_FORMATS} (or leave unset for no FP8)")
    if fp8.recipe not in FP8_RECIPES:
        raise ValueError(f"fp8.recipe={fp8.recipe!r}: choose one of {FP8_RECIPES}")
    if fp8.amax_compute_algo not in ("max", "most_recent"):
        raise ValueError(f"fp8.amax_compute_algo={fp8.amax_compute_algo!r}: choose 'max' or 'most_recent'")
    if not use_te:
        raise ValueError("FP8 needs the Transformer Engine layer spec (GPU). Set model.use_te=true on an H100 node, "
                         "or model.fp8=null for the local spec (CPU).")
    if dtype == torch.float32:
        raise ValueError("FP8 is used with bf16 master compute: set dtype=bfloat16 (model.dtype) with FP8")
    kwargs.update(
        fp8=fp8.format,
        fp8_recipe=fp8.recipe,
        fp8_margin=fp8.margin,
        fp8_param=fp8.fp8_param,
        first_last_layers_bf16=fp8.first_last_layers_bf16,
    )
    if fp8.recipe == "delayed":
        kwargs.update(fp8_amax_history_len=fp8.amax_history_len, fp8_amax_compute_algo=fp8.amax_compute_algo)
    return kwargs


def transformer_engine_available() -> bool:
    """True where transformer_engine.pytorch imports (a CUDA node with TE installed)."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def require_te_for(*, use_te: bool) -> None:
    if use_te and not transformer_engine_available():
        raise RuntimeError(
            "model.use_te=true but Transformer Engine is not importable here. Run inside the NGC PyTorch "
            "container on a GPU node (TE ships there), or set model.use_te=false for the local spec (CPU)."
        )
