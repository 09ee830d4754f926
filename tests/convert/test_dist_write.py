"""The one-process dist-checkpoint writer (``dist_write``) against megatron-core's own save.

The reference is independent of the writer's layout knowledge: real gloo ranks build the GPTModel, load
the converted checkpoint and save it again with ``megatron.core.dist_checkpointing.save``. Both folders
must hold the same keys, global shapes, dtypes and values, the same ``_extra_state`` entries and
megatron's metadata files, and at tp=1 the same chunks. (That the values are the HF model's is
test_convert's logit parity and round trips.)"""
import json

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from sage_megatron.parallel.convert import ChunkLoadPlanner, hf_to_megatron, read_meta
from sage_megatron.parallel.layout import ParallelLayout
from sage_megatron.parallel.launch import run_distributed

pytestmark = pytest.mark.multiproc

MODELS = {
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),   # no output-layer key
    "qwen2_untied": ("qwen2", dict()),                         # QKV bias, an output layer of its own
    "qwen3_tied": ("qwen3", dict(tie_word_embeddings=True)),   # q/k layernorms
}


def _resave_with_megatron(ckpt_dir: str, out_dist: str, layout: ParallelLayout) -> None:
    from sage_megatron.parallel.distributed import init_parallel
    from sage_megatron.parallel.model import build_gpt_model
    from sage_megatron.parallel.precision import parse_dtype
    from sage_megatron.parallel.shards import load_dist_checkpoint, save_dist_checkpoint

    meta = read_meta(ckpt_dir)
    init_parallel(layout)
    model = build_gpt_model(meta.arch, layout=layout, padded_vocab=meta.padded_vocab, dtype=parse_dtype(meta.dtype))
    load_dist_checkpoint(model, f"{ckpt_dir}/dist")
    save_dist_checkpoint(model, out_dist)


def read_whole(dist_dir, key: str, md: TensorStorageMetadata) -> torch.Tensor:
    dest = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    dcp_load({}, storage_reader=FileSystemReader(str(dist_dir)),
             planner=ChunkLoadPlanner([(key, (0,) * dest.dim(), dest)], source=str(dist_dir)), no_dist=True)
    return dest


def chunk_boxes(md: TensorStorageMetadata) -> set[tuple[tuple[int, ...], tuple[int, ...]]]:
    return {(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("tp", [1, 2])
def test_written_checkpoint_equals_megatrons_own_save(tiny_hf_factory, tmp_path, model, tp):
    family, overrides = MODELS[model]
    hf = tiny_hf_factory(family, **overrides)
    ckpt = tmp_path / "ours"
    r = hf_to_megatron(hf, ckpt, tp=tp)
    (tmp_path / "megatron").mkdir()
    run_distributed(_resave_with_megatron, world_size=tp,
                    args=(str(ckpt), str(tmp_path / "megatron"), ParallelLayout(tp=tp)))
    ours, ref = ckpt / "dist", tmp_path / "megatron"
    ours_md = FileSystemReader(str(ours)).read_metadata().state_dict_metadata
    ref_md = FileSystemReader(str(ref)).read_metadata().state_dict_metadata

    assert sorted(ours_md) == sorted(ref_md)
    tensors = [k for k, md in ref_md.items() if isinstance(md, TensorStorageMetadata)]
    objects = [k for k, md in ref_md.items() if isinstance(md, BytesStorageMetadata)]
    assert objects and all(isinstance(ours_md[k], BytesStorageMetadata) for k in objects)
    assert any(k.endswith("linear_fc1.weight") for k in tensors)
    assert ("output_layer.weight" in tensors) == (not overrides.get("tie_word_embeddings", False))
    written = 0
    for key in tensors:
        a, b = ours_md[key], ref_md[key]
        assert isinstance(a, TensorStorageMetadata), key
        assert (a.size, a.properties.dtype) == (b.size, b.properties.dtype), key
        if tp == 1:     # what megatron writes at tp=1, gate and up halves of linear_fc1 included
            assert chunk_boxes(a) == chunk_boxes(b), key
        mine, theirs = read_whole(ours, key, a), read_whole(ref, key, b)
        assert torch.equal(mine, theirs), key
        written += mine.numel() * mine.element_size()
    assert r["tensor_bytes"] == written
    assert json.loads((ours / "metadata.json").read_text()) == json.loads((ref / "metadata.json").read_text())
    assert torch.load(ours / "common.pt") == torch.load(ref / "common.pt")


def test_glu_halves_are_written_as_gate_then_up(tiny_hf_factory, tmp_path):
    """linear_fc1 of layer 1 is [gate; up] of HF's layer 1 (a swapped or shifted half would pass a
    shape check but not this)."""
    from safetensors.torch import load_file

    hf = tiny_hf_factory("llama", tie_word_embeddings=True)
    hf_to_megatron(hf, tmp_path / "c", tp=1)
    md = FileSystemReader(str(tmp_path / "c" / "dist")).read_metadata().state_dict_metadata
    key = "decoder.layers.mlp.linear_fc1.weight"
    fc1 = read_whole(tmp_path / "c" / "dist", key, md[key])[1]
    src = load_file(str(hf / "model.safetensors"))
    expected = torch.cat([src["model.layers.1.mlp.gate_proj.weight"], src["model.layers.1.mlp.up_proj.weight"]])
    assert torch.equal(fc1, expected)
