"""Reading and writing HF safetensors checkpoints tensor by tensor (never a whole model in memory)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import torch

HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


class CheckpointError(ValueError):
    pass


class HFReader:
    """Lazy access to the tensors of an HF safetensors checkpoint folder."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.dir}: no *.safetensors files. Convert .bin checkpoints with "
                                      "transformers' save_pretrained(safe_serialization=True) first.")
            weight_map = None
        self._handles = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise CheckpointError(f"{path} is listed in model.safetensors.index.json but missing: "
                                      "re-download or re-export the checkpoint")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:
                raise CheckpointError(f"{path} is not a readable safetensors file ({err}): the file is "
                                      "truncated or corrupt; re-download or re-export it") from None
            self._handles[name] = handle
            for key in handle.keys():
                self.file_of[key] = name
        if weight_map:
            missing = [k for k, f in weight_map.items() if self.file_of.get(k) != f]
            if missing:
                raise CheckpointError(f"{self.dir}: tensors {missing[:3]} listed in the index are not in their files")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(self._handles[f].get_slice(k).get_shape()) for k, f in self.file_of.items()}

    def dtype(self, name: str) -> torch.dtype:
        return self.get(name).dtype

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self.file_of[name]].get_tensor(name)
        except KeyError:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found") from None
        except Exception as err:
            raise CheckpointError(f"{self.dir / self.file_of[name]}: cannot read {name!r} ({err}): "
                                  "the file is corrupt; re-export it") from None

    def get_slice(self, name: str, dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name``'s [start, stop) along ``dim`` (stop None: to the end), reading only those bytes
        (safetensors' lazy slices: rows are one contiguous read, columns a strided one)."""
        try:
            lazy = self._handles[self.file_of[name]].get_slice(name)
        except KeyError:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found") from None
        shape = lazy.get_shape()
        stop = shape[dim] if stop is None else stop
        if not 0 <= start <= stop <= shape[dim]:
            raise CheckpointError(f"{self.dir / self.file_of[name]}: {name!r} has {shape[dim]} entries along dim "
                                  f"{dim}, slice [{start}, {stop}) asked for (config.json and weights disagree?)")
        try:
            return lazy[(slice(None),) * dim + (slice(start, stop),)]
        except Exception as err:
            raise CheckpointError(f"{self.dir / self.file_of[name]}: cannot read {name!r} ({err}): "
                                  "the file is corrupt; re-export it") from None


def write_hf_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, *,
                         max_shard_bytes: int = 2 << 30) -> int:
    """Write (name, tensor) pairs as safetensors shards plus an index; returns bytes written."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0
    shard_files: list[tuple[str, list[str]]] = []

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            fname = f"model-{len(shard_files) + 1:05d}.safetensors"
            save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
            shard_files.append((fname, list(shard)))
            shard, shard_bytes = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        shard[name] = t.contiguous().clone() if t.storage_offset() or not t.is_contiguous() else t
        shard_bytes += nbytes
        total += nbytes
    flush()
    if len(shard_files) == 1:
        (out_dir / shard_files[0][0]).rename(out_dir / "model.safetensors")
    else:
        weight_map = {n: f for f, names in shard_files for n in names}
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config and tokenizer files (whatever of them exist)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def iter_names_sorted(reader: HFReader) -> Iterator[str]:
    yield from sorted(reader.file_of)
