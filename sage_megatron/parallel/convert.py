"""HF <-> Megatron dist-checkpoint conversion and logit comparison (the logic behind tools/convert).

A converted checkpoint folder holds:
  sage_megatron.json   metadata: format, architecture, padded vocabulary, dtype, layout written at, source
  hf/                  the HF config and tokenizer files (export writes them back unchanged)
  dist/                megatron-core dist checkpoint (torch_dist), loadable at any TP/PP
All inputs are checked before any file is written. Import: one process reads each HF tensor once and
writes megatron-core's torch_dist files directly (``dist_write``), no rank spawned, no model built.
Export: streamed from the dist checkpoint's files a group of layers at a time, never the whole model
(see the Megatron -> HF section).
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from sage_megatron.fsutil import atomic_output_dir
from sage_megatron.parallel import weight_maps as wm
from sage_megatron.parallel.hf_io import (CheckpointError, HFReader, PlannedTensor, copy_side_files,
                                          write_hf_safetensors)
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


def rss_gib(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory in GiB.

    Not ``ru_maxrss``: Linux carries it across fork and exec, so a spawned rank would report its
    launcher's RSS at fork time as its own. /proc's VmHWM belongs to this process image only.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20     # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0), so a later peak measures what came after."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- HF -> Megatron ---------------------------------------------------------------------------------

def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1, dtype: str | None = None,
                   overwrite: bool = False, thread_count: int = 1) -> dict:
    """Convert an HF checkpoint into a dist checkpoint loadable at any TP/PP, its vocabulary padded for ``tp``.

    One process reads each HF tensor once and writes megatron-core's torch_dist format directly
    (``dist_write``); no rank is spawned and no model is built. Returns the seconds, this process's peak
    RSS over the conversion (``peak_rss_gib``, and ``rss_growth_gib`` above its RSS at the start) and the
    seconds of each phase."""
    from sage_megatron.parallel.dist_write import write_dist_checkpoint

    if thread_count < 1:
        raise ValueError(f"thread_count {thread_count}: the writer needs at least 1 thread (--threads 1)")
    t0 = time.perf_counter()
    hf = Path(hf_dir)
    arch = arch_from_hf_config(read_hf_config(hf), source=str(hf / "config.json"))
    layout = ParallelLayout(tp=tp, pp=pp)
    validate_layout(layout, num_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
                    num_query_groups=arch.num_query_groups)
    reader = HFReader(hf)
    wm.check_hf_tensors(arch, reader.shapes(), source=str(hf))
    dtype_name = dtype or str(reader.dtype("model.embed_tokens.weight")).removeprefix("torch.")
    padded = padded_vocab_size(arch.vocab_size, tp=tp)
    baseline_rss = rss_gib("VmRSS")
    reset_peak_rss()
    phases = {"checks": time.perf_counter() - t0}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "dist").mkdir()
        t = time.perf_counter()
        nbytes = write_dist_checkpoint(tmp / "dist", arch, padded_vocab=padded, dtype=parse_dtype(dtype_name),
                                       get_hf=reader.get, thread_count=thread_count)
        phases["read_write"] = time.perf_counter() - t
        copy_side_files(hf, tmp / "hf")
        meta = CheckpointMeta(arch=arch, padded_vocab=padded, dtype=dtype_name, written_layout=layout,
                              source=str(hf.absolute()))
        (tmp / META_FILE).write_text(json.dumps(meta.to_json(), indent=1))
    peak = rss_gib()
    return {"seconds": time.perf_counter() - t0, "phase_seconds": phases, "tensor_bytes": nbytes,
            "peak_rss_gib": peak, "baseline_rss_gib": baseline_rss, "rss_growth_gib": peak - baseline_rss,
            **meta.to_json()}


# ---- Megatron -> HF ---------------------------------------------------------------------------------
#
# Streaming export: peak memory is one group of layers, not the model nor an output shard (a 70B
# model exported through a whole (tp=1, pp=1) model needed ~140 GB of RAM).
#
# Why read the files rather than build the model one pipeline stage at a time: megatron-core's
# torch_dist format IS a torch.distributed.checkpoint (DCP) checkpoint whose keys are megatron's
# sharded keys and whose tensors are GLOBAL tensors: TP shards are chunks at their offsets, and the
# decoder's (homogeneous) layers are one key per parameter with a prepended layer axis, so a PP stage
# is a run of chunks along it (``weight_maps.dist_checkpoint_key``). DCP reads any box of a key's
# global tensor into a plain tensor, resharding from whatever chunks were written, without a process
# group. So the export reads layer by layer, in groups of at most ``max_stage_bytes``, exactly the
# global tensors the weight maps turn into HF tensors (``export_hf_tensors``, the same maps as import
# and weight sync), and the shard writer puts each at its planned offset as it comes. Building a
# stage instead would need megatron's parallel state and a model per stage, a TP all-gather, and its
# granularity would be the PP stage the checkpoint is loaded at (a pp=1 export would still hold the
# whole model).


class ChunkLoadPlanner(LoadPlanner):
    """A DCP load planner that reads given boxes of checkpoint tensors into given tensors, and nothing else.

    ``wants``: (key, global offsets, destination); the destination's shape is the box's size and its
    dtype the one wanted (the storage reader's copy casts). Every element of every box must be covered
    by saved chunks: checked while planning, so an incomplete checkpoint fails with the key named.
    """

    def __init__(self, wants: list[tuple[str, tuple[int, ...], torch.Tensor]], *, source: str):
        self.wants, self.source = wants, source
        self._dest: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, offsets, dest in self.wants:
            md = self.metadata.state_dict_metadata.get(key)
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"{self.source}: no tensor {key!r} in the dist checkpoint")
            box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            reads = create_read_items_for_chunk_list(key, md, [box]) if len(offsets) == len(md.size) else []
            covered = sum(math.prod(r.lengths) for r in reads)
            if covered != dest.numel():
                raise CheckpointError(f"{self.source}: {key!r} of global shape {tuple(md.size)} does not cover "
                                      f"offsets {tuple(offsets)} size {tuple(dest.shape)} ({covered} of "
                                      f"{dest.numel()} elements saved): the checkpoint is incomplete or of "
                                      "another architecture; re-run the conversion")
            self._dest[(key, tuple(offsets))] = dest
            items += reads
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError(f"ChunkLoadPlanner reads tensors only, not {read_item.dest_index.fqn!r}")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        """The part of the destination that this read (one saved chunk's overlap with the box) fills."""
        index = read_item.dest_index
        t = self._dest[(index.fqn, tuple(index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, start, length)
        return t

    def commit_tensor(self, read_item, tensor) -> None:
        pass


def check_torch_dist(dist_dir: Path) -> None:
    """The dist checkpoint must be in megatron-core's torch_dist format (the one read here)."""
    path = dist_dir / "metadata.json"
    try:
        backend = json.loads(path.read_text()).get("sharded_backend")
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} unreadable ({err}): not a megatron-core dist checkpoint") from None
    if backend != "torch_dist":
        raise CheckpointError(f"{path}: sharded backend {backend!r}; only megatron-core's 'torch_dist' can be "
                              "exported (save the checkpoint with it)")


@dataclass(frozen=True)
class DistRead:
    """One parameter's global tensor as a box of a dist checkpoint key (a layer of a stacked key, or all of it)."""

    megatron_name: str
    key: str
    offsets: tuple[int, ...]
    box: tuple[int, ...]
    stacked: bool                   # box is (1, ...) along the layer axis: the parameter is box[0]

    def meta_tensor(self, dtype: torch.dtype) -> torch.Tensor:
        """The parameter's shape and dtype without data (to plan the output before reading)."""
        t = torch.empty(self.box, dtype=dtype, device="meta")
        return t[0] if self.stacked else t


def plan_dist_reads(dist_dir: str | Path, mappings: list[wm.ParamMapping], *, dtype: torch.dtype,
                    max_stage_bytes: int) -> list[list[DistRead]]:
    """What to read for ``mappings``, in their order, from a dist checkpoint written at any TP/PP, from
    its metadata only: consecutive parameters grouped by at most ``max_stage_bytes`` (one larger than
    that is a group of its own), one DCP read per group."""
    dist_dir = Path(dist_dir)
    check_torch_dist(dist_dir)
    saved = FileSystemReader(str(dist_dir)).read_metadata().state_dict_metadata
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups: list[list[DistRead]] = [[]]
    group_bytes = 0
    for m in mappings:
        key, layer = wm.dist_checkpoint_key(m.megatron_name)
        if layer is not None and key not in saved:   # non-homogeneous layers are saved one key per layer
            key, layer = key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1), None
        md = saved.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{dist_dir}: no tensor {key!r} (parameter {m.megatron_name}) in the dist "
                                  "checkpoint: it was written for another architecture, or is incomplete")
        shape = tuple(md.size)
        if layer is None:
            box, offsets = shape, (0,) * len(shape)
        else:                                        # one layer: a (1, ...) box along the layer axis
            box, offsets = (1, *shape[1:]), (layer,) + (0,) * (len(shape) - 1)
        nbytes = itemsize * math.prod(box)
        if groups[-1] and group_bytes + nbytes > max_stage_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append(DistRead(m.megatron_name, key, offsets, box, layer is not None))
        group_bytes += nbytes
    return [g for g in groups if g]


def read_dist_groups(dist_dir: str | Path, groups: list[list[DistRead]], *, dtype: torch.dtype
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, global tensor) for every read of ``groups``, in order; no model, no process group.

    Yielded tensors are fresh ``dtype`` tensors that nothing here keeps, so memory held is one group
    plus whatever the consumer keeps.
    """
    reader = FileSystemReader(str(dist_dir))
    for group in groups:
        dests = [torch.empty(r.box, dtype=dtype) for r in group]
        wants = [(r.key, r.offsets, d) for r, d in zip(group, dests)]
        with warnings.catch_warnings():     # "torch.distributed is disabled ...": no process group is meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load({}, storage_reader=reader, planner=ChunkLoadPlanner(wants, source=str(dist_dir)), no_dist=True)
        del wants
        for i, r in enumerate(group):
            t, dests[i] = dests[i], None             # hand over the only reference
            yield r.megatron_name, (t[0] if r.stacked else t)
            del t


def _export_rank(ckpt_dir: str, out_dir: str, max_shard_bytes: int, max_stage_bytes: int) -> dict:
    baseline = rss_gib("VmRSS")      # this process after its imports: the export's own memory is above it
    reset_peak_rss()
    meta = read_meta(ckpt_dir)
    dtype = parse_dtype(meta.dtype)
    dist_dir = Path(ckpt_dir) / "dist"
    mappings = [m for m in wm.param_mappings(meta.arch) if m.exported]
    groups = plan_dist_reads(dist_dir, mappings, dtype=dtype, max_stage_bytes=max_stage_bytes)
    reads = [r for g in groups for r in g]
    # The HF tensors the maps will make, by running them on data-less tensors: every shard's header
    # and every tensor's offset are then known before anything is read.
    planned = [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in
               wm.export_hf_tensors(meta.arch, ((r.megatron_name, r.meta_tensor(dtype)) for r in reads))]
    model_bytes = sum(math.prod(r.box) for r in reads) * dtype.itemsize
    nbytes = write_hf_safetensors(wm.export_hf_tensors(meta.arch, read_dist_groups(dist_dir, groups, dtype=dtype)),
                                  Path(out_dir), planned=planned, max_shard_bytes=max_shard_bytes)
    return {"bytes": nbytes, "model_bytes": model_bytes, "peak_rss_gib": rss_gib(), "baseline_rss_gib": baseline}


def megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                   max_shard_bytes: int = 2 << 30, max_stage_bytes: int = 1 << 30) -> dict:
    """Export a dist checkpoint (written at any layout) to an HF folder loadable by transformers and vLLM.

    Streams group by group (see above), each tensor written at its planned offset in its output shard
    as it comes: the export's memory is about max(max_stage_bytes, largest tensor), whatever the model
    and shard sizes. Runs in one spawned process, so its memory goes back to the system when done,
    with one thread:
    the work is copies bounded by disk speed, and one thread cannot contend with a trainer sharing the
    CPU (two threads ran 5x slower on a loaded 2-core machine). Returns seconds; bytes written;
    model_bytes (the global tensors read, vocabulary padding included); the export process's
    peak_rss_gib and baseline_rss_gib (its RSS after imports, before reading anything).
    """
    ckpt = Path(ckpt_dir)
    meta = read_meta(ckpt)
    if max_stage_bytes < 1 or max_shard_bytes < 1:
        raise ValueError(f"max_stage_bytes={max_stage_bytes} and max_shard_bytes={max_shard_bytes} must be >= 1")
    t0 = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        (result,) = run_distributed(_export_rank, world_size=1, threads_per_rank=1,
                                    args=(str(ckpt), str(tmp), max_shard_bytes, max_stage_bytes))
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
