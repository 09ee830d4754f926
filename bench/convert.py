#!/usr/bin/env python
"""Benchmark: HF -> Megatron dist-checkpoint conversion of a ~1B-parameter Llama-layout model, and back.

  python bench/convert.py --json OUT [--tp 2 --pp 1 --repeats 2 --dtype bfloat16 --threads 1
                                      --max-stage-bytes 1073741824]

Side by side in one run, interleaved (floor, convert, export, floor, convert, export) because disk speed
here depends on what ran just before: `floor_seconds` reads and writes the same bytes with plain
safetensors (load_file + save_file); `convert_seconds` is tools/convert's hf_to_megatron at the given
layout (one process, in this one); `export_seconds` is megatron_to_hf of that checkpoint (streamed in
groups of --max-stage-bytes). Reports medians, convert/floor and export/floor, and for both directions
the peak RSS (/proc VmHWM, reset before each) and its growth over the process's RSS at the start,
against the model's bytes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def make_random_llama(out: Path, *, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                      dtype: torch.dtype) -> int:
    """A random Llama-layout HF checkpoint written tensor by tensor (never a whole fp32 model in RAM)."""
    from safetensors.torch import save_file

    from sage_megatron.parallel import weight_maps as wm
    from sage_megatron.parallel.model import arch_from_hf_config
    from sage_megatron.testing.tiny_models import build_char_tokenizer, tiny_config

    cfg = tiny_config("llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv_heads, ffn_hidden_size=ffn, max_position_embeddings=4096)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.torch_dtype = dtype
    out.mkdir(parents=True)
    cfg.save_pretrained(out)
    build_char_tokenizer().save_pretrained(out)
    arch = arch_from_hf_config(json.loads((out / "config.json").read_text()))
    gen = torch.Generator().manual_seed(0)
    shard, params, index, n = {}, 0, {}, 0
    for name, shape in wm.hf_tensor_shapes(arch).items():
        shard[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        params += shard[name].numel()
        if sum(t.numel() for t in shard.values()) > 300_000_000:
            n += 1
            save_file(shard, str(out / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
            index.update({k: f"model-{n:05d}.safetensors" for k in shard})
            shard = {}
    if shard:
        n += 1
        save_file(shard, str(out / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
        index.update({k: f"model-{n:05d}.safetensors" for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return params


def floor_copy(src: Path, dst: Path) -> float:
    """Read every safetensors file fully and write it back out: the I/O floor of a conversion."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    t0 = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        save_file(load_file(str(f)), str(dst / f.name))
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=1, help="the import's writer threads")
    p.add_argument("--max-stage-bytes", type=int, default=1 << 30, help="export group size (megatron_to_hf)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed after)")
    a = p.parse_args()
    from sage_megatron.provenance import provenance, run_start

    start = run_start()   # the machine must be quiet: recorded with the result
    from sage_megatron.parallel.convert import hf_to_megatron, megatron_to_hf
    from sage_megatron.parallel.precision import parse_dtype

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        t0 = time.perf_counter()
        params = make_random_llama(work / "hf", hidden=a.hidden, layers=a.layers, ffn=a.ffn, heads=a.heads,
                                   kv_heads=a.kv_heads, vocab=a.vocab, dtype=parse_dtype(a.dtype))
        nbytes = sum(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
        print(f"made a {params / 1e9:.2f}B-parameter {a.dtype} model ({nbytes / 2**30:.2f} GiB) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        floors, converts, exports, convert_runs, export_runs = [], [], [], [], []
        for i in range(a.repeats):
            floors.append(floor_copy(work / "hf", work / f"floor{i}"))
            shutil.rmtree(work / f"floor{i}")
            r = hf_to_megatron(work / "hf", work / f"ckpt{i}", tp=a.tp, pp=a.pp, thread_count=a.threads)
            converts.append(r["seconds"])
            convert_runs.append(r)
            e = megatron_to_hf(work / f"ckpt{i}", work / f"export{i}", max_stage_bytes=a.max_stage_bytes)
            exports.append(e["seconds"])
            export_runs.append(e)
            shutil.rmtree(work / f"ckpt{i}")
            shutil.rmtree(work / f"export{i}")
            print(f"repeat {i}: floor {floors[-1]:.1f} s, convert {converts[-1]:.1f} s, export {exports[-1]:.1f} s "
                  f"(peak RSS {e['peak_rss_gib']:.2f} GiB)", flush=True)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "model": f"random Llama layout, hidden {a.hidden}, {a.layers} layers, ffn {a.ffn}, "
                 f"heads {a.heads}/{a.kv_heads}, vocab {a.vocab}",
        "params": params, "bytes": nbytes, "dtype": a.dtype, "tp": a.tp, "pp": a.pp, "repeats": a.repeats,
        "threads": a.threads,
        "convert_seconds": statistics.median(converts), "floor_seconds": statistics.median(floors),
        "convert_over_floor": statistics.median(converts) / statistics.median(floors),
        "convert_seconds_all": converts, "floor_seconds_all": floors,
        "convert_gib_per_s": nbytes / 2**30 / statistics.median(converts),
        "convert_phase_seconds": {k: statistics.median(r["phase_seconds"][k] for r in convert_runs)
                                  for k in convert_runs[0]["phase_seconds"]},
        "convert_tensor_bytes": convert_runs[0]["tensor_bytes"],
        "convert_peak_rss_gib": max(r["peak_rss_gib"] for r in convert_runs),
        "convert_baseline_rss_gib": min(r["baseline_rss_gib"] for r in convert_runs),
        "convert_rss_growth_gib": max(r["rss_growth_gib"] for r in convert_runs),
        "export_seconds": statistics.median(exports), "export_seconds_all": exports,
        "export_over_floor": statistics.median(exports) / statistics.median(floors),
        "export_max_stage_bytes": a.max_stage_bytes,
        "export_model_bytes": export_runs[0]["model_bytes"],
        "export_peak_rss_gib": max(e["peak_rss_gib"] for e in export_runs),
        "export_baseline_rss_gib": min(e["baseline_rss_gib"] for e in export_runs),
    }
    growth = max(e["peak_rss_gib"] - e["baseline_rss_gib"] for e in export_runs)
    result["export_rss_growth_gib"] = growth
    result["export_rss_growth_over_model_bytes"] = growth * 2**30 / result["export_model_bytes"]
    result["convert_peak_rss_over_model_bytes"] = result["convert_peak_rss_gib"] * 2**30 / result["export_model_bytes"]
    result["convert_rss_growth_over_model_bytes"] = (result["convert_rss_growth_gib"] * 2**30
                                                     / result["export_model_bytes"])
    print("\n| params | bytes (GiB) | layout | convert s | floor s | convert/floor | peak RSS GiB | peak/model "
          "| growth GiB | growth/model |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {params / 1e9:.2f}B | {nbytes / 2**30:.2f} | tp{a.tp} pp{a.pp} | {result['convert_seconds']:.1f} | "
          f"{result['floor_seconds']:.1f} | {result['convert_over_floor']:.2f} | "
          f"{result['convert_peak_rss_gib']:.2f} | {result['convert_peak_rss_over_model_bytes']:.2f} | "
          f"{result['convert_rss_growth_gib']:.2f} | {result['convert_rss_growth_over_model_bytes']:.2f} |")
    phases = result["convert_phase_seconds"]
    print("\nconvert (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
          + f"; the remaining {result['convert_seconds'] - sum(phases.values()):.2f} s is the side files and metadata")
    print("\n| export s | export/floor | model GiB | export peak RSS GiB | growth over baseline GiB | growth/model |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['export_seconds']:.1f} | {result['export_over_floor']:.2f} | "
          f"{result['export_model_bytes'] / 2**30:.2f} | {result['export_peak_rss_gib']:.2f} | {growth:.2f} | "
          f"{result['export_rss_growth_over_model_bytes']:.2f} |")
    result.update(provenance(start=start))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
