"""Streaming export (megatron_to_hf reads the dist checkpoint group of layers by group of layers, no model):
byte-for-byte the HF source the checkpoint was converted from, whatever layout it was written at and
however small the groups and output shards; and its peak memory is a group, not the model (the import's
a tensor)."""
import json

import pytest
import torch
from safetensors import safe_open

from sage_megatron.parallel.convert import hf_to_megatron, megatron_to_hf
from sage_megatron.parallel.hf_io import CheckpointError

pytestmark = pytest.mark.multiproc


def hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (one file or an index of shards)."""
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} in two shards"
                out[k] = h.get_tensor(k)
    return out


def assert_byte_identical(src_dir, out_dir) -> None:
    src, out = hf_tensors(src_dir), hf_tensors(out_dir)
    assert sorted(src) == sorted(out)
    for name, a in src.items():
        b = out[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), name
    index = out_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        assert sorted(weight_map) == sorted(out)
        assert all((out_dir / f).is_file() for f in weight_map.values())


@pytest.mark.parametrize("family,tp,pp,stage_bytes,shard_bytes", [
    ("qwen2", 2, 2, 1, 64 << 10),          # every tensor its own group; 64 KiB output shards (an index)
    ("qwen3", 1, 1, 1 << 30, 2 << 30),     # tied, q/k norms; the defaults: one group, one file
])
def test_export_is_byte_identical_to_the_hf_source(tiny_hf_factory, tmp_path, family, tp, pp, stage_bytes,
                                                   shard_bytes):
    """HF -> Megatron (written at tp x pp) -> HF is the identity, tensor by tensor, byte by byte.
    (test_convert.py covers Llama tied at 2x2, every family at 2x1 and bf16 through the same export.)"""
    kw = {"tie_word_embeddings": True} if family != "qwen2" else {}
    hf = tiny_hf_factory(family, **kw)
    hf_to_megatron(hf, tmp_path / "ck", tp=tp, pp=pp)
    r = megatron_to_hf(tmp_path / "ck", tmp_path / "out", max_stage_bytes=stage_bytes,
                       max_shard_bytes=shard_bytes)
    assert_byte_identical(hf, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file() == (shard_bytes < r["bytes"])
    assert r["bytes"] == sum(t.numel() * t.element_size() for t in hf_tensors(hf).values())
    assert r["model_bytes"] >= r["bytes"] and r["peak_rss_gib"] >= r["baseline_rss_gib"] > 0


def test_export_memory_is_a_group_of_layers_not_the_model(tmp_path):
    """A 48-layer fp32 model (~190 MB) exported in 8 MiB groups into ONE output file: the export
    process's peak RSS grows by less than half the model over its baseline (torch + the converter
    imported), so neither the model nor the output shard is held. The same export with the whole model
    in one group grows by about the model: the measure can fail."""
    from sage_megatron.testing.tiny_models import make_tiny_hf_model

    hf = make_tiny_hf_model("llama", tmp_path / "hf", hidden_size=256, num_layers=48, num_heads=4,
                            num_kv_heads=2, ffn_hidden_size=1024, seed=7)
    imported = hf_to_megatron(hf, tmp_path / "ck", tp=1, pp=1)
    streamed = megatron_to_hf(tmp_path / "ck", tmp_path / "out", max_stage_bytes=8 << 20, max_shard_bytes=1 << 40)
    model_gib = streamed["model_bytes"] / 2**30
    # The import holds a tensor at a time too (with its safetensors files kept mapped it grew by the model).
    assert imported["rss_growth_gib"] < model_gib / 2, imported
    growth = streamed["peak_rss_gib"] - streamed["baseline_rss_gib"]
    assert streamed["model_bytes"] > 180e6
    assert streamed["baseline_rss_gib"] < 1.5, streamed
    assert growth < model_gib / 2, (f"peak RSS grew {growth * 1024:.0f} MiB for a {model_gib * 1024:.0f} MiB "
                                    f"model: {streamed}")
    assert_byte_identical(hf, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    whole = megatron_to_hf(tmp_path / "ck", tmp_path / "out_whole", max_stage_bytes=1 << 40,
                           max_shard_bytes=8 << 20)
    assert whole["peak_rss_gib"] - whole["baseline_rss_gib"] > 0.9 * model_gib, whole


def test_a_checkpoint_lacking_a_tensor_is_named(tiny_hf_factory, tmp_path):
    """A dist checkpoint without a parameter the architecture needs fails with the key named, no output left."""
    import pickle

    hf = tiny_hf_factory("qwen2")
    hf_to_megatron(hf, tmp_path / "ck", tp=1, pp=1)
    md_path = tmp_path / "ck" / "dist" / ".metadata"
    md = pickle.loads(md_path.read_bytes())
    del md.state_dict_metadata["decoder.final_layernorm.weight"]
    md_path.write_bytes(pickle.dumps(md))
    with pytest.raises(RuntimeError, match="decoder.final_layernorm.weight") as err:
        megatron_to_hf(tmp_path / "ck", tmp_path / "out")
    assert CheckpointError.__name__ in str(err.value)
    assert not (tmp_path / "out").exists()
