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
