#!/usr/bin/env python
"""The one-command GPU check: the real converter, actor, log-prob path and optimizer step on one device.

  scripts/gpu_check.sh                        # on the GPU machine (installs .whl/, then runs this file)
  python scripts/gpu_check.py --device cpu --tiny   # the same phases on a tiny model, CPU + gloo

Phases, each recorded in ONE JSON (rewritten after every phase, so a kill keeps what finished):
  environment    versions (torch, CUDA, megatron-core, transformers, python), device name, commit, command
  hf_model       a random Llama (HF LlamaForCausalLM from a config, fixed seed) saved as safetensors
  convert        sage_megatron.parallel.convert.hf_to_megatron (what tools/convert/hf_to_megatron.py
                 calls) at tp=1 pp=1: one spawned rank, as in every conversion
  actor          init_parallel + MegatronActor (local spec, DDP + megatron AdamW), as train.py builds it
  device_layer   what sage_megatron/parallel/device.py decided: CUDA branch, backend, no CPU shim installed
  parity_<dtype> per-token log-probs of the actor vs HF transformers (eager attention) on the same weights
  grpo_step      a synthetic GRPO batch through batch_from_groups -> actor.old_logprobs -> actor.train_step
  throughput     forward+backward tokens/s (the train_step schedule without the optimizer step) and full
                 train_step tokens/s; MFU against the device's dense bf16 peak
A failed phase records its error; later phases run where they can. Exit status 1 if any phase failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SCHEMA = "sage_megatron.gpu_check/1"

# Model shapes. "full": the ~0.44B Llama the GPU check runs; "tiny": the CPU smoke (same code path).
SIZES = {
    "full": dict(hidden_size=1024, num_layers=24, ffn_hidden_size=4096, num_heads=16, num_kv_heads=8,
                 vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, num_layers=2, ffn_hidden_size=128, num_heads=4, num_kv_heads=2,
                 vocab_size=512, max_position_embeddings=256),
}
# Workloads per size: parity batch, GRPO batch (groups x samples, prompt/response lengths), benchmark
# batch (sequences x length, micro-batch size), timing iterations, the GRPO step's learning rate.
WORKLOADS = {
    "full": dict(parity_batch=4, parity_seq=512, groups=2, group_size=4, prompt_len=64, response_len=(64, 448),
                 micro_batch_size=4, bench_batch=16, bench_seq=1024, bench_mbs=8, warmup=3, iters=10,
                 step_iters=3, lr=1e-4),
    "tiny": dict(parity_batch=2, parity_seq=48, groups=2, group_size=4, prompt_len=8, response_len=(8, 40),
                 micro_batch_size=2, bench_batch=4, bench_seq=64, bench_mbs=2, warmup=1, iters=3,
                 step_iters=2, lr=1e-3),
}
# Parity bounds on per-token log-prob differences (max, mean): they catch a wrong weight map or layout
# (differences of order 1), not rounding. fp32 on CPU: 1e-4 (the converter's own tests reach ~1e-5).
TOLERANCES = {("float32", "cpu"): (1e-4, 1e-5), ("float32", "cuda"): (2e-3, 1e-4),
              ("bfloat16", "cpu"): (0.5, 0.05), ("bfloat16", "cuda"): (0.5, 0.05)}
# Dense bf16 tensor-core peaks (no sparsity), matched on torch.cuda.get_device_name(). H100 SXM's
# 989 TFLOP/s is sage_megatron.perf.catalogue.H100_SXM; H200 has the same compute die and clocks.
def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else REPO / "runs" / "gpu_check.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: the GPU check (NCCL); cpu: hide CUDA, gloo + the CPU shims (smoke mode)")
    p.add_argument("--tiny", action="store_true", help="tiny model and batches (the CPU smoke)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="checkpoint / training dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json, else runs/gpu_check.json)")
    p.add_argument("--work-dir", default=None, help="where the HF and converted checkpoints go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="phases not started within this many seconds are skipped (recorded as failed)")
    p.add_argument("--peak-flops", type=float, default=None, help="override the device's peak FLOP/s for MFU")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    a.size = "tiny" if a.tiny else "full"
    a.out = Path(a.out) if a.out else default_out()
    return a


# ---- recording ---------------------------------------------------------------------------------------

class Report:
    """The JSON document: phases in order, each {"ok", "seconds", "error"?, ...data}, rewritten atomically."""

    def __init__(self, path: Path, budget_s: float):
        self.path, self.budget_s = path, budget_s
        self.t0 = time.perf_counter()
        self.doc: dict = {"schema": SCHEMA, "ok": None, "failed_phases": [], "phases": {}}

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=_jsonable) + "\n")
        os.replace(tmp, self.path)

    def run(self, name: str, fn, *needs: str) -> dict | None:
        """Run ``fn() -> dict`` as phase ``name``; its dict (or the error) goes into the report."""
        missing = [n for n in needs if not (self.doc["phases"].get(n) or {}).get("ok")]
        elapsed = time.perf_counter() - self.t0
        rec: dict
        if missing:
            rec = {"ok": False, "skipped": True, "seconds": 0.0, "error": f"skipped: needs phase(s) {missing}"}
        elif elapsed > self.budget_s:
            rec = {"ok": False, "skipped": True, "seconds": 0.0,
                   "error": f"skipped: time budget {self.budget_s:.0f} s spent ({elapsed:.0f} s elapsed)"}
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            t = time.perf_counter()
            try:
                data = fn() or {}
                rec = {"ok": bool(data.pop("ok", True)), "seconds": round(time.perf_counter() - t, 3), **data}
                if not rec["ok"] and "error" not in rec:
                    rec["error"] = "check failed (see the fields of this phase)"
            except BaseException as err:  # a phase failure is data; KeyboardInterrupt still ends the run
                rec = {"ok": False, "seconds": round(time.perf_counter() - t, 3),
                       "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
                if isinstance(err, KeyboardInterrupt):
                    self._store(name, rec)
                    raise
            print(f"[gpu_check] {name}: {'ok' if rec['ok'] else 'FAILED: ' + rec['error'][:300]} "
                  f"({rec['seconds']:.1f} s)", flush=True)
        self._store(name, rec)
        return rec if rec["ok"] else None

    def _store(self, name: str, rec: dict) -> None:
        self.doc["phases"][name] = rec
        self.doc["failed_phases"] = [n for n, r in self.doc["phases"].items() if not r["ok"]]
        self.doc["wall_seconds"] = round(time.perf_counter() - self.t0, 3)
        self.write()

    def finish(self) -> bool:
        ok = not self.doc["failed_phases"]
        self.doc["ok"] = ok
        self.doc["phase_seconds"] = {n: r["seconds"] for n, r in self.doc["phases"].items()}
        self.doc["wall_seconds"] = round(time.perf_counter() - self.t0, 3)
        self.write()
        return ok


def _jsonable(x):
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.tolist()
        if isinstance(x, (torch.dtype, torch.device)):
            return str(x)
    except ImportError:
        pass
    if isinstance(x, Path):
        return str(x)
    return repr(x)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# ---- the check ---------------------------------------------------------------------------------------

class Check:
    def __init__(self, args: argparse.Namespace, report: Report):
        import torch

        self.a, self.r = args, report
        self.size, self.work = SIZES[args.size], WORKLOADS[args.size]
        self.dtype_name = args.dtype
        self.dtype = getattr(torch, args.dtype)
        self.other_dtype_name = "float32" if args.dtype == "bfloat16" else "bfloat16"
        if args.work_dir:
            self.work_dir = Path(args.work_dir)
            self.work_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.work_dir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.hf_dir = self.work_dir / "hf"
        self.ckpt_dir = self.work_dir / "megatron"
        self.actor = None
        self.device = None

    def sync(self) -> None:
        import torch

        if self.a.device == "cuda":
            torch.cuda.synchronize()

    # -- environment --

    def environment(self) -> dict:
        import importlib.metadata as md

        import torch

        from sage_megatron.parallel.precision import transformer_engine_available
        from sage_megatron.provenance import provenance

        def version(dist: str) -> str | None:
            try:
                return md.version(dist)
            except md.PackageNotFoundError:
                return None

        import megatron.core

        env = {
            "requested_device": self.a.device, "size": self.a.size, "dtype": self.dtype_name,
            "python": platform.python_version(), "python_executable": sys.executable,
            "platform": platform.platform(), "hostname": platform.node(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "megatron_core": version("megatron-core"), "megatron_core_path": str(Path(megatron.core.__file__).parent),
            "transformers": version("transformers"), "safetensors": version("safetensors"), "numpy": version("numpy"),
            "transformer_engine_importable": transformer_engine_available(),
            "apex_importable": _importable("apex") and _importable("amp_C"),
            "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "wheel_site": os.environ.get("GPU_CHECK_SITE"),
            "install_seconds": _float_or_none(os.environ.get("GPU_CHECK_INSTALL_S")),
            "installed_wheels": [w for w in os.environ.get("GPU_CHECK_INSTALLED", "").split(",") if w],
            **provenance(os.environ.get("GPU_CHECK_COMMAND")),
        }
        source = REPO / ".whl" / "SOURCE_COMMIT"
        if env["commit"] == "unknown" and source.is_file():   # a copied work tree without .git
            env["commit"] = source.read_text().strip() or "unknown"
            env["commit_source"] = ".whl/SOURCE_COMMIT (written by scripts/gpu_check.sh --prepare)"
        env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        env["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        if self.a.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda but torch.cuda.is_available() is False "
                                   f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
            props = torch.cuda.get_device_properties(0)
            env.update(gpu_name=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                       gpu_capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1))
            try:
                v = torch.cuda.nccl.version()
                env["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
            except Exception as err:   # informational only
                env["nccl"] = f"unknown ({type(err).__name__})"
        return env

    # -- the HF model and its conversion --

    def hf_model(self) -> dict:
        import torch
        from transformers import LlamaForCausalLM

        from sage_megatron.testing.tiny_models import tiny_config

        s = self.size
        config = tiny_config("llama", vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                             num_layers=s["num_layers"], num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"],
                             ffn_hidden_size=s["ffn_hidden_size"], max_position_embeddings=s["max_position_embeddings"],
                             tie_word_embeddings=False)
        device = "cuda" if self.a.device == "cuda" else "cpu"
        torch.manual_seed(self.a.seed)
        with torch.device(device):
            model = LlamaForCausalLM(config)      # transformers' own init (normal, std initializer_range)
        with torch.no_grad():                     # norm weights away from 1, so a norm mapping error shows
            gen = torch.Generator(device=device).manual_seed(self.a.seed)
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn(p.shape, generator=gen, device=device) * 0.1)
        model.to(self.dtype).save_pretrained(self.hf_dir)
        n = sum(p.numel() for p in model.parameters())
        del model
        files = sorted(self.hf_dir.glob("*.safetensors"))
        return {"architecture": "LlamaForCausalLM", "params": n, "config": {**s, "tie_word_embeddings": False},
                "dtype": self.dtype_name, "seed": self.a.seed, "safetensors_files": [f.name for f in files],
                "safetensors_bytes": sum(f.stat().st_size for f in files)}

    def convert(self) -> dict:
        from sage_megatron.parallel.convert import hf_to_megatron

        r = hf_to_megatron(self.hf_dir, self.ckpt_dir, tp=1, pp=1, dtype=self.dtype_name, overwrite=True)
        dist_bytes = sum(f.stat().st_size for f in (self.ckpt_dir / "dist").rglob("*") if f.is_file())
        return {"function": "sage_megatron.parallel.convert.hf_to_megatron (tools/convert/hf_to_megatron.py)",
                "tp": 1, "pp": 1, "dtype": r["dtype"], "padded_vocab_size": r["padded_vocab_size"],
                "convert_seconds": round(r["seconds"], 3), "peak_rss_gib": round(r["peak_rss_gib"], 3), "phase_seconds": r["phase_seconds"], "dist_bytes": dist_bytes}

    # -- the actor --

    def actor_config(self, **over):
        from sage_megatron.actor.worker import ActorConfig
        from sage_megatron.parallel.layout import ParallelLayout

        w = self.work
        kw = dict(ckpt_dir=str(self.ckpt_dir), layout=ParallelLayout(1, 1, 1), dtype=None, lr=w["lr"],
                  micro_batch_size=w["micro_batch_size"])
        return ActorConfig(**{**kw, **over})

    def build_actor(self) -> dict:
        import torch

        from sage_megatron.actor.worker import MegatronActor
        from sage_megatron.parallel.device import compute_device
        from sage_megatron.parallel.distributed import init_parallel
        from sage_megatron.parallel.layout import ParallelLayout
        from sage_megatron.procs import free_port

        # One process of a (1, 1, 1) layout, env:// rendezvous, exactly as a torchrun/Ray rank starts.
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", str(free_port("127.0.0.1")))
        t = time.perf_counter()
        init_parallel(ParallelLayout(1, 1, 1), seed=self.a.seed, timeout_s=300)
        init_s = time.perf_counter() - t
        t = time.perf_counter()
        self.actor = MegatronActor(self.actor_config())
        self.device = compute_device()
        params = list(self.actor.model.parameters())
        out = {"init_parallel_seconds": round(init_s, 3), "build_seconds": round(time.perf_counter() - t, 3),
               "layout": {"tp": 1, "pp": 1, "dp": 1}, "layer_spec": "local" if not self.actor.config.use_te else "te",
               "params": sum(p.numel() for p in params), "param_dtype": str(params[0].dtype),
               "param_devices": sorted({str(p.device) for p in params}),
               "model_class": type(self.actor.model).__name__, "optimizer_class": type(self.actor.optimizer).__name__,
               "megatron_optimizer_classes": [type(o).__name__ for o in
                                              getattr(self.actor.optimizer, "chained_optimizers", [self.actor.optimizer])],
               "inner_optimizer_class": type(getattr(self.actor.optimizer, "optimizer", None)).__name__,
               "micro_batch_size": self.actor.config.micro_batch_size, "lr": self.actor.config.lr}
        if self.a.device == "cuda":
            out["gpu_memory_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        return out

    def device_layer(self) -> dict:
        import torch
        import torch.distributed as dist
        from megatron.core.fusions import fused_softmax
        from megatron.core.tensor_parallel import random as mpu_random
        from megatron.core.transformer import utils as transformer_utils

        from sage_megatron.parallel import device as dev

        cuda = dev.cuda_available()
        shims = {
            # each entry: is that CPU shim of device.apply_cpu_shims in place right now?
            "torch.cuda.current_device": getattr(torch.cuda.current_device, "__module__", "") == dev.__name__,
            "torch.cuda.synchronize": getattr(torch.cuda.synchronize, "__module__", "") == dev.__name__,
            "transformer.utils.get_default_causal_mask":
                getattr(transformer_utils.get_default_causal_mask, "__module__", "") == dev.__name__,
            "fused_softmax.get_default_causal_mask":
                getattr(fused_softmax.get_default_causal_mask, "__module__", "") == dev.__name__,
            "rng_tracker_is_cpu": isinstance(mpu_random._CUDA_RNG_STATE_TRACKER, dev.CpuRNGStatesTracker),
        }
        params = list(self.actor.model.parameters())
        out = {
            "cuda_available": cuda,
            "compute_device": str(dev.compute_device()),
            "needs_cpu_shims": dev.needs_cpu_shims(cuda_is_available=cuda),
            "shims_applied_flag": dev._SHIMS_APPLIED,
            "shims_in_place": shims,
            "cuda_to_cpu_mode_on_optimizer_and_schedule": dev.needs_cpu_shims(cuda_is_available=cuda),
            "distributed_backend_decision": dev.distributed_backend(cuda_is_available=cuda),
            "process_group_backend": dist.get_backend(),
            "param_devices": sorted({str(p.device.type) for p in params}),
            "rng_tracker_class": type(mpu_random._CUDA_RNG_STATE_TRACKER).__name__,
        }
        if self.a.device == "cuda":
            expect = dict(cuda_available=True, device_type="cuda", backend="nccl", shims=False)
        else:
            expect = dict(cuda_available=False, device_type="cpu", backend="gloo", shims=True)
        problems = []
        if cuda != expect["cuda_available"]:
            problems.append(f"cuda_available={cuda}")
        if dev.compute_device().type != expect["device_type"] or out["param_devices"] != [expect["device_type"]]:
            problems.append(f"compute device {out['compute_device']}, params on {out['param_devices']}")
        if out["process_group_backend"] != expect["backend"]:
            problems.append(f"backend {out['process_group_backend']}")
        if any(shims.values()) != expect["shims"] or all(shims.values()) != expect["shims"] \
                or out["shims_applied_flag"] != expect["shims"]:
            problems.append(f"CPU shims in place {shims} (flag {out['shims_applied_flag']}), expected all "
                            f"{expect['shims']}")
        out.update(expected=expect, branch="cuda" if cuda else "cpu", ok=not problems)
        if problems:
            out["error"] = "; ".join(problems)
        return out

    # -- log-prob parity --

    def parity(self, dtype_name: str) -> dict:
        import torch

        from sage_megatron.actor.worker import MegatronActor
        from sage_megatron.parallel.convert import reference_tokens

        w = self.work
        tokens = reference_tokens(self.size["vocab_size"], batch=w["parity_batch"], seq=w["parity_seq"],
                                  seed=self.a.seed)
        if dtype_name == self.dtype_name:
            actor, note = self.actor, "the trainable actor"
        else:   # the same checkpoint built in another dtype (ActorConfig.dtype), as a reference actor
            actor, note = MegatronActor(self.actor_config(dtype=dtype_name), trainable=False), \
                f"a trainable=False actor of the same {self.dtype_name} checkpoint at dtype={dtype_name}"
        try:
            t = time.perf_counter()
            mg = actor.compute_logprobs(tokens)
            self.sync()
            mg_s = time.perf_counter() - t
        finally:
            if actor is not self.actor:
                del actor
                _free_cuda()
        t = time.perf_counter()
        hf = hf_token_logprobs(self.hf_dir, tokens, dtype=getattr(torch, dtype_name), device=self.device)
        hf_s = time.perf_counter() - t
        _free_cuda()
        diff = (mg[:, 1:] - hf[:, 1:]).abs()
        max_tol, mean_tol = TOLERANCES[(dtype_name, self.device.type)]
        out = {"dtype": dtype_name, "megatron_model": note, "hf": "LlamaForCausalLM, attn_implementation=eager",
               "tokens": list(tokens.shape), "compared_positions": diff.numel(),
               "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
               "hf_mean_logp": hf[:, 1:].mean().item(), "megatron_mean_logp": mg[:, 1:].mean().item(),
               "tolerance_max_abs": max_tol, "tolerance_mean_abs": mean_tol,
               "megatron_seconds": round(mg_s, 3), "hf_seconds": round(hf_s, 3)}
        out["ok"] = out["max_abs_diff"] <= max_tol and out["mean_abs_diff"] <= mean_tol
        if not out["ok"]:
            out["error"] = (f"log-prob difference max {out['max_abs_diff']:.3g} / mean {out['mean_abs_diff']:.3g} "
                            f"above tolerance {max_tol} / {mean_tol}")
        return out

    # -- one GRPO step through the trainer's path --

    def grpo_step(self) -> dict:
        import torch

        from sage_megatron.actor.batch import batch_from_groups
        from sage_megatron.algo.advantages import group_advantages
        from sage_megatron.types import PromptGroup, Sample

        w, vocab = self.work, self.size["vocab_size"]
        gen = torch.Generator().manual_seed(self.a.seed + 1)
        groups = []
        lo, hi = w["response_len"]
        for gi in range(w["groups"]):
            prompt = tuple(torch.randint(0, vocab, (w["prompt_len"],), generator=gen).tolist())
            samples = []
            for j in range(w["group_size"]):
                n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
                samples.append(Sample(uid=f"g{gi}", prompt_ids=prompt,
                                      response_ids=torch.randint(0, vocab, (n,), generator=gen).tolist(),
                                      logprobs=[0.0] * n, finish_reason="length", weight_version=0, sample_index=j))
            rewards = [float(j % 2) for j in range(w["group_size"])]   # half right, half wrong
            groups.append(PromptGroup(uid=f"g{gi}", row_index=gi, prompt_ids=prompt, samples=samples, rewards=rewards))
        adv = group_advantages(groups)
        batch = batch_from_groups(groups, adv, pad_id=0, max_len=self.size["max_position_embeddings"])
        # pi_old by the actor's own forward pass (Trainer.old_logprobs with more than one mini-batch), so
        # the update's importance ratio checks that forward-only and training forwards agree.
        old = self.actor.old_logprobs(batch, only_update=False)
        batch = replace(batch, old_logp=old)
        before = {n: p.detach().clone() for n, p in self.actor.model.named_parameters()}
        main_before = _main_params(self.actor.optimizer)
        t = time.perf_counter()
        metrics = self.actor.train_step(batch)
        self.sync()
        step_s = time.perf_counter() - t
        changed, elems_changed, elems, max_delta = 0, 0, 0, 0.0
        for n, p in self.actor.model.named_parameters():
            d = (p.detach() - before[n]).abs()
            k = int((d > 0).sum())
            changed += k > 0
            elems_changed += k
            elems += d.numel()
            max_delta = max(max_delta, float(d.max()))
        main_after = _main_params(self.actor.optimizer)
        main_changed = sum(int(not torch.equal(a, b)) for a, b in zip(main_before, main_after))
        del before, main_before, main_after
        after = self.actor.compute_logprobs(batch)
        mask = batch.response_mask
        per_seq = ((after - old) * mask).sum(1) / mask.sum(1)
        surrogate_change = float((per_seq * batch.advantages).sum())
        ratio_tol = 1e-5 if self.dtype_name == "float32" else 5e-2
        out = {"batch": {"sequences": int(batch.tokens.shape[0]), "seq_len": int(batch.tokens.shape[1]),
                         "response_tokens": batch.num_tokens, "groups": w["groups"], "group_size": w["group_size"]},
               "path": "group_advantages -> batch_from_groups -> actor.old_logprobs -> actor.train_step",
               "metrics": metrics, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
               "step_seconds": round(step_s, 3), "param_tensors": len(list(self.actor.model.parameters())),
               "param_tensors_changed": changed, "param_elements_changed_frac": elems_changed / max(elems, 1),
               "max_abs_param_change": max_delta, "main_param_tensors": len(_main_params(self.actor.optimizer)),
               "main_param_tensors_changed": main_changed,
               "logp_change_toward_advantage": surrogate_change,
               "policy_moved_toward_advantage": surrogate_change > 0, "ratio_mean_tolerance": ratio_tol}
        problems = []
        if not _finite(metrics["loss"]) or not _finite(metrics["grad_norm"]):
            problems.append(f"loss {metrics['loss']} / grad_norm {metrics['grad_norm']} not finite")
        if metrics["update_ok"] != 1.0:
            problems.append("the optimizer skipped the update")
        if changed == 0 or main_changed == 0:
            problems.append(f"parameters unchanged ({changed} model tensors, {main_changed} main tensors changed)")
        if abs(metrics["ratio_mean"] - 1.0) > ratio_tol:
            problems.append(f"ratio_mean {metrics['ratio_mean']:.6f}: old_logprobs and the training forward disagree")
        out["ok"] = not problems
        if problems:
            out["error"] = "; ".join(problems)
        return out

    # -- throughput --

    def throughput(self) -> dict:
        from functools import partial

        import torch

        from sage_megatron.actor.batch import TrainBatch
        from sage_megatron.perf.catalogue import ModelSpec
        from sage_megatron.perf.formulas import train_flops

        w, s = self.work, self.size
        b, t = w["bench_batch"], w["bench_seq"]
        gen = torch.Generator().manual_seed(self.a.seed + 2)
        mask = torch.ones(b, t)
        mask[:, 0] = 0
        batch = TrainBatch(tokens=torch.randint(0, s["vocab_size"], (b, t), generator=gen), response_mask=mask,
                           advantages=torch.randn(b, generator=gen), old_logp=None)
        actor = self.actor
        old_mbs = actor.config.micro_batch_size
        actor.config = replace(actor.config, micro_batch_size=w["bench_mbs"])
        try:
            # forward + backward: the schedule of train_step (same loss function) without the optimizer step
            micro, _ = actor._micro_batches(batch)
            loss_func = partial(actor._loss, num_tokens=float(mask.sum()), num_seqs=float(b), grad_scale=len(micro),
                                run_tokens=float(mask.sum()), run_seqs=float(b))

            def fwd_bwd():
                actor.model.train()
                actor.model.zero_grad_buffer()
                actor._run_schedule(micro, forward_only=False, loss_func=loss_func)

            fb_s = _timed(fwd_bwd, warmup=w["warmup"], iters=w["iters"], sync=self.sync)
            if self.a.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                fwd_bwd()
                self.sync()
                peak_mem = torch.cuda.max_memory_allocated() / 2**30
            step_s = _timed(lambda: actor.train_step(batch), warmup=1, iters=w["step_iters"], sync=self.sync)
        finally:
            actor.config = replace(actor.config, micro_batch_size=old_mbs)
        tokens = b * t
        spec = ModelSpec("gpu-check-llama", layers=s["num_layers"], hidden=s["hidden_size"], ffn=s["ffn_hidden_size"],
                         heads=s["num_heads"], kv_heads=s["num_kv_heads"], vocab=s["vocab_size"])
        counted = sum(p.numel() for p in actor.model.parameters())
        fb_tps, step_tps = tokens / fb_s, tokens / step_s
        peak, peak_source = self.peak_flops()
        f6n = train_flops(spec, tokens=1, seq_len=t, include_attention=False)
        fattn = train_flops(spec, tokens=1, seq_len=t, include_attention=True)

        def mfu(tps, per_token):
            return None if not peak else tps * per_token / peak

        out = {"batch": {"sequences": b, "seq_len": t, "micro_batch_size": w["bench_mbs"], "tokens_per_iter": tokens},
               "warmup_iters": w["warmup"], "timed_iters": w["iters"], "train_step_timed_iters": w["step_iters"],
               "fwd_bwd_seconds_per_iter": fb_s, "fwd_bwd_tokens_per_s": fb_tps,
               "train_step_seconds_per_iter": step_s, "train_step_tokens_per_s": step_tps,
               "params_counted": counted, "params_formula": spec.params,
               "flops_per_token_6n": f6n, "flops_per_token_with_attention": fattn,
               "flops_formula": "6*N per token, N = all parameters incl. input embedding and output layer "
                                "(sage_megatron.perf.formulas.train_flops); with_attention adds 12*L*H*d*s "
                                "(PaLM/Megatron convention, causal mask not halved)",
               "peak_flops": peak, "peak_source": peak_source, "device_name": self.device_name(),
               "mfu_fwd_bwd_6n": mfu(fb_tps, f6n), "mfu_fwd_bwd_with_attention": mfu(fb_tps, fattn),
               "mfu_train_step_6n": mfu(step_tps, f6n)}
        if self.a.device == "cuda":
            out["gpu_peak_memory_fwd_bwd_gib"] = round(peak_mem, 2)
        out["ok"] = fb_tps > 0 and step_tps > 0
        return out

    def device_name(self) -> str:
        import torch

        if self.a.device == "cuda":
            return torch.cuda.get_device_name(0)
        return platform.processor() or platform.machine()

    def peak_flops(self) -> tuple[float | None, str]:
        import torch

        if self.a.peak_flops:
            return self.a.peak_flops, "--peak-flops"
        if self.a.device == "cuda":
            from sage_megatron.perf.catalogue import GPU_BF16_DENSE_PEAKS

            name = torch.cuda.get_device_name(0)
            for key, peak in GPU_BF16_DENSE_PEAKS:
                if key in name:
                    return peak, f"dense bf16 peak for {key!r} matched in {name!r} (perf.catalogue.GPU_BF16_DENSE_PEAKS)"
            return None, f"no known peak for {name!r}: pass --peak-flops"
        from sage_megatron.perf.catalogue import measure_cpu_hardware

        threads = torch.get_num_threads()
        hw = measure_cpu_hardware(threads=threads, seconds=0.3)
        return hw.peak_flops, (f"measured fp32 512x512 matmul, {threads} thread(s), 0.3 s "
                               "(perf.catalogue.measure_cpu_hardware; a loaded machine measures low)")

    def imported_distributions(self) -> dict:
        """Every non-stdlib top-level module this process imported, by distribution, and where it came from."""
        import importlib.metadata as md

        site = os.environ.get("GPU_CHECK_SITE")
        by_module = md.packages_distributions()
        out = {}
        for mod in sorted({m.split(".")[0] for m in list(sys.modules)}):
            if mod in sys.stdlib_module_names or mod.startswith("_") or mod not in by_module:
                continue
            for dist in by_module[mod]:
                try:
                    d = md.distribution(dist)
                except md.PackageNotFoundError:
                    continue
                loc = str(d.locate_file(""))
                out[d.metadata["Name"].lower().replace("_", "-")] = {
                    "version": d.version, "location": loc,
                    "from_wheel_site": bool(site) and Path(loc).resolve() == Path(site).resolve()}
        return {"distributions": out}


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _float_or_none(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _main_params(optimizer) -> list:
    """The optimizer's own (fp32 main) parameters, cloned."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return [p.detach().clone() for g in inner.param_groups for p in g["params"]]


