"""Pure weight-map functions against hand-built layouts (no Megatron, no processes)."""
import pytest
import torch

from sage_megatron.parallel import weight_maps as wm
from sage_megatron.parallel.model import ModelArch, UnsupportedModelError, arch_from_hf_config
from sage_megatron.parallel.rope import Llama3RopeScaling


def arch(**kw) -> ModelArch:
    base = dict(family="llama", hf_architecture="LlamaForCausalLM", num_layers=2, hidden_size=2, ffn_hidden_size=4,
                num_attention_heads=4, num_query_groups=2, head_dim=1, vocab_size=5, max_position_embeddings=16,
                rms_norm_eps=1e-5, rope_theta=10000.0, rope_llama3=None, tie_word_embeddings=False,
                qkv_bias=False, qk_norm=False)
    base.update(kw)
    return ModelArch(**base)


def rows(*values):
    """A (n, 2) tensor whose row i is [values[i], values[i]] so rows are identifiable."""
    return torch.tensor([[float(v), float(v)] for v in values])


def test_fuse_qkv_is_group_major():
    a = arch()  # 4 query heads, 2 groups, head_dim 1 -> 2 queries per group
    q, k, v = rows(10, 11, 12, 13), rows(20, 21), rows(30, 31)
    fused = wm.fuse_qkv(q, k, v, arch=a)
    # group 0: q10 q11 k20 v30 | group 1: q12 q13 k21 v31
    assert fused[:, 0].tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    q2, k2, v2 = wm.split_qkv(fused, arch=a)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_fuse_qkv_bias_1d():
    a = arch()
    fused = wm.fuse_qkv(torch.tensor([1., 2, 3, 4]), torch.tensor([5., 6]), torch.tensor([7., 8]), arch=a)
    assert fused.tolist() == [1, 2, 5, 7, 3, 4, 6, 8]


def test_qkv_tp_shard_is_whole_groups():
    a = arch()
    m = next(x for x in wm.param_mappings(a) if x.fuse == "qkv")
    fused = wm.fuse_qkv(rows(10, 11, 12, 13), rows(20, 21), rows(30, 31), arch=a)
    s0, s1 = (wm.shard(m, fused, tp=2, rank=r) for r in (0, 1))
    assert s0[:, 0].tolist() == [10, 11, 20, 30] and s1[:, 0].tolist() == [12, 13, 21, 31]
    q, k, v = wm.split_qkv(s1, arch=a)  # a shard splits with the same per-group layout
    assert q[:, 0].tolist() == [12, 13] and k[:, 0].tolist() == [21] and v[:, 0].tolist() == [31]
    assert torch.equal(wm.merge_shards(m, [s0, s1]), fused)


def test_glu_shard_takes_gate_and_up_slices():
    m = wm.ParamMapping("x", ("g", "u"), wm.COLUMN_GLU, fuse="glu")
    fused = torch.cat([rows(1, 2, 3, 4), rows(5, 6, 7, 8)])  # gate rows 1..4, up rows 5..8
    assert wm.shard(m, fused, tp=2, rank=0)[:, 0].tolist() == [1, 2, 5, 6]
    assert wm.shard(m, fused, tp=2, rank=1)[:, 0].tolist() == [3, 4, 7, 8]
    shards = [wm.shard(m, fused, tp=2, rank=r) for r in (0, 1)]
    assert torch.equal(wm.merge_shards(m, shards), fused)


def test_row_parallel_splits_columns():
    m = wm.ParamMapping("x", ("o",), wm.ROW)
    t = torch.arange(8.).reshape(2, 4)
    assert wm.shard(m, t, tp=2, rank=1).tolist() == [[2, 3], [6, 7]]
    assert torch.equal(wm.merge_shards(m, [wm.shard(m, t, tp=2, rank=r) for r in (0, 1)]), t)


def test_vocab_padding_added_on_import_and_removed_on_export():
    a = arch(vocab_size=5)
    m = wm.mappings_by_name(a)["embedding.word_embeddings.weight"]
    emb = rows(1, 2, 3, 4, 5)
    g = wm.to_global(m, {"model.embed_tokens.weight": emb}.__getitem__, arch=a, padded_vocab=8)
    assert g.shape == (8, 2) and g[5:].abs().sum() == 0
    assert torch.equal(wm.from_global(m, g, arch=a)["model.embed_tokens.weight"], emb)
    assert wm.shard(m, g, tp=2, rank=1)[:, 0].tolist() == [5, 0, 0, 0]


def test_tied_output_layer_is_not_exported():
    a = arch(tie_word_embeddings=True)
    m = wm.mappings_by_name(a)["output_layer.weight"]
    assert m.hf_names == ("model.embed_tokens.weight",) and not m.exported
    out = list(wm.export_hf_tensors(a, iter([("output_layer.weight", torch.zeros(8, 2))])))
    assert out == []
    assert "lm_head.weight" not in wm.hf_tensor_shapes(a)


def test_family_specific_tensors():
    qwen2 = arch(family="qwen2", hf_architecture="Qwen2ForCausalLM", qkv_bias=True)
    qwen3 = arch(family="qwen3", hf_architecture="Qwen3ForCausalLM", qk_norm=True, head_dim=3)
    assert "decoder.layers.1.self_attention.linear_qkv.bias" in wm.mappings_by_name(qwen2)
    shapes = wm.hf_tensor_shapes(qwen3)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (3,)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (12, 2)  # heads * head_dim != hidden
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (2, 12)


def test_te_names_map_to_the_same_keys():
    assert wm.canonical_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", layer_offset=3) == \
        "decoder.layers.3.input_layernorm.weight"
    assert wm.canonical_name("module.decoder.layers.1.mlp.linear_fc1.layer_norm_weight", layer_offset=0) == \
        "decoder.layers.1.pre_mlp_layernorm.weight"
    assert wm.canonical_name("embedding.word_embeddings.weight", layer_offset=5) == "embedding.word_embeddings.weight"


def test_config_weight_mismatch_is_reported():
    a = arch()
    shapes = wm.hf_tensor_shapes(a)
    shapes["model.layers.1.mlp.up_proj.weight"] = (5, 2)
    del shapes["model.norm.weight"]
    with pytest.raises(wm.WeightMapError) as err:
        wm.check_hf_tensors(a, shapes, source="/x")
    assert "model.norm.weight" in str(err.value) and "up_proj.weight: checkpoint (5, 2) vs config (4, 2)" in str(err.value)


def hf_cfg(**kw):
    base = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10}
    base.update(kw)
    return base


def test_arch_reads_transformers5_rope_parameters_and_llama3_scaling():
    a = arch_from_hf_config(hf_cfg(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192}))
    assert a.rope_theta == 500000.0 and a.head_dim == 4
    assert a.rope_llama3 == Llama3RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=8192)


def test_arch_old_style_rope_theta_and_qwen3_head_dim():
    a = arch_from_hf_config(hf_cfg(architectures=["Qwen3ForCausalLM"], rope_theta=1e6, head_dim=16))
    assert a.family == "qwen3" and a.qk_norm and a.head_dim == 16 and a.rope_theta == 1e6


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM.*supported: LlamaForCausalLM, "
                                                   "Qwen2ForCausalLM, Qwen3ForCausalLM"):
        arch_from_hf_config(hf_cfg(architectures=["MistralForCausalLM"]))


def test_unsupported_rope_variant():
    with pytest.raises(UnsupportedModelError, match="rope type 'yarn'"):
        arch_from_hf_config(hf_cfg(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}))
