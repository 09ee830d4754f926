"""Llama-3 rope scaling with any (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).

megatron-core 0.16 hard-codes low 1, high 4, original 8192; sage_megatron computes the inverse frequencies
as transformers does (sage_megatron/parallel/rope.py) and hands them to megatron's rotary embedding.
Pure checks against transformers' own inv_freq, the refusals of every other rope type, old checkpoint
metadata, and the acceptance case: a tiny GQA Llama with original_max_position_embeddings=64 converted at
tp=2 pp=2 by the real converter, HF-equal logits past position 64, bit-exact round trip.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from sage_megatron.parallel.model import (
    ModelArch,
    UnsupportedModelError,
    arch_from_hf_config,
    arch_from_json,
    arch_to_json,
)
from sage_megatron.parallel.rope import Llama3RopeScaling, default_inv_freq, llama3_inv_freq

ACCEPTANCE_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# 8 query heads, 2 kv heads (GQA 4:1), head_dim 16: with theta 1e4 the 8 wavelengths (6.3 ... 19,869)
# fall in all three bands of original 64 (high < 16, medium 16..64, low > 64).
ACCEPTANCE_MODEL = dict(vocab_size=997, hidden_size=128, num_heads=8, num_kv_heads=2, ffn_hidden_size=256,
                        num_layers=2, max_position_embeddings=256, rope_parameters=ACCEPTANCE_ROPE)
SEQ = 160


def hf_inv_freq(rope: dict, *, head_dim: int, max_position_embeddings: int = 100_000) -> torch.Tensor:
    """transformers' own inverse frequencies: LlamaRotaryEmbedding's inv_freq buffer for this config."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                      max_position_embeddings=max_position_embeddings, rope_parameters=dict(rope))
    emb = LlamaRotaryEmbedding(cfg)
    assert emb.attention_scaling == 1.0
    return emb.inv_freq


def scaling_of(rope: dict) -> Llama3RopeScaling:
    return Llama3RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                             high_freq_factor=rope["high_freq_factor"],
                             original_max_position_embeddings=rope["original_max_position_embeddings"])


# (factor, low, high, original, theta, head_dim)
COMBOS = [
    (8.0, 1.0, 4.0, 64, 10000.0, 16),          # the acceptance config
    (8.0, 1.0, 4.0, 8192, 500000.0, 128),      # Llama 3.1 8B
    (32.0, 1.0, 4.0, 8192, 500000.0, 64),      # Llama 3.2 1B/3B
    (16.0, 2.0, 8.0, 128, 10000.0, 32),
    (4, 0.5, 3, 1000, 250000.0, 64),           # ints as JSON may carry them
    (2.5, 1.0, 1.5, 32, 10000.0, 32),
    (8.0, 1.0, 4.0, 512, 1e6, 96),
]


@pytest.mark.parametrize("factor,low,high,original,theta,head_dim", COMBOS)
def test_inv_freq_equals_transformers_exactly(factor, low, high, original, theta, head_dim):
    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}
    ref = hf_inv_freq(rope, head_dim=head_dim)
    ours = llama3_inv_freq(scaling_of(rope), head_dim=head_dim, theta=theta)
    assert ours.dtype == ref.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    assert torch.equal(ours, ref), (ours - ref).abs().max()
    # and the scaling does something: at least one frequency differs from unscaled rope
    assert not torch.equal(ours, default_inv_freq(head_dim, theta))


