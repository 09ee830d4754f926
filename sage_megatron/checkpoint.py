"""Training checkpoints: atomic, collective, with everything a resume needs to continue EXACTLY.

A checkpoint is ``<run>/checkpoints/step_000004/`` and is itself a sage_megatron checkpoint (so
``ActorConfig(ckpt_dir=...)`` and ``megatron_to_hf`` read it directly):

    sage_megatron.json, hf/      copied from the converted start checkpoint (architecture, tokenizer)
    dist/                        the actor's megatron-core dist checkpoint (any TP/PP can load it)
    optim/rank<r>.pt             rank r's optimizer state (AdamW moments, step) and RNG states;
                                 valid for a resume at the SAME (tp, pp, dp) (checked, with a clear error)
    state.json                   loop state from rank 0: step, data cursor, hinting state (SAGE-light
                                 schedule), SolvedTracker, weight version, layout

Atomicity: every rank writes into ``.tmp-step_000004``; after a barrier rank 0 writes state.json
last and renames the folder to its final name, then points ``latest`` at it (write + os.replace).
A crash at any point leaves the previous checkpoint as the latest; ``.tmp-*`` leftovers are ignored
and removed by the next save.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.json"
LATEST_FILE = "latest"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed by this run; the message says why and what to change."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``latest`` pointer, else the highest step), or None."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / STATE_FILE).is_file():
            return path
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def _rng_state() -> dict:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(root: str | Path, step: int, *, actor, base_ckpt: str | Path, loop_state: dict | None,
                    layout, keep: int = 2) -> Path:
    """Collective over all ranks. ``loop_state``: rank 0's JSON-serialisable loop state (None elsewhere)."""
    import torch.distributed as dist

    from sage_megatron.parallel.shards import save_dist_checkpoint

    root = Path(root)
    rank = dist.get_rank()
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "dist").mkdir(parents=True)
        (tmp / "optim").mkdir()
    dist.barrier()
    save_dist_checkpoint(actor.model, str(tmp / "dist"))
    torch.save({"optimizer": actor.optimizer.state_dict() if actor.optimizer is not None else None,
                "actor_steps": actor.steps, "rng": _rng_state(),
                "layout": [layout.tp, layout.pp, layout.dp]}, tmp / "optim" / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        base = Path(base_ckpt)
        shutil.copy2(base / "sage_megatron.json", tmp / "sage_megatron.json")
        shutil.copytree(base / "hf", tmp / "hf")
        state = {**loop_state, "step": step, "layout": [layout.tp, layout.pp, layout.dp],
                 "world_size": dist.get_world_size()}
        _write_json_durably(tmp / STATE_FILE, state)
        if final.exists():                       # re-saving a step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_json_durably(root / LATEST_FILE, final.name, raw=True)
        old = sorted(p for p in root.glob("step_*") if p != final and (p / STATE_FILE).is_file())
        for p in old[:max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def _write_json_durably(path: Path, obj: Any, *, raw: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(obj if raw else json.dumps(obj))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_loop_state(ckpt: str | Path, *, layout) -> dict:
    """state.json of a checkpoint; raises ResumeError if it was written at another layout."""
    state = json.loads((Path(ckpt) / STATE_FILE).read_text())
    if state.get("layout") != [layout.tp, layout.pp, layout.dp]:
        raise ResumeError(f"{ckpt} was written at (tp, pp, dp) = {tuple(state.get('layout', []))}, this run uses "
                          f"{(layout.tp, layout.pp, layout.dp)}: the optimizer state is per rank, so resume at the "
                          "same layout (or start a new run from the exported weights: model.hf_dir=<ckpt>/hf export)")
    return state


def load_rank_state(ckpt: str | Path, *, actor) -> None:
    """This rank's optimizer state, actor step count and RNG states (the model weights come from ActorConfig)."""
    import torch.distributed as dist

    path = Path(ckpt) / "optim" / f"rank{dist.get_rank()}.pt"
    if not path.is_file():
        raise ResumeError(f"{path} missing: the checkpoint is incomplete or written by fewer ranks")
    saved = torch.load(path, weights_only=False)
    if saved["optimizer"] is not None and actor.optimizer is not None:
        actor.optimizer.load_state_dict(saved["optimizer"])
    actor.steps = saved["actor_steps"]
    _set_rng_state(saved["rng"])


def export_hf(ckpt: str | Path, out_dir: str | Path) -> Path:
    """The checkpoint's actor as an HF folder (transformers / vLLM), through the one conversion path."""
    from sage_megatron.parallel.convert import megatron_to_hf

    megatron_to_hf(ckpt, out_dir, overwrite=True)
    return Path(out_dir)
