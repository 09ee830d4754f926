"""The performance model's formulas against numbers computed by hand (and published parameter counts)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sage_megatron.perf.catalogue import CPU_THIS_MACHINE, H100_SXM, MODELS, ModelSpec
from sage_megatron.perf.formulas import (
    CPU_FITTED_EFFICIENCY, DEFAULT_FIT_PARAMS, FitRun, efficiency_source, fit_efficiency, leave_one_out,
    predict_metrics,
    Efficiency, Layout, Workload, allgather_time, allreduce_time,
    EULER_GAMMA, alive_sum, alive_sum_uniform, best_layout, compare_published, decode_steps, forward_flops,
    kv_sum, kv_sum_uniform, logprob_time, peak_live_context, predict_table, rollout_time, step_time, train_flops, train_memory_per_device,
    train_time, weight_sync_time,
)

NO_COMM = Efficiency(dp_overlap=1.0, tp_overlap=1.0, step_overhead_s=0.0, colocated_swap=False)


def test_h100_constants():
    assert H100_SXM.peak_flops == 989e12 and H100_SXM.peak_flops_fp8 == 1979e12
    assert H100_SXM.hbm_bw == 3.35e12
    assert H100_SXM.intra_bw == 450e9                      # 900 GB/s NVLink, per direction
    assert H100_SXM.inter_bw == 50e9                       # 400 Gb/s per GPU = 50 GB/s


def test_param_counts_match_published_sizes():
    # Llama-3.1-8B by hand: per layer 4096*4096*2 (q, o) + 2*4096*1024 (k, v) + 3*4096*14336 + 2*4096
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert MODELS["llama3.1-8b"].params == 32 * per_layer + 2 * 128256 * 4096 + 4096 == 8_030_261_248
    # published: Qwen2.5-7B 7.61B (7.62B with biases), Qwen2.5-32B 32.8B, Llama-3.1-70B 70.6B
    assert MODELS["7b"].params / 1e9 == pytest.approx(7.61, abs=0.01)
    assert MODELS["32b"].params / 1e9 == pytest.approx(32.76, abs=0.01)
    assert MODELS["70b"].params / 1e9 == pytest.approx(70.55, abs=0.01)


def test_kv_bytes_per_token():
    # 2 (K, V) * layers * kv_heads * head_dim * 2 bytes
    assert MODELS["llama3.1-8b"].kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 131072
    assert MODELS["7b"].kv_bytes_per_token() == 2 * 28 * 4 * 128 * 2 == 57344
    assert MODELS["qwen3-32b"].hd == 128  # head_dim set independently of hidden/heads


def test_train_flops():
    m = ModelSpec("t", layers=2, hidden=8, ffn=16, heads=2, kv_heads=1, vocab=10)
    # params: per layer 8*8 + 2*8*4 + 8*8 + 3*8*16 + 2*8 = 64+64+64+384+16 = 592; *2 + 2*10*8 + 8 = 1352
    assert m.params == 1352
    assert train_flops(m, tokens=100, seq_len=50, include_attention=False) == 6 * 1352 * 100
    assert train_flops(m, tokens=100, seq_len=50) == 6 * 1352 * 100 + 12 * 2 * 8 * 50 * 100
    assert forward_flops(m, tokens=100, seq_len=50) == pytest.approx(train_flops(m, tokens=100, seq_len=50) / 3)


def test_collective_formulas():
    assert allreduce_time(1e9, ranks=8, bw=100e9) == pytest.approx(2 * 7 / 8 * 1e9 / 100e9)  # 17.5 ms
    assert allreduce_time(1e9, ranks=1, bw=100e9) == 0.0
    assert allreduce_time(1e9, ranks=4, bw=100e9, latency=1e-3) == pytest.approx(2 * 3 / 4 * 0.01 + 6e-3)
    assert allgather_time(8e9, ranks=8, bw=100e9) == pytest.approx(7 / 8 * 0.08)


def test_layout_dp_and_errors():
    assert Layout(nodes=2, tp=4, pp=2).dp == 2
    with pytest.raises(ValueError, match="not divisible"):
        Layout(nodes=1, tp=3).dp
    assert Layout(nodes=2, rollout_tp=4).engines == 4


def test_train_time_compute_term_single_node():
    m, w = MODELS["7b"], Workload()
    lay = Layout(nodes=1, tp=1, pp=1)
    t = train_time(m, lay, w, H100_SXM, NO_COMM)
    F = 6 * m.params * w.tokens + 12 * m.layers * m.heads * m.hd * w.seq_len * w.tokens
    assert t.compute == pytest.approx(F / (8 * 989e12 * 0.55))
    assert t.tp_comm == t.pp_comm == t.pp_bubble == t.dp_comm == 0.0
    # optimizer: 2 steps * 16 B/param over 8 dp shards at 0.7 * 3.35 TB/s
    assert t.optimizer == pytest.approx(2 * 16 * m.params / 8 / (3.35e12 * 0.7))
    assert t.mfu == pytest.approx(0.55 * t.compute / t.total)


def test_train_time_dp_allreduce_crosses_nodes():
    m, w = MODELS["7b"], Workload()
    eff = Efficiency(dp_overlap=0.0)
    one = train_time(m, Layout(nodes=1), w, H100_SXM, eff)
    two = train_time(m, Layout(nodes=2), w, H100_SXM, eff)
    grad = m.params * 2  # bf16 gradients of the whole model (tp = pp = 1)
    assert one.dp_comm == pytest.approx(2 * allreduce_time(grad, ranks=8, bw=450e9 * 0.8, latency=3e-6))
    assert two.dp_comm == pytest.approx(2 * allreduce_time(grad, ranks=16, bw=50e9 * 0.9, latency=10e-6))


def test_tp_comm_and_pp_bubble():
    m, w = MODELS["32b"], Workload()
    lay = Layout(nodes=2, tp=4, pp=2)  # dp = 2
    t = train_time(m, lay, w, H100_SXM, Efficiency())
    tokens_per_rank = w.tokens / 2
    n_ar = 4 * m.layers / 2
    micro = tokens_per_rank / w.micro_batch_tokens
    tp_expected = n_ar * (2 * 3 / 4 * tokens_per_rank * m.hidden * 2 / (450e9 * 0.8) + micro * 2 * 3 * 3e-6)
    assert t.tp_comm == pytest.approx(tp_expected)
    m_pipe = w.tokens / (w.optimizer_steps * 2 * w.micro_batch_tokens)
    assert t.pp_bubble == pytest.approx(t.compute * 1 / m_pipe)
    # a stage holds tp*dp = 8 GPUs = one node: the pipeline hop crosses nodes (NIC)
    assert t.pp_comm == pytest.approx(tokens_per_rank * m.hidden * 2 * 2 / (50e9 * 0.9) + 2 * micro * 10e-6)


def test_logprob_is_a_third_of_compute_when_no_comm():
    m, w = MODELS["7b"], Workload(logprob_passes=2)
    lay = Layout(nodes=1)
    t = train_time(m, lay, w, H100_SXM, NO_COMM)
    assert logprob_time(m, lay, w, H100_SXM, NO_COMM) == pytest.approx(2 * t.compute / 3)


def test_memory_per_device():
    m = MODELS["7b"]
    lay = Layout(nodes=1, tp=2, pp=1)  # dp 4
    assert train_memory_per_device(m, lay) == pytest.approx(m.params / 2 * 6 + 12 * m.params / 2 / 4)


def test_length_distribution_integrals():
    # uncapped: P*m + 2/3 m^2 and m
    assert kv_sum_uniform(prompt=100, mean=1000, cap=10**9) == pytest.approx(100 * 1000 + 2 / 3 * 1000 ** 2)
    assert alive_sum_uniform(mean=1000, cap=10**9) == pytest.approx(1000)
    # capped: numeric sum agrees with the closed form
    P, mean, cap = 100, 1000, 1500
    num = sum((1 - (t + 0.5) / (2 * mean)) * (P + t + 0.5) for t in range(cap))
    assert kv_sum_uniform(prompt=P, mean=mean, cap=cap) == pytest.approx(num, rel=1e-6)
    # peak live context (m + P/2)^2 / (2m)
    assert peak_live_context(dist="uniform", prompt=300, mean=2000, S=4000) == pytest.approx(2150 ** 2 / 4000)


def test_exponential_lengths():
    m, P, S = 1000.0, 100.0, 3000.0
    # numeric integrals of exp(-t/m) and exp(-t/m) (P + t) on [0, S] (midpoint rule)
    alive = sum(math.exp(-(t + 0.5) / m) for t in range(int(S)))
    kv = sum(math.exp(-(t + 0.5) / m) * (P + t + 0.5) for t in range(int(S)))
    assert alive_sum(dist="exponential", mean=m, S=S) == pytest.approx(alive, rel=1e-4)
    assert kv_sum(dist="exponential", prompt=P, mean=m, S=S) == pytest.approx(kv, rel=1e-4)
    # longest of n exponentials ~ m * (ln n + gamma), capped
    assert decode_steps(dist="exponential", mean=m, cap=10**9, n=1024) == pytest.approx(m * (math.log(1024) + EULER_GAMMA))
    assert decode_steps(dist="exponential", mean=m, cap=4096, n=1024) == 4096
    assert decode_steps(dist="uniform", mean=m, cap=4096, n=1024) == 2000
    # peak of (P + t) exp(-t/m) at t = m - P: m * exp(P/m - 1)
    assert peak_live_context(dist="exponential", prompt=P, mean=m, S=S) == pytest.approx(m * math.exp(P / m - 1))
    with pytest.raises(ValueError, match="length distribution"):
        decode_steps(dist="lognormal", mean=m, cap=10, n=1)


def test_rollout_decode_is_memory_bound_by_hand():
    m = MODELS["7b"]
    w = Workload(prompts=64, samples=2, prompt_tokens=100, response_tokens=500, max_response_tokens=4096,
                 length_dist="uniform")
    lay = Layout(nodes=1, rollout_tp=1)  # 8 engines, 16 sequences each
    eff = Efficiency(decode_step_overhead_s=0.0)
    r = rollout_time(m, lay, w, H100_SXM, eff)
    W = m.params * 2
    S = 1000  # 2 * mean < cap
    kv_bytes = 16 * m.kv_bytes_per_token() * (100 * 500 + 2 / 3 * 500 ** 2)
    decode = (S * W + kv_bytes) / (3.35e12 * 0.7)
    prefill = 2 * m.params * 16 * 100 / (989e12 * 0.5)
    assert (r.waves, r.seqs_per_engine, r.decode_steps) == (1, 16, S)
    assert r.decode == pytest.approx(decode)
    assert r.prefill == pytest.approx(prefill)
    assert r.total == pytest.approx(decode + prefill)


def test_rollout_waves_when_kv_does_not_fit():
    m = MODELS["7b"]
    w = Workload(prompts=4096, samples=8, prompt_tokens=1000, response_tokens=8000, max_response_tokens=16000)
    r = rollout_time(m, Layout(nodes=1), w, H100_SXM)
    free = 80e9 * 0.85 - m.params * 2
    S = decode_steps(dist="exponential", mean=8000, cap=16000, n=4096 * 8)
    assert S == 16000
    cap = math.floor(free / (peak_live_context(dist="exponential", prompt=1000, mean=8000, S=S)
                             * m.kv_bytes_per_token()))
    assert r.waves == math.ceil(4096 * 8 / 8 / cap) > 1


def test_rollout_rejects_weights_that_do_not_fit():
    with pytest.raises(ValueError, match="raise rollout_tp"):
        rollout_time(MODELS["70b"], Layout(nodes=1, rollout_tp=1), Workload(), H100_SXM)


def test_weight_sync_colocated_by_hand():
    m = MODELS["7b"]
    eff = Efficiency(colocated_swap=False)
    s = weight_sync_time(m, Layout(nodes=1, tp=1, pp=1, rollout_tp=1), H100_SXM, eff, bucket_bytes=1e9)
    W = m.params * 2
    hbm = 3.35e12 * 0.7
    buckets = math.ceil(W / 1e9)  # 16
    assert (s.tp_gather, s.pp_exchange) == (0.0, 0.0)
    assert s.transfer == s.engine_load == pytest.approx(W / hbm)
    # pipelined: max(stage) + rest / buckets + latency
    expect = W / hbm + (W / hbm) / buckets + buckets * 5e-3 + m.tensors * 5e-3
    assert s.total == pytest.approx(expect)
    assert m.tensors == 9 * 28 + 3


def test_weight_sync_gathers_and_swap():
    m = MODELS["70b"]
    lay = Layout(nodes=4, tp=8, pp=2, rollout_tp=8)  # dp 2; a stage = 16 GPUs = 2 nodes
    s = weight_sync_time(m, lay, H100_SXM, Efficiency())
    W = m.params * 2
    assert s.tp_gather == pytest.approx(7 / 8 * (W / 2) / (450e9 * 0.8))
    assert s.pp_exchange == pytest.approx(1 / 2 * W / 8 / (50e9 * 0.9))
    assert s.swap == pytest.approx((train_memory_per_device(m, lay) + W / 8) / 25e9)
    unpiped = weight_sync_time(m, lay, H100_SXM, Efficiency(), pipelined=False)
    assert unpiped.total > s.total


def test_weight_sync_disaggregated_uses_the_network():
    m = MODELS["llama3.1-8b"]
    s = weight_sync_time(m, Layout(nodes=1, colocated=False, rollout_nodes=1), H100_SXM)
    assert s.transfer == pytest.approx(m.params * 2 / (50e9 * 0.9)) and s.swap == 0.0


def test_step_time_adds_the_phases_and_hints():
    m, w = MODELS["7b"], Workload(hint_fraction=0.25, hint_levels=2)
    lay = Layout(nodes=2)
    p = step_time(m, lay, w)
    assert p.step == pytest.approx(p.rollout + p.hint + p.logprob + p.update + p.weight_sync + p.overhead)
    hint_only = rollout_time(m, lay, w, H100_SXM, sequences=w.sequences * 0.25).total
    assert p.hint == pytest.approx(2 * hint_only)
    assert set(p.as_metrics()) == {"time/rollout", "time/hint", "time/logprob", "time/update",
                                   "time/weight_sync", "time/step"}


def test_fp8_speeds_up_compute():
    m, lay = MODELS["7b"], Layout(nodes=1)
    bf16 = train_time(m, lay, Workload(), H100_SXM)
    fp8 = train_time(m, lay, Workload(fp8=True), H100_SXM)
    assert fp8.compute == pytest.approx(bf16.compute / 2, rel=1e-3)


def test_best_layout_respects_memory():
    w = Workload()
    assert best_layout(MODELS["70b"], 1, w) is None
    lay = best_layout(MODELS["70b"], 8, w)
    assert lay is not None and train_memory_per_device(MODELS["70b"], lay) <= 0.8 * 80e9
    rows = predict_table(["7b"], [1, 2], w)
    assert [r["nodes"] for r in rows] == [1, 2] and rows[1]["time/update"] < rows[0]["time/update"]


def test_more_nodes_never_slower_to_update_for_7b():
    w = Workload()
    times = [train_time(MODELS["7b"], Layout(nodes=n), w, H100_SXM).total for n in (1, 2, 4, 8, 16)]
    assert times == sorted(times, reverse=True)


def test_published_comparison_rows_cite_a_source():
    rows = compare_published()
    assert len(rows) >= 8
    for r in rows:
        assert r["source"] and r["published"] > 0 and r["predicted"] > 0 and math.isfinite(r["predicted"])


def test_efficiency_is_a_frozen_dataclass():
    e = Efficiency()
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.compute = 1.0  # type: ignore[misc]


def test_rollout_devices_per_node_for_disaggregated_engines():
    # training nodes of 2 ranks, 3 rollout nodes of one single-device engine each
    lay = Layout(nodes=2, devices_per_node=2, colocated=False, rollout_nodes=3, rollout_devices_per_node=1)
    assert (lay.dp, lay.rollout_devices, lay.engines) == (4, 3, 3)
    assert Layout(nodes=1, devices_per_node=2, colocated=False, rollout_nodes=3).engines == 6   # 0: as training


def test_cpu_fitted_efficiency_has_no_gpu_swap():
    assert isinstance(CPU_FITTED_EFFICIENCY, Efficiency) and CPU_FITTED_EFFICIENCY.colocated_swap is False


# ----------------------------------------------------------------------------------------------
# fitting: synthetic measurements made by step_time with a known Efficiency ("truth"), fitted from a
# different one ("base")


def _cpu_runs(truth: Efficiency) -> list[FitRun]:
    """Trainer-like CPU runs (1-2 nodes, weak and strong, one rank and one engine per node), measured = truth."""
    runs = []
    for nodes, prompts in ((1, 4), (2, 8), (2, 4)):
        lay = Layout(nodes=nodes, devices_per_node=1, rollout_tp=1, colocated=False, rollout_nodes=nodes,
                     rollout_devices_per_node=1)
        work = Workload(prompts=prompts, samples=4, prompt_tokens=80, response_tokens=6, max_response_tokens=12,
                        length_dist="uniform", hint_fraction=0.5, hint_levels=2)
        run = FitRun({}, MODELS["tiny"], lay, work, CPU_THIS_MACHINE, f"n{nodes}-b{prompts}")
        runs.append(dataclasses.replace(run, measured=predict_metrics(run, truth)))
    return runs


TRUTH = dataclasses.replace(CPU_FITTED_EFFICIENCY, compute=0.07, decode_step_overhead_s=0.04,
                            sync_tensor_overhead_s=0.02, step_overhead_s=0.6)
BASE = dataclasses.replace(Efficiency(), colocated_swap=False)   # today's defaults


def test_fit_recovers_the_constants_that_made_the_measurements():
    runs = _cpu_runs(TRUTH)
    assert predict_metrics(runs[0], BASE)["time/step"] < 0.5 * runs[0].measured["time/step"]   # far off before
    eff, report = fit_efficiency(runs, BASE)
    for p in DEFAULT_FIT_PARAMS:
        assert getattr(eff, p) == pytest.approx(getattr(TRUTH, p), rel=1e-6), p
        assert report["status"][p] == "fitted" and report["base"][p] == getattr(BASE, p)
    assert eff.hbm == BASE.hbm and eff.colocated_swap is False   # not fitted: unchanged
    assert report["converged"] and report["rms_rel_error_after"] < 1e-6 < report["rms_rel_error_before"]
    assert {r["row"] for r in report["rows"]} == {"update+logprob", "rollout+hint", "weight_sync", "other"}
    assert all(r["ratio_after"] == pytest.approx(1.0, rel=1e-6) for r in report["rows"])
    # the honest error: each run predicted by a fit on the other two
    loo = leave_one_out(runs, BASE)
    assert [e["run"] for e in loo] == [r.label for r in runs]
    assert all(e["ratio"] == pytest.approx(1.0, rel=1e-6) for e in loo)
    # the paste line: the fields that differ from the defaults, 4 significant digits
    assert efficiency_source(eff) == ("CPU_FITTED_EFFICIENCY = Efficiency(compute=0.07, decode_step_overhead_s=0.04, "
                                      "sync_tensor_overhead_s=0.02, step_overhead_s=0.6, colocated_swap=False)")


def test_fit_with_noisy_measurements_stays_close():
    runs = _cpu_runs(TRUTH)
    noisy = []
    for i, r in enumerate(runs):
        m = dict(r.measured)
        for j, k in enumerate(("time/update", "time/logprob", "time/rollout", "time/hint", "time/weight_sync",
                               "time/other")):
            m[k] *= 1.0 + 0.05 * (-1) ** (i + j)        # +-5 %
        noisy.append(dataclasses.replace(r, measured=m))
    eff, report = fit_efficiency(noisy, BASE)
    for p in DEFAULT_FIT_PARAMS:
        assert getattr(eff, p) == pytest.approx(getattr(TRUTH, p), rel=0.1), p
    assert report["rms_rel_error_after"] < 0.06


def test_fit_hbm_and_decode_overhead_apart_when_the_runs_differ():
    """hbm and the per-iteration cost both set the rollout; runs with different model sizes and response
    lengths separate them (GPU-like runs on H100 peaks)."""
    truth = dataclasses.replace(Efficiency(), compute=0.4, hbm=0.5, decode_step_overhead_s=3e-3,
                                sync_tensor_overhead_s=8e-3, step_overhead_s=5.0)
    runs = []
    for key, resp in (("7b", 500), ("7b", 2000), ("32b", 1000), ("llama3.1-8b", 3000)):
        lay = Layout(nodes=2, tp=2 if key == "32b" else 1, rollout_tp=4 if key == "32b" else 1)
        run = FitRun({}, MODELS[key], lay, Workload(prompts=64, response_tokens=resp), H100_SXM, f"{key}-{resp}")
        runs.append(dataclasses.replace(run, measured=predict_metrics(run, truth)))
    params = ("compute", "decode_step_overhead_s", "sync_tensor_overhead_s", "step_overhead_s", "hbm")
    eff, report = fit_efficiency(runs, Efficiency(), params=params)
    for p in params:
        assert report["status"][p] == "fitted"
        assert getattr(eff, p) == pytest.approx(getattr(truth, p), rel=1e-4), p


def test_fit_keeps_what_the_runs_cannot_identify():
    runs = _cpu_runs(TRUTH)
    # no weight_sync measured: sync_tensor_overhead_s is left alone
    no_sync = [dataclasses.replace(r, measured={k: v for k, v in r.measured.items() if k != "time/weight_sync"})
               for r in runs]
    eff, report = fit_efficiency(no_sync, BASE)
    assert report["status"]["sync_tensor_overhead_s"].startswith("kept: no measured row")
    assert eff.sync_tensor_overhead_s == BASE.sync_tensor_overhead_s
    assert eff.compute == pytest.approx(TRUTH.compute, rel=1e-6)
    # a sync measured faster than the model's bandwidth terms alone: no positive overhead explains it
    fast = [dataclasses.replace(r, measured={**r.measured, "time/weight_sync": 1e-9}) for r in runs]
    eff, report = fit_efficiency(fast, BASE)
    assert report["status"]["sync_tensor_overhead_s"].startswith("kept: the fit drove it to <= 0")
    assert eff.sync_tensor_overhead_s == BASE.sync_tensor_overhead_s
    # one measured (memory-bound) rollout cannot tell hbm from the per-iteration cost: the first listed is fitted
    gpu = FitRun({}, MODELS["7b"], Layout(nodes=1), Workload(), H100_SXM)
    slow = 1.3 * predict_metrics(gpu, BASE)["time/rollout"]
    only_rollout = dataclasses.replace(gpu, measured={"time/rollout": slow})
    eff, report = fit_efficiency([only_rollout], BASE, params=("decode_step_overhead_s", "hbm"))
    assert report["status"] == {"decode_step_overhead_s": "fitted",
                                "hbm": "kept: not separable from decode_step_overhead_s with these runs"}
    assert eff.hbm == BASE.hbm and predict_metrics(only_rollout, eff)["time/rollout"] == pytest.approx(
        only_rollout.measured["time/rollout"], rel=1e-9)


def test_fit_refuses_empty_input():
    with pytest.raises(ValueError, match="no runs given"):
        fit_efficiency([], BASE)
    run = _cpu_runs(TRUTH)[0]
    with pytest.raises(ValueError, match="none of the runs has a measured time"):
        fit_efficiency([dataclasses.replace(run, measured={})], BASE)
    with pytest.raises(ValueError, match="cannot fit"):
        fit_efficiency([run], BASE, params=("gpu_memory_utilization",))
    assert leave_one_out([run], BASE) == []
