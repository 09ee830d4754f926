"""Per-architecture weight maps between HF tensors and Megatron tensors: the ONE conversion path.

Vocabulary of this module:
- an *HF tensor* is a tensor of an HF checkpoint, by its HF name;
- a *global* Megatron tensor is what a Megatron parameter holds at tp=1 (global layer index in its name);
- a *shard* is one tensor-parallel rank's slice of a global tensor.

``param_mappings(arch)`` lists, for every Megatron parameter, its HF sources and how it is fused and
split; ``to_global``/``from_global`` convert HF <-> global; ``shard``/``merge_shards`` convert
global <-> TP shards. The offline converter (tools/convert) and the per-iteration weight sync into vLLM
both go through these functions, so they cannot drift apart.

Layouts (h = hidden, d = head_dim, nq/ng = query heads/groups, qpg = nq/ng, f = ffn):
- linear_qkv [ng*(qpg+2)*d, h]: per query group, its qpg query heads then its k head then its v head
  (group-major, so a TP split is a contiguous chunk of whole groups);
- linear_fc1 [2f, h]: [gate; up]; a TP shard is [gate_r; up_r];
- embedding / output_layer [V_padded, h]: vocabulary padded with zero rows, split along rows;
- linear_proj, linear_fc2: split along columns (row-parallel); norms are replicated.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from sage_megatron.parallel.model import ModelArch

COLUMN, COLUMN_GLU, ROW, REPLICATED, VOCAB = "column", "column_glu", "row", "replicated", "vocab"


class WeightMapError(ValueError):
    pass


@dataclass(frozen=True)
class ParamMapping:
    """One Megatron parameter and the HF tensors it is made of."""

    megatron_name: str              # local-spec name with the GLOBAL layer index
    hf_names: tuple[str, ...]       # sources, in fuse order
    tp_split: str                   # COLUMN | COLUMN_GLU | ROW | REPLICATED | VOCAB
    fuse: str = "none"              # "none" | "qkv" | "glu"
    exported: bool = True           # False for the output layer of tied-embedding models


def param_mappings(arch: ModelArch) -> list[ParamMapping]:
    """Every Megatron parameter of ``arch`` (all stages), in model order."""
    maps = [ParamMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB)]
    for i in range(arch.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        maps.append(ParamMapping(mg + "input_layernorm.weight", (hf + "input_layernorm.weight",), REPLICATED))
        qkv = tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv")
        maps.append(ParamMapping(mg + "self_attention.linear_qkv.weight", qkv, COLUMN, fuse="qkv"))
        if arch.qkv_bias:
            qkv_b = tuple(hf + f"self_attn.{p}_proj.bias" for p in "qkv")
            maps.append(ParamMapping(mg + "self_attention.linear_qkv.bias", qkv_b, COLUMN, fuse="qkv"))
        if arch.qk_norm:
            maps.append(ParamMapping(mg + "self_attention.q_layernorm.weight", (hf + "self_attn.q_norm.weight",), REPLICATED))
            maps.append(ParamMapping(mg + "self_attention.k_layernorm.weight", (hf + "self_attn.k_norm.weight",), REPLICATED))
        maps.append(ParamMapping(mg + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",), ROW))
        maps.append(ParamMapping(mg + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), REPLICATED))
        glu = (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight")
        maps.append(ParamMapping(mg + "mlp.linear_fc1.weight", glu, COLUMN_GLU, fuse="glu"))
        maps.append(ParamMapping(mg + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), ROW))
    maps.append(ParamMapping("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED))
    if arch.tie_word_embeddings:
        maps.append(ParamMapping("output_layer.weight", ("model.embed_tokens.weight",), VOCAB, exported=False))
    else:
        maps.append(ParamMapping("output_layer.weight", ("lm_head.weight",), VOCAB))
    return maps


@functools.lru_cache(maxsize=8)
def _hf_shapes(arch: ModelArch) -> Mapping[str, tuple[int, ...]]:
    """``hf_tensor_shapes`` computed once per architecture (read-only: callers must not mutate it)."""
    return hf_tensor_shapes(arch)


def hf_tensor_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """The shape every HF tensor of ``arch`` must have (checked before any conversion work starts)."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (arch.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (arch.num_query_groups * d, h),
            p + "self_attn.v_proj.weight": (arch.num_query_groups * d, h),
            p + "self_attn.o_proj.weight": (h, arch.num_attention_heads * d),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
        if arch.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (arch.num_attention_heads * d,),
                           p + "self_attn.k_proj.bias": (arch.num_query_groups * d,),
                           p + "self_attn.v_proj.bias": (arch.num_query_groups * d,)})
        if arch.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


# ---- fusing: HF tensors <-> global Megatron tensor -------------------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, arch: ModelArch) -> torch.Tensor:
    """q (nq*d, ...), k/v (ng*d, ...) -> (ng*(qpg+2)*d, ...), grouped per query group.

    Works on a TP rank's slices too (its query groups' rows of q, k and v): ng is read from k."""
    d = arch.head_dim
    ng = k.shape[0] // d
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(ng, arch.q_per_group * d, *rest), k.reshape(ng, d, *rest),
                         v.reshape(ng, d, *rest)], dim=1)
    return grouped.reshape(ng * (arch.q_per_group + 2) * d, *rest)


