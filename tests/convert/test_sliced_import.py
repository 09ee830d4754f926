"""Sliced import: every TP rank reads only its own slices of the HF tensors (``weight_maps.hf_shard`` over
``HFReader.get_slice``), and gets exactly what the whole-tensor route gave, ``shard(to_global(...))``,
for every mapping of every supported family, at tp = 1, 2, 3 and 4, on real safetensors files."""
import json

import pytest
import torch

from sage_megatron.parallel import weight_maps as wm
from sage_megatron.parallel.hf_io import CheckpointError, HFReader
from sage_megatron.parallel.layout import padded_vocab_size
from sage_megatron.parallel.model import arch_from_hf_config

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# (family, config overrides): 2 query groups allow tp <= 2; 4 groups (4 heads, 1 query per group) tp = 4.
MODELS = {
    "llama_tied": ("llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "llama_4groups": ("llama", dict(num_kv_heads=4)),
    "qwen2": ("qwen2", dict()),                                  # QKV bias, untied output layer
    "qwen2_4groups": ("qwen2", dict(num_kv_heads=4)),
    "qwen3_tied": ("qwen3", dict(tie_word_embeddings=True)),     # q/k norms, head_dim != hidden/heads
    "qwen3_4groups": ("qwen3", dict(num_kv_heads=4)),
    # SmolLM2-like 3 groups: tp = 3, vocabulary padded to a multiple of lcm(128, 3) = 384
    "llama_3groups": ("llama", dict(hidden_size=192, num_heads=6, num_kv_heads=3, ffn_hidden_size=384)),
}


def byte_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def check_every_shard(hf_dir, *, tp: int, extra_padding: int = 0) -> int:
    arch = arch_from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    reader = HFReader(hf_dir)
    padded = padded_vocab_size(arch.vocab_size, tp=tp) + extra_padding
    checked = 0
    for m in wm.param_mappings(arch):
        whole = wm.to_global(m, reader.get, arch=arch, padded_vocab=padded)
        for rank in range(tp):
            ref = wm.shard(m, whole, tp=tp, rank=rank)
            got = wm.hf_shard(m, reader.get_slice, arch=arch, padded_vocab=padded, tp=tp, rank=rank)
            assert byte_equal(got, ref), (m.megatron_name, tp, rank, tuple(got.shape), tuple(ref.shape))
            checked += 1
    return checked


@pytest.mark.parametrize("model", list(MODELS))
def test_every_rank_slice_equals_the_shard_of_the_whole_tensor(tiny_hf_factory, model):
    family, overrides = MODELS[model]
    hf = tiny_hf_factory(family, **overrides)
    groups = json.loads((hf / "config.json").read_text())["num_key_value_heads"]
    for tp in [t for t in (1, 2, 3, 4) if groups % t == 0]:
        n = check_every_shard(hf, tp=tp)
        arch = arch_from_hf_config(json.loads((hf / "config.json").read_text()))
        assert n == tp * len(wm.param_mappings(arch))


@pytest.mark.parametrize("tp", [2, 4])
def test_ranks_entirely_in_the_vocabulary_padding_get_zeros(tiny_hf_factory, tp):
    """Padding one more multiple of 128*tp puts whole ranks past the HF vocabulary: they read no HF rows."""
    hf = tiny_hf_factory("qwen2", num_kv_heads=4)
    check_every_shard(hf, tp=tp, extra_padding=128 * tp)
    arch = arch_from_hf_config(json.loads((hf / "config.json").read_text()))
    padded = padded_vocab_size(arch.vocab_size, tp=tp) + 128 * tp
    m = wm.mappings_by_name(arch)["embedding.word_embeddings.weight"]
    reads = []

    def get_slice(name, dim, start, stop):
        reads.append((name, dim, start, stop))
        return HFReader(hf).get_slice(name, dim, start, stop)

    last = wm.hf_shard(m, get_slice, arch=arch, padded_vocab=padded, tp=tp, rank=tp - 1)
    assert last.shape == (padded // tp, arch.hidden_size) and not last.any()
    assert reads == [("model.embed_tokens.weight", 0, arch.vocab_size, arch.vocab_size)]   # zero rows read


def test_bf16_slices_stay_bf16(tmp_path):
    from sage_megatron.testing.tiny_models import make_tiny_hf_model

    hf = make_tiny_hf_model("qwen2", tmp_path / "hf", dtype=torch.bfloat16, seed=5)
    assert check_every_shard(hf, tp=2) > 0
    assert HFReader(hf).get_slice("model.layers.0.self_attn.o_proj.weight", 1, 0, 8).dtype == torch.bfloat16


def test_each_rank_reads_only_its_rows_or_columns(tiny_hf_factory):
    """What the sliced route asks the reader for, per split kind, at tp=2 rank 1 (2 query groups, head_dim 32)."""
    hf = tiny_hf_factory("qwen2")
    arch = arch_from_hf_config(json.loads((hf / "config.json").read_text()))
    reader, by_name = HFReader(hf), wm.mappings_by_name(arch)
    padded = padded_vocab_size(arch.vocab_size, tp=2)
    asked = {}

    def get_slice(name, dim, start, stop):
        asked[name.removeprefix("model.layers.0.")] = (dim, start, stop)
        return reader.get_slice(name, dim, start, stop)

    for key in ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight", "mlp.linear_fc1.weight",
                "mlp.linear_fc2.weight", "input_layernorm.weight"):
        wm.hf_shard(by_name[f"decoder.layers.0.{key}"], get_slice, arch=arch, padded_vocab=padded, tp=2, rank=1)
    f, d = arch.ffn_hidden_size, arch.head_dim
    qrows = arch.q_per_group * d
    assert asked == {
        "self_attn.q_proj.weight": (0, qrows, 2 * qrows), "self_attn.k_proj.weight": (0, d, 2 * d),
        "self_attn.v_proj.weight": (0, d, 2 * d),
        "self_attn.o_proj.weight": (1, arch.num_attention_heads * d // 2, arch.num_attention_heads * d),
        "mlp.gate_proj.weight": (0, f // 2, f), "mlp.up_proj.weight": (0, f // 2, f),
        "mlp.down_proj.weight": (1, f // 2, f),
        "input_layernorm.weight": (0, 0, None),            # replicated: the whole tensor
    }


def test_a_slice_outside_the_tensor_names_it(tiny_hf_factory):
    reader = HFReader(tiny_hf_factory("qwen2"))
    with pytest.raises(CheckpointError, match=r"model.norm.weight.*slice \[0, 999\)"):
        reader.get_slice("model.norm.weight", 0, 0, 999)
    with pytest.raises(CheckpointError, match="not found"):
        reader.get_slice("model.nope", 0, 0, 1)
