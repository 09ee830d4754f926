"""Reading and writing HF safetensors checkpoints tensor by tensor (never a whole model in memory).

The writer is streaming: the caller says beforehand which tensors will come (name, shape, dtype, in
order), so every shard's safetensors header and every tensor's file offset are known before the first
byte of data; each tensor is then written at its offset as it arrives and dropped. ``safetensors``'
``save_file`` needs a whole shard's tensors in memory at once (a 2 GiB shard is 2 GiB of RAM on top of
the export), and the library has no incremental writer, hence the ~40 lines here; the files are byte
for byte what ``save_file`` writes (tests/convert/test_hf_io.py compares them).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


class CheckpointError(ValueError):
    pass


class HFReader:
    """Lazy access to the tensors of an HF safetensors checkpoint folder.

    Each ``get`` opens its file for that one read: safetensors maps the file, and every page a read
    touches stays in this process's RSS for as long as the handle is open, so a reader holding its
    handles would end a full pass with the whole checkpoint resident (measured: the import's peak RSS
    grew by exactly the model's bytes); per-read handles bound it by the largest tensor."""

    def __init__(self, hf_dir: str | Path):
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
        self.file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise CheckpointError(f"{path} is listed in model.safetensors.index.json but missing: "
                                      "re-download or re-export the checkpoint")
            try:
                with self._open(name) as handle:
                    for key in handle.keys():
                        self.file_of[key] = name
                        self._shapes[key] = tuple(handle.get_slice(key).get_shape())
            except Exception as err:
                raise CheckpointError(f"{path} is not a readable safetensors file ({err}): the file is "
                                      "truncated or corrupt; re-download or re-export it") from None
        if weight_map:
            missing = [k for k, f in weight_map.items() if self.file_of.get(k) != f]
            if missing:
                raise CheckpointError(f"{self.dir}: tensors {missing[:3]} listed in the index are not in their files")

    def _open(self, file_name: str):
        from safetensors import safe_open

        return safe_open(str(self.dir / file_name), framework="pt")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtype(self, name: str) -> torch.dtype:
        return self.get(name).dtype

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found")
        try:
            with self._open(self.file_of[name]) as handle:
                return handle.get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{self.dir / self.file_of[name]}: cannot read {name!r} ({err}): "
                                  "the file is corrupt; re-export it") from None


# safetensors' dtype codes, in the order of its Dtype enum: save_file lays tensors out by descending
# dtype (in that order), then by name, and so does safetensors_header.
_SAFETENSORS_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
                       torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32",
                       torch.float64: "F64", torch.int64: "I64"}
_DTYPE_RANK = {code: i for i, code in enumerate(_SAFETENSORS_DTYPES.values())}


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor the writer will be given: its HF name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(planned: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors into shards of at most ``max_shard_bytes`` (a larger tensor is a shard of its own)."""
    shards: list[list[PlannedTensor]] = []
    shard_bytes = 0
    for p in planned:
        if not shards or shard_bytes + p.nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(p)
        shard_bytes += p.nbytes
    return shards


def safetensors_header(shard: list[PlannedTensor], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The file's first bytes (u64 little-endian length + JSON, space-padded to 8 bytes) and each
    tensor's byte offset from the start of the file."""
    for p in shard:
        if p.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{p.name}: dtype {p.dtype} cannot be written to safetensors here")
    ordered = sorted(shard, key=lambda p: (-_DTYPE_RANK[_SAFETENSORS_DTYPES[p.dtype]], p.name))
    entries: dict[str, object] = {"__metadata__": metadata}
    begins, pos = {}, 0
    for p in ordered:
        entries[p.name] = {"dtype": _SAFETENSORS_DTYPES[p.dtype], "shape": list(p.shape),
                           "data_offsets": [pos, pos + p.nbytes]}
        begins[p.name] = pos
        pos += p.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {name: start + b for name, b in begins.items()}


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_hf_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, *,
                         planned: list[PlannedTensor], max_shard_bytes: int = 2 << 30) -> int:
    """Write (name, tensor) pairs, which must arrive as ``planned``, as safetensors shards (plus an
    index when more than one); each tensor goes to disk as it arrives. Returns bytes written."""
    if len({p.name for p in planned}) != len(planned):
        raise CheckpointError("planned tensors have duplicate names")
    shards = plan_shards(planned, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}.safetensors" for i in range(len(shards))]
    where: dict[str, tuple[int, int]] = {}         # tensor name -> (shard index, file offset)
    fds = []
    try:
        for i, shard in enumerate(shards):
            header, offsets = safetensors_header(shard, {"format": "pt"})
            fd = os.open(out_dir / names[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            os.ftruncate(fd, len(header) + sum(p.nbytes for p in shard))
            _pwrite_all(fd, header, 0)
            where.update({name: (i, off) for name, off in offsets.items()})
        total, arrived = 0, 0
        for name, t in tensors:
            if arrived == len(planned):
                raise CheckpointError(f"export stream gave {name}, which was not planned")
            want = planned[arrived]
            if (name, tuple(t.shape), t.dtype) != (want.name, want.shape, want.dtype):
                raise CheckpointError(f"export stream gave {name} {tuple(t.shape)} {t.dtype} where "
                                      f"{want.name} {want.shape} {want.dtype} was planned")
            shard_index, offset = where[name]
            _pwrite_all(fds[shard_index], t.contiguous().reshape(-1).view(torch.uint8).numpy(), offset)
            total += want.nbytes
            arrived += 1
        if arrived < len(planned):
            raise CheckpointError(f"export stream ended before {planned[arrived].name} "
                                  f"({len(planned) - arrived} planned tensor(s) never came)")
    finally:
        for fd in fds:
            os.close(fd)
    if len(shards) > 1:
        weight_map = {p.name: names[i] for i, shard in enumerate(shards) for p in shard}
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
