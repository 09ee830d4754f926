"""HF <-> Megatron conversion with real gloo ranks: logit parity with HF transformers at every
layout, bit-exact round trips, and checkpoints that load at a layout other than the one written."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sage_megatron.parallel.convert import compare_logits, hf_to_megatron, megatron_to_hf

pytestmark = pytest.mark.multiproc

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
FAMILIES = {
    # SmolLM2-like: tied embeddings, Llama 3 rope scaling
    "llama": dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    "qwen2": dict(),                            # QKV bias, untied
    "qwen3": dict(tie_word_embeddings=True),    # q/k norms, head_dim 64 != hidden/heads
}
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def converted(tiny_hf_factory, tmp_path_factory):
    """family -> (hf_dir, ckpt written at tp=2, pp=1)."""
    out = {}
    for family, kw in FAMILIES.items():
        hf = tiny_hf_factory(family, **kw)
        ckpt = tmp_path_factory.mktemp(f"ckpt_{family}") / "tp2pp1"
        hf_to_megatron(hf, ckpt, tp=2, pp=1)
        out[family] = (hf, ckpt)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_fp32_logit_parity_at_every_layout(converted, family, tp, pp):
    """A checkpoint written at (2,1) runs at (tp,pp) with HF-equal logits (fp32, <= 1e-4)."""
    hf, ckpt = converted[family]
    r = compare_logits(hf, ckpt, tp=tp, pp=pp, batch=2, seq=24)
    assert r["max_abs_logit"] > 1.0  # the reference is not trivially ~0
    assert r["max_abs_logit_diff"] <= 1e-4, r


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_exact(converted, family, tmp_path):
    hf, ckpt = converted[family]
    megatron_to_hf(ckpt, tmp_path / "hf")
    src, out = load_file(str(hf / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(src) == sorted(out)
    for name in src:
        assert src[name].dtype == out[name].dtype, name
        assert torch.equal(src[name], out[name]), name
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())


def test_written_at_2x2_round_trips_and_matches_at_1x1(tiny_hf_factory, tmp_path):
    """Writing at pp>1 with tied embeddings (embedding on the first stage, output layer on the last)."""
    hf = tiny_hf_factory("llama", **FAMILIES["llama"])
    hf_to_megatron(hf, tmp_path / "c22", tp=2, pp=2)
    assert json.loads((tmp_path / "c22" / "sage_megatron.json").read_text())["written_layout"] == {"tp": 2, "pp": 2}
    assert compare_logits(hf, tmp_path / "c22", tp=1, pp=1)["max_abs_logit_diff"] <= 1e-4
    megatron_to_hf(tmp_path / "c22", tmp_path / "hf")
    src, out = load_file(str(hf / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(src) == sorted(out) and all(torch.equal(src[k], out[k]) for k in src)


def test_bf16_checkpoint_round_trips_in_bf16(tmp_path):
    from sage_megatron.testing.tiny_models import make_tiny_hf_model

    hf = make_tiny_hf_model("qwen2", tmp_path / "hf_bf16", dtype=torch.bfloat16, seed=3)
    hf_to_megatron(hf, tmp_path / "c", tp=2, pp=1)
    assert json.loads((tmp_path / "c" / "sage_megatron.json").read_text())["dtype"] == "bfloat16"
    megatron_to_hf(tmp_path / "c", tmp_path / "out")
    src, out = load_file(str(hf / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(out[k].dtype == torch.bfloat16 and torch.equal(src[k], out[k]) for k in src)
    # The bf16 actor is wrapped as megatron-core wraps it (Float16Module, no blanket .to(dtype)): bf16
    # parameters, fp32 logits out of the last stage, equal to HF's bf16 forward up to bf16 rounding.
    from sage_megatron.parallel.convert import hf_logits, megatron_logits, reference_tokens
    from sage_megatron.parallel.launch import run_distributed

    (built,) = run_distributed(_built_model, world_size=1, args=(str(tmp_path / "c"),))
    assert built == ("Float16Module", {"torch.bfloat16"})
    tokens = reference_tokens(json.loads((hf / "config.json").read_text())["vocab_size"], seq=16)
    mg = megatron_logits(tmp_path / "c", tokens, tp=2)
    ref = hf_logits(hf, tokens)
    assert mg.dtype == torch.float32
    assert (mg - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


def _built_model(ckpt: str):
    from sage_megatron.parallel.convert import read_meta
    from sage_megatron.parallel.distributed import init_parallel
    from sage_megatron.parallel.layout import ParallelLayout
    from sage_megatron.parallel.model import build_gpt_model

    meta = read_meta(ckpt)
    init_parallel(ParallelLayout())
    model = build_gpt_model(meta.arch, layout=ParallelLayout(), padded_vocab=meta.padded_vocab, dtype=torch.bfloat16)
    return type(model).__name__, {str(p.dtype) for p in model.parameters()}


def test_missing_shard_is_named_before_any_rank_starts(converted, tmp_path):
    hf, ckpt = converted["qwen2"]
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    victim = sorted((broken / "dist").glob("*.distcp"))[0]
    victim.unlink()
    from sage_megatron.parallel.hf_io import CheckpointError

    with pytest.raises(CheckpointError, match=f"shard file\\(s\\) {victim.name} missing"):
        megatron_to_hf(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# megatron-core 0.16's Transformer Engine layer spec (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec):
# linear_qkv and linear_fc1 are TELayerNormColumnParallelLinear (state: weight, layer_norm_weight, _extra_state),
# linear_proj and linear_fc2 TERowParallelLinear (weight, _extra_state), q/k_layernorm TENorm (weight);
# TEDotProductAttention adds no key (its sharded_state_dict is empty without a learnable softmax offset).
TE_LAYER_KEYS = {
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv._extra_state", "self_attention.linear_proj.weight",
    "self_attention.linear_proj._extra_state", "mlp.linear_fc1.weight", "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1._extra_state", "mlp.linear_fc2.weight", "mlp.linear_fc2._extra_state",
}


def checkpoint_keys(dist_dir) -> set[str]:
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return set(load_tensors_metadata(str(dist_dir))) | {k.split("/shard_")[0] for k in load_sharded_metadata(str(dist_dir))}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_dist_checkpoints_carry_the_transformer_engine_spec_key_names(converted, family):
    """The converter (local spec) writes the keys a TE-spec model reads, so either spec loads the other's."""
    _, ckpt = converted[family]
    layer_keys = {k.removeprefix("decoder.layers.") for k in checkpoint_keys(ckpt / "dist") if k.startswith("decoder.layers.")}
    qk_norm = {"self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"} if family == "qwen3" else set()
    assert layer_keys == TE_LAYER_KEYS | qk_norm