def split_qkv(qkv: torch.Tensor, *, arch: ModelArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv`` (works on a TP shard too: fewer groups, same per-group layout)."""
    d, qpg = arch.head_dim, arch.q_per_group
    rest = qkv.shape[1:]
    ng = qkv.shape[0] // ((qpg + 2) * d)
    grouped = qkv.reshape(ng, (qpg + 2) * d, *rest)
    q, k, v = torch.split(grouped, [qpg * d, d, d], dim=1)
    return q.reshape(ng * qpg * d, *rest), k.reshape(ng * d, *rest), v.reshape(ng * d, *rest)


def pad_vocab(t: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    if t.shape[0] > padded_vocab:
        raise WeightMapError(f"vocabulary {t.shape[0]} is larger than the padded size {padded_vocab}")
    if t.shape[0] == padded_vocab:
        return t
    return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])


def to_global(m: ParamMapping, get_hf: Callable[[str], torch.Tensor], *, arch: ModelArch,
              padded_vocab: int) -> torch.Tensor:
    """The global Megatron tensor for mapping ``m`` from HF tensors fetched by ``get_hf``."""
    srcs = [get_hf(n) for n in m.hf_names]
    if m.fuse == "qkv":
        return fuse_qkv(*srcs, arch=arch)
    if m.fuse == "glu":
        return torch.cat(srcs, dim=0)
    (t,) = srcs
    return pad_vocab(t, padded_vocab) if m.tp_split == VOCAB else t


def from_global(m: ParamMapping, t: torch.Tensor, *, arch: ModelArch) -> dict[str, torch.Tensor]:
    """HF tensors from a global Megatron tensor (vocabulary padding removed)."""
    if m.fuse == "qkv":
        return dict(zip(m.hf_names, split_qkv(t, arch=arch)))
    if m.fuse == "glu":
        return dict(zip(m.hf_names, torch.chunk(t, 2, dim=0)))
    if m.tp_split == VOCAB:
        t = t[: arch.vocab_size]
    return {m.hf_names[0]: t}


# ---- tensor parallelism: global <-> shards ---------------------------------------------------------

def shard(m: ParamMapping, t: torch.Tensor, *, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice of global tensor ``t`` (a view where possible)."""
    if m.tp_split == REPLICATED or tp == 1:
        return t
    if m.tp_split in (COLUMN, VOCAB):
        return torch.chunk(t, tp, dim=0)[rank]
    if m.tp_split == ROW:
        return torch.chunk(t, tp, dim=1)[rank]
    if m.tp_split == COLUMN_GLU:
        gate, up = torch.chunk(t, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp, dim=0)[rank], torch.chunk(up, tp, dim=0)[rank]], dim=0)
    raise WeightMapError(f"unknown tp split {m.tp_split!r} for {m.megatron_name}")


def merge_shards(m: ParamMapping, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``shard``: the global tensor from all TP ranks' slices, in rank order."""
    if m.tp_split == REPLICATED or len(shards) == 1:
        return shards[0]
    if m.tp_split in (COLUMN, VOCAB):
        return torch.cat(shards, dim=0)
    if m.tp_split == ROW:
        return torch.cat(shards, dim=1)
    if m.tp_split == COLUMN_GLU:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise WeightMapError(f"unknown tp split {m.tp_split!r} for {m.megatron_name}")


# ---- names of a live model's parameters ------------------------------------------------------------

# With the Transformer Engine spec the two pre-norms are fused into the following linear layer.
TE_NAME_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def canonical_name(module_name: str, *, layer_offset: int) -> str:
    """Megatron module parameter name (local layer index, local or TE spec) -> mapping key."""
    name = module_name.removeprefix("module.")
    if name.startswith("decoder.layers."):
        idx, rest = name[len("decoder.layers."):].split(".", 1)
        for local, te in TE_NAME_ALIASES.items():
            if rest == te:
                rest = local
        name = f"decoder.layers.{int(idx) + layer_offset}.{rest}"
    return name


def dist_checkpoint_key(name: str) -> tuple[str, int | None]:
    """Mapping key -> (its key in a megatron-core dist checkpoint, layer index along that key's leading
    axis, or None for embedding / final norm / output layer).

    megatron-core 0.16 (``TransformerBlock.sharded_state_dict``) saves the homogeneous layers of the
    decoder as ONE key per parameter with a prepended layer axis: ``decoder.layers.mlp.linear_fc1.weight``
    of shape (num_layers, 2f, h), each (layer, TP rank) a chunk; the local spec writes the two pre-norms
    under their Transformer Engine names (its ``sharded_state_dict_keys_map``), as ``TE_NAME_ALIASES`` says.
    """
    if not name.startswith("decoder.layers."):
        return name, None
    idx, rest = name[len("decoder.layers."):].split(".", 1)
    return f"decoder.layers.{TE_NAME_ALIASES.get(rest, rest)}", int(idx)


def mappings_by_name(arch: ModelArch) -> dict[str, ParamMapping]:
    return {m.megatron_name: m for m in param_mappings(arch)}


def export_hf_tensors(arch: ModelArch, global_tensors: Iterator[tuple[str, torch.Tensor]]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron global name, tensor) -> (HF name, tensor), skipping non-exported (tied) parameters."""
    by_name = mappings_by_name(arch)
    for name, t in global_tensors:
        m = by_name.get(name)
        if m is None:
            raise WeightMapError(f"Megatron parameter {name!r} has no HF mapping for {arch.family}")
        if m.exported:
            yield from from_global(m, t, arch=arch).items()


def check_hf_tensors(arch: ModelArch, shapes: Mapping[str, tuple[int, ...]], *, source: str) -> None:
    """Compare an HF checkpoint's tensor names/shapes with what ``arch`` needs; raise naming the first problems."""
    want = hf_tensor_shapes(arch)
    missing = [n for n in want if n not in shapes]
    wrong = [f"{n}: checkpoint {tuple(shapes[n])} vs config {want[n]}" for n in want
             if n in shapes and tuple(shapes[n]) != want[n]]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es) ({'; '.join(wrong[:3])})")
        raise WeightMapError(f"{source}: config.json and the weights disagree: {'; '.join(parts)}. "
                             "Check that config.json belongs to these safetensors files, or re-export the checkpoint.")