def test_acceptance_config_differs_from_megatron_hard_coded_scaling():
    """With megatron-core's own llama3 scaling (low 1, high 4, original 8192 fixed) this model's rotary
    frequencies, hence its logits, would be wrong: the parity test below can fail."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    head_dim = ACCEPTANCE_MODEL["hidden_size"] // ACCEPTANCE_MODEL["num_heads"]
    megatron_scaled = RotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, rotary_base=10000, rope_scaling=True,
                                      rope_scaling_factor=8.0, use_cpu_initialization=True).inv_freq
    ref = hf_inv_freq(ACCEPTANCE_ROPE, head_dim=head_dim, max_position_embeddings=256)
    ours = llama3_inv_freq(scaling_of(ACCEPTANCE_ROPE), head_dim=head_dim, theta=10000.0)
    assert torch.equal(ours, ref)
    rel = ((megatron_scaled - ref).abs() / ref).max().item()
    assert rel > 0.5, rel          # some frequencies off by up to the factor 8
    # megatron's hard-coded values are the Llama 3.1 special case of the same function
    assert torch.equal(llama3_inv_freq(Llama3RopeScaling.llama31(8.0), head_dim=head_dim, theta=10000.0),
                       megatron_scaled)


def _hf_rope_types() -> list[str]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return sorted(set(ROPE_INIT_FUNCTIONS) - {"default", "llama3"})


UNSUPPORTED_ROPE_TYPES = sorted(set(_hf_rope_types()) | {"linear", "dynamic", "yarn", "longrope", "su", "mrope"})


def hf_cfg(**kw) -> dict:
    base = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10, "max_position_embeddings": 256}
    base.update(kw)
    return base


@pytest.mark.parametrize("rope_type", UNSUPPORTED_ROPE_TYPES)
@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_every_other_rope_type_is_refused_in_one_line(rope_type, key):
    rope = {"rope_type" if key == "rope_parameters" else "type": rope_type, "rope_theta": 1e4, "factor": 2.0,
            "original_max_position_embeddings": 64}
    with pytest.raises(UnsupportedModelError) as err:
        arch_from_hf_config(hf_cfg(**{key: rope}), source="m/config.json")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"m/config.json: rope type {rope_type!r} is not supported; supported: default, llama3"), msg


def test_hf_lists_more_rope_types_than_llama3():
    assert {"linear", "dynamic", "yarn", "longrope"} <= set(_hf_rope_types())


@pytest.mark.parametrize("missing", ["factor", "low_freq_factor", "high_freq_factor"])
def test_llama3_without_a_required_key_is_refused(missing):
    rope = {k: v for k, v in ACCEPTANCE_ROPE.items() if k != missing}
    with pytest.raises(UnsupportedModelError, match=f"llama3 rope scaling lacks {missing}"):
        arch_from_hf_config(hf_cfg(rope_parameters=rope))


def test_partial_rotary_factor_is_refused():
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor=0.5"):
        arch_from_hf_config(hf_cfg(rope_parameters={**ACCEPTANCE_ROPE, "partial_rotary_factor": 0.5}))


def test_arch_reads_any_llama3_values_and_defaults_original_like_transformers():
    a = arch_from_hf_config(hf_cfg(rope_parameters=ACCEPTANCE_ROPE))
    assert a.rope_llama3 == Llama3RopeScaling(8.0, 1.0, 4.0, 64)
    no_original = {k: v for k, v in ACCEPTANCE_ROPE.items() if k != "original_max_position_embeddings"}
    assert arch_from_hf_config(hf_cfg(rope_parameters=no_original)).rope_llama3.original_max_position_embeddings == 256
    legacy = {"type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
              "original_max_position_embeddings": 64}
    assert arch_from_hf_config(hf_cfg(rope_scaling=legacy)).rope_llama3 == a.rope_llama3
    assert arch_from_hf_config(hf_cfg()).rope_llama3 is None


def test_arch_json_round_trips_and_old_metadata_still_loads():
    a = arch_from_hf_config(hf_cfg(rope_parameters=ACCEPTANCE_ROPE))
    raw = json.loads(json.dumps(arch_to_json(a)))
    assert raw["rope_llama3"]["original_max_position_embeddings"] == 64 and "rope_llama3_factor" not in raw
    assert arch_from_json(raw) == a
    # metadata written before rope_llama3 existed: the factor meant megatron's Llama 3.1 values
    old = {k: v for k, v in raw.items() if k != "rope_llama3"}
    assert arch_from_json({**old, "rope_llama3_factor": 32.0}).rope_llama3 == Llama3RopeScaling(32.0, 1.0, 4.0, 8192)
    assert arch_from_json({**old, "rope_llama3_factor": None}).rope_llama3 is None
    assert isinstance(arch_from_json({**old, "rope_llama3_factor": None}), ModelArch)


# ---- acceptance: real conversion at tp=2 pp=2 ------------------------------------------------------

@pytest.mark.multiproc
def test_llama3_original_64_converts_at_tp2_pp2_with_hf_logits_and_bit_exact_round_trip(tmp_path):
    from sage_megatron.parallel.convert import (
        hf_logits,
        hf_to_megatron,
        megatron_logits,
        megatron_to_hf,
        read_meta,
        reference_tokens,
    )
    from sage_megatron.testing.tiny_models import make_tiny_hf_model

    hf = make_tiny_hf_model("llama", tmp_path / "hf", seed=7, **ACCEPTANCE_MODEL)
    src_cfg = json.loads((hf / "config.json").read_text())
    assert src_cfg["num_key_value_heads"] == 2 and src_cfg["vocab_size"] == 997
    assert src_cfg["rope_parameters"] == ACCEPTANCE_ROPE

    ckpt = tmp_path / "ckpt"
    hf_to_megatron(hf, ckpt, tp=2, pp=2)
    assert read_meta(ckpt).arch.rope_llama3 == Llama3RopeScaling(8.0, 1.0, 4.0, 64)

    tokens = reference_tokens(997, batch=2, seq=SEQ, seed=1)
    mg = megatron_logits(ckpt, tokens, tp=2, pp=2)
    ref = hf_logits(hf, tokens)
    assert mg.shape == ref.shape == (2, SEQ, 997)
    late = (mg[:, 65:] - ref[:, 65:]).abs().max().item()
    print(f"max |logit diff| at positions > 64: {late:.3e}; overall {(mg - ref).abs().max().item():.3e}; "
          f"max |logit| {ref.abs().max().item():.3f}")
    assert ref.abs().max().item() > 1.0
    assert late <= 1e-4

    # The same weights under megatron-core's hard-coded llama3 values (low 1, high 4, original 8192):
    # transformers' logits for that config are far from the Megatron model's, so the check above can fail.
    import shutil

    hard = tmp_path / "hf_megatron_hard_coded"
    shutil.copytree(hf, hard)
    hard_cfg = dict(src_cfg, rope_parameters={**ACCEPTANCE_ROPE, "original_max_position_embeddings": 8192})
    hard_cfg["max_position_embeddings"] = 16384
    (hard / "config.json").write_text(json.dumps(hard_cfg))
    wrong = (hf_logits(hard, tokens)[:, 65:] - mg[:, 65:]).abs().max().item()
    print(f"max |logit diff| vs the megatron-hard-coded rope: {wrong:.3e}")
    assert wrong > 1e-2

    # Megatron -> HF: every tensor bit-equal, config.json (rope_parameters included) unchanged for vLLM.
    out = tmp_path / "hf_out"
    megatron_to_hf(ckpt, out)
    src, got = load_file(str(hf / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(src) == sorted(got)
    for name in src:
        assert src[name].dtype == got[name].dtype and torch.equal(src[name], got[name]), name
    out_cfg = json.loads((out / "config.json").read_text())
    assert out_cfg == src_cfg and out_cfg["rope_parameters"] == ACCEPTANCE_ROPE