def test_a_checkpoint_with_transformer_engine_extra_state_loads_into_the_local_spec(converted, tmp_path):
    """A TE-spec run's checkpoint holds FP8 metadata in every linear's _extra_state; the local spec ignores it
    and gets the same weights (resharded from tp=2 to tp=1 on the way)."""
    from sage_megatron.parallel.launch import run_distributed

    _, ckpt = converted["llama"]
    (same,) = run_distributed(_te_extra_state_round_trip, world_size=1, args=(str(ckpt), str(tmp_path / "te")))
    assert same == (True, 4 * 2)    # every parameter equal; 4 linears x 2 layers carried TE extra state


def _te_extra_state_round_trip(ckpt: str, te_dir: str):
    import io
    import os

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from sage_megatron.parallel.convert import read_meta
    from sage_megatron.parallel.distributed import init_parallel
    from sage_megatron.parallel.layout import ParallelLayout
    from sage_megatron.parallel.model import build_gpt_model
    from sage_megatron.parallel.shards import load_dist_checkpoint

    meta = read_meta(ckpt)
    init_parallel(ParallelLayout())
    model = build_gpt_model(meta.arch, layout=ParallelLayout(), padded_vocab=meta.padded_vocab)
    load_dist_checkpoint(model, os.path.join(ckpt, "dist"))
    state = model.sharded_state_dict()
    te_objects = 0
    for key, value in state.items():
        if isinstance(value, ShardedObject) and key.endswith("._extra_state"):
            value.data = io.BytesIO(b"TE FP8 scaling state")   # what TE's get_extra_state returns
            te_objects += 1
    os.makedirs(te_dir)
    dist_checkpointing.save(state, te_dir)
    fresh = build_gpt_model(meta.arch, layout=ParallelLayout(), padded_vocab=meta.padded_vocab)
    load_dist_checkpoint(fresh, te_dir)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    return same, te_objects
