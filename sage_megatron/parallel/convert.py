"""HF <-> Megatron dist-checkpoint conversion and logit comparison (the logic behind tools/convert).

A converted checkpoint folder holds:
  sage_megatron.json   metadata: format, architecture, padded vocabulary, dtype, layout written at, source
  hf/                  the HF config and tokenizer files (export writes them back unchanged)
  dist/                megatron-core dist checkpoint (torch_dist), loadable at any TP/PP
All inputs are checked in the calling process before any rank is spawned.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sage_megatron.fsutil import atomic_output_dir
from sage_megatron.parallel import weight_maps as wm
from sage_megatron.parallel.hf_io import CheckpointError, HFReader, copy_side_files, write_hf_safetensors
from sage_megatron.parallel.launch import run_distributed
from sage_megatron.parallel.layout import ParallelLayout, padded_vocab_size, validate_layout
from sage_megatron.parallel.model import ModelArch, arch_from_hf_config, arch_from_json, read_hf_config
from sage_megatron.parallel.precision import parse_dtype

META_FILE = "sage_megatron.json"
FORMAT = "sage_megatron.dist/1"


@dataclass(frozen=True)
class CheckpointMeta:
    arch: ModelArch
    padded_vocab: int
    dtype: str
    written_layout: ParallelLayout
    source: str

    def to_json(self) -> dict:
        from dataclasses import asdict

        return {"format": FORMAT, "family": self.arch.family, "hf_architecture": self.arch.hf_architecture,
                "arch": asdict(self.arch), "padded_vocab_size": self.padded_vocab, "dtype": self.dtype,
                "written_layout": {"tp": self.written_layout.tp, "pp": self.written_layout.pp},
                "source": self.source}


def read_meta(ckpt_dir: str | Path) -> CheckpointMeta:
    ckpt = Path(ckpt_dir)
    path = ckpt / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {ckpt} is not a sage_megatron checkpoint "
                              "(write one with tools/convert/hf_to_megatron.py)")
    try:
        raw = json.loads(path.read_text())
        meta = CheckpointMeta(arch=arch_from_json(raw["arch"]), padded_vocab=int(raw["padded_vocab_size"]),
                              dtype=raw["dtype"], written_layout=ParallelLayout(**raw["written_layout"]),
                              source=raw.get("source", ""))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is corrupt ({type(err).__name__}: {err}); re-run the conversion") from None
    check_dist_files(ckpt / "dist")
    return meta


def check_dist_files(dist_dir: Path) -> None:
    """Every file the dist checkpoint's metadata refers to must exist (a missing shard fails here, early)."""
    if not (dist_dir / ".metadata").is_file():
        raise CheckpointError(f"{dist_dir}/.metadata not found: the dist checkpoint is incomplete; re-run the conversion")
    try:
        with open(dist_dir / ".metadata", "rb") as f:
            import pickle

            metadata = pickle.load(f)
        files = {info.relative_path for info in metadata.storage_data.values()}
    except Exception as err:
        raise CheckpointError(f"{dist_dir}/.metadata is unreadable ({err}); re-run the conversion") from None
    missing = sorted(f for f in files if not (dist_dir / f).is_file())
    if missing:
        raise CheckpointError(f"{dist_dir}: shard file(s) {', '.join(missing)} missing: the checkpoint is "
                              "incomplete or was partly deleted; re-run the conversion into a new --out-dir")


def check_layout_for(meta_or_arch: ModelArch, layout: ParallelLayout, padded_vocab: int) -> None:
    validate_layout(layout, num_layers=meta_or_arch.num_layers, num_attention_heads=meta_or_arch.num_attention_heads,
                    num_query_groups=meta_or_arch.num_query_groups)
    if padded_vocab % layout.tp:
        raise CheckpointError(f"the checkpoint's padded vocabulary {padded_vocab} is not divisible by tp={layout.tp}: "
                              "convert again from HF with this tp")


# ---- HF -> Megatron ---------------------------------------------------------------------------------

def _import_rank(hf_dir: str, dist_dir: str, layout: ParallelLayout, dtype_name: str, padded_vocab: int) -> dict:
    import resource

    import torch.distributed as dist

    from sage_megatron.parallel.distributed import init_parallel
    from sage_megatron.parallel.model import build_gpt_model
    from sage_megatron.parallel.shards import load_hf_into_model, save_dist_checkpoint

    init_parallel(layout)
    arch = arch_from_hf_config(read_hf_config(hf_dir))
    model = build_gpt_model(arch, layout=layout, padded_vocab=padded_vocab, dtype=parse_dtype(dtype_name))
    reader = HFReader(hf_dir)
    n = load_hf_into_model(model, arch=arch, get_hf=reader.get, padded_vocab=padded_vocab)
    dist.barrier()
    save_dist_checkpoint(model, dist_dir)
    return {"params_filled": n, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1, dtype: str | None = None,
                   overwrite: bool = False) -> dict:
    """Convert an HF checkpoint into a dist checkpoint written by tp*pp real ranks."""
    hf = Path(hf_dir)
    arch = arch_from_hf_config(read_hf_config(hf), source=str(hf / "config.json"))
    layout = ParallelLayout(tp=tp, pp=pp)
    validate_layout(layout, num_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
                    num_query_groups=arch.num_query_groups)
    reader = HFReader(hf)
    wm.check_hf_tensors(arch, reader.shapes(), source=str(hf))
    dtype_name = dtype or str(reader.dtype("model.embed_tokens.weight")).removeprefix("torch.")
    parse_dtype(dtype_name)
    padded = padded_vocab_size(arch.vocab_size, tp=tp)
    del reader
    t0 = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "dist").mkdir()
        ranks = run_distributed(_import_rank, world_size=layout.world_size,
                                args=(str(hf), str(tmp / "dist"), layout, dtype_name, padded))
        copy_side_files(hf, tmp / "hf")
        meta = CheckpointMeta(arch=arch, padded_vocab=padded, dtype=dtype_name, written_layout=layout,
                              source=str(hf.absolute()))
        (tmp / META_FILE).write_text(json.dumps(meta.to_json(), indent=1))
    return {"seconds": time.perf_counter() - t0, "ranks": ranks, **meta.to_json()}