def _timed(fn, *, warmup: int, iters: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters


def hf_token_logprobs(hf_dir: Path, tokens, *, dtype, device):
    """HF transformers' aligned per-token log-probs (column t = log p(tokens[t] | tokens[<t]), column 0 = 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, attn_implementation="eager").to(device)
    model.eval()
    with torch.no_grad():
        x = tokens.to(device)
        logits = model(x).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
    del model
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1).cpu()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""     # the CPU branch of the device layer, even on a GPU node
    # One process on one machine: gloo (megatron's gloo groups) and NCCL bootstrap over loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A hung conversion rank fails its phase inside the budget instead of being killed with the whole run.
    os.environ.setdefault("SAGE_DIST_TIMEOUT_S", "300")
    report = Report(args.out, args.budget_s)
    print(f"[gpu_check] writing {args.out}", flush=True)
    report.doc.update(json_path=str(args.out), argv=sys.argv[1:] if argv is None else list(argv))
    report.write()
    check = None
    try:
        import sage_megatron  # noqa: F401  (the package's warning filters)

        check = Check(args, report)
        report.doc.update(work_dir=str(check.work_dir))
        report.run("environment", check.environment)
        report.run("hf_model", check.hf_model)
        report.run("convert", check.convert, "hf_model")
        report.run("actor", check.build_actor, "convert")
        report.run("device_layer", check.device_layer, "actor")
        report.run(f"parity_{check.dtype_name}", lambda: check.parity(check.dtype_name), "actor")
        report.run(f"parity_{check.other_dtype_name}", lambda: check.parity(check.other_dtype_name), "actor")
        report.run("grpo_step", check.grpo_step, "actor")
        report.run("throughput", check.throughput, "actor")
        report.run("imported_distributions", check.imported_distributions)
    except BaseException as err:  # setup failed before/between phases: still a JSON with the error
        report.doc["fatal_error"] = f"{type(err).__name__}: {err}"
        report.doc["fatal_traceback"] = traceback.format_exc()[-4000:]
        report.doc["failed_phases"] = [*report.doc["failed_phases"], "fatal"]
        report.write()
    finally:
        try:
            if check is not None and check.actor is not None:
                from sage_megatron.parallel.distributed import destroy_parallel

                check.actor = None
                destroy_parallel()
        except Exception:
            pass
        if check is not None and not args.keep and not args.work_dir:
            import shutil

            shutil.rmtree(check.work_dir, ignore_errors=True)
    ok = report.finish() and "fatal_error" not in report.doc
    if not ok:
        report.doc["ok"] = False
        report.write()
    print(f"[gpu_check] {'OK' if ok else 'FAILED: ' + ', '.join(report.doc['failed_phases'])} "
          f"in {report.doc['wall_seconds']:.1f} s", flush=True)
    print(f"[gpu_check] JSON: {args.out}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