# ---- Megatron -> HF ---------------------------------------------------------------------------------

def _export_rank(ckpt_dir: str, out_dir: str, max_shard_bytes: int) -> dict:
    import resource

    from sage_megatron.parallel.distributed import init_parallel
    from sage_megatron.parallel.model import build_gpt_model
    from sage_megatron.parallel.shards import iter_global_tensors, load_dist_checkpoint

    meta = read_meta(ckpt_dir)
    layout = ParallelLayout(1, 1, 1)
    init_parallel(layout)
    model = build_gpt_model(meta.arch, layout=layout, padded_vocab=meta.padded_vocab, dtype=parse_dtype(meta.dtype))
    load_dist_checkpoint(model, str(Path(ckpt_dir) / "dist"))
    hf_tensors = wm.export_hf_tensors(meta.arch, iter_global_tensors(model, arch=meta.arch))
    nbytes = write_hf_safetensors(hf_tensors, Path(out_dir), max_shard_bytes=max_shard_bytes)
    return {"bytes": nbytes, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                   max_shard_bytes: int = 2 << 30) -> dict:
    """Export a dist checkpoint (written at any layout) to an HF folder loadable by transformers and vLLM."""
    ckpt = Path(ckpt_dir)
    meta = read_meta(ckpt)
    t0 = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        (result,) = run_distributed(_export_rank, world_size=1, args=(str(ckpt), str(tmp), max_shard_bytes))
        copy_side_files(ckpt / "hf", tmp)
    return {"seconds": time.perf_counter() - t0, **result, "family": meta.arch.family}


# ---- logit comparison -------------------------------------------------------------------------------

def reference_tokens(vocab_size: int, *, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen)


def _logits_rank(ckpt_dir: str, layout: ParallelLayout, tokens: torch.Tensor):
    from megatron.core import parallel_state as ps

    from sage_megatron.parallel.distributed import init_parallel
    from sage_megatron.parallel.forward import forward_logits
    from sage_megatron.parallel.model import build_gpt_model
    from sage_megatron.parallel.shards import load_dist_checkpoint

    meta = read_meta(ckpt_dir)
    init_parallel(layout)
    model = build_gpt_model(meta.arch, layout=layout, padded_vocab=meta.padded_vocab, dtype=parse_dtype(meta.dtype))
    load_dist_checkpoint(model, str(Path(ckpt_dir) / "dist"))
    model.eval()
    logits = forward_logits(model, tokens, vocab_size=meta.arch.vocab_size)
    keep = logits is not None and ps.get_tensor_model_parallel_rank() == 0
    return logits if keep else None


def megatron_logits(ckpt_dir: str | Path, tokens: torch.Tensor, *, tp: int = 1, pp: int = 1) -> torch.Tensor:
    """Logits (B, T, V) of the checkpoint run at (tp, pp) in tp*pp spawned ranks."""
    meta = read_meta(ckpt_dir)
    layout = ParallelLayout(tp=tp, pp=pp)
    check_layout_for(meta.arch, layout, meta.padded_vocab)
    results = run_distributed(_logits_rank, world_size=layout.world_size, args=(str(ckpt_dir), layout, tokens))
    return next(r for r in results if r is not None)


def hf_logits(hf_dir: str | Path, tokens: torch.Tensor, *, attn_implementation: str = "eager") -> torch.Tensor:
    """HF transformers' fp32 logits. "eager" attention has Megatron's local-spec operation order
    (scores, softmax, weighted sum), so differences left are those of the parallel layout itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def compare_logits(hf_dir: str | Path, ckpt_dir: str | Path, *, tp: int = 1, pp: int = 1, batch: int = 2,
                   seq: int = 32, seed: int = 0, hf_attn: str = "eager") -> dict:
    meta = read_meta(ckpt_dir)
    tokens = reference_tokens(meta.arch.vocab_size, batch=batch, seq=min(seq, meta.arch.max_position_embeddings),
                              seed=seed)
    mg = megatron_logits(ckpt_dir, tokens, tp=tp, pp=pp)
    ref = hf_logits(hf_dir, tokens, attn_implementation=hf_attn)
    diff = (mg - ref).abs()
    return {"tp": tp, "pp": pp, "family": meta.arch.family, "dtype": meta.dtype, "tokens": list(tokens.shape),
            "hf_attn_implementation": hf_attn,
            "max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "max_abs_logit": ref.abs().max().item()}
