"""bench/cpu_bf16.py: its pure parts (agreement figures, column placement, order, the batch it times).

The benchmark itself: `python bench/cpu_bf16.py --json OUT` (SmolLM2-135M; on a CPU without bf16
instructions the reduced `--rows 4 --repeats 1 --rounds 1` took 12 minutes, the default size over an hour).
"""
from __future__ import annotations

import pytest
import torch

from sage_megatron.actor.batch import row_lengths


def test_agreement_counts_response_tokens_only(load_bench):
    bench = load_bench("cpu_bf16")
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float32)
    ref = torch.zeros(2, 5)
    logp = torch.tensor([[9.0, 9.0, 0.5, -0.25, 9.0],        # 9s: prompt and padding, not counted
                         [9.0, 0.1, 0.1, 0.1, -0.3]])
    g = bench.agreement(logp, ref, mask)
    assert g["max_abs_token"] == pytest.approx(0.5)
    assert g["mean_abs_token"] == pytest.approx((0.5 + 0.25 + 0.1 * 3 + 0.3) / 6)
    assert g["max_abs_sequence"] == pytest.approx(0.25)          # row 0: 0.5 - 0.25; row 1: 0.3 - 0.3 = 0
    assert g["mean_abs_sequence"] == pytest.approx(0.125, abs=1e-7)     # 0.1 as float32


def test_engine_logprobs_land_on_the_actor_columns(load_bench):
    bench = load_bench("cpu_bf16")
    cols = bench.engine_logprobs_as_columns([[-1.0, -2.0], [-3.0, -4.0, -5.0]], (2, 5))
    # vLLM's list starts at position 1 (log p(x_1 | x_0)); the actor's column t holds log p(x_t | x_<t)
    assert cols.tolist() == [[0.0, -1.0, -2.0, 0.0, 0.0], [0.0, -3.0, -4.0, -5.0, 0.0]]


def test_order_alternates_between_rounds(load_bench):
    bench = load_bench("cpu_bf16")
    assert [bench.rotation(list(bench.DTYPES), r)[0] for r in range(2)] == ["float32", "bfloat16"]


def test_batch_is_arith_prompts_answered_by_their_reference(load_bench, tiny_hf_factory):
    from transformers import AutoTokenizer

    from sage_megatron.tasks.arith_data import make_rows

    bench = load_bench("cpu_bf16")
    tok = AutoTokenizer.from_pretrained(tiny_hf_factory("llama"))
    batch, prompts = bench.make_batch(tok, rows=6)
    batch.validate()
    rows = make_rows(6)
    for i, (row, prompt, end) in enumerate(zip(rows, prompts, row_lengths(batch.response_mask))):
        assert batch.tokens[i, :len(prompt)].tolist() == prompt
        assert int(batch.response_mask[i, :len(prompt)].sum()) == 0                  # the prompt is not scored
        response = batch.tokens[i, len(prompt):end].tolist()
        assert response[-1] == tok.eos_token_id and int(batch.response_mask[i].sum()) == len(response)
        text = tok.decode(response[:-1])
        assert row["problem"].split(".")[0] in tok.decode(prompt)
        assert text.replace(" ", "").endswith(f"Theansweris{row['answer']}.")
    assert batch.advantages.tolist() == [1.0, -1.0] * 3


def test_summary_ratios_and_table(load_bench, capsys):
    bench = load_bench("cpu_bf16")
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    actor = {"logp": {"float32": torch.tensor([[0.0, -1.0, -2.0]]), "bfloat16": torch.tensor([[0.0, -1.5, -2.0]])},
             "seconds": {"float32": {"forward": [1.0, 3.0], "train_step": [4.0, 6.0]},
                         "bfloat16": {"forward": [8.0, 8.0], "train_step": [20.0, 30.0]}},
             "first_step": {d: {"loss": 0.1, "grad_norm": 2.0} for d in bench.DTYPES}}
    engines = {"float32": {"tokens_per_s": [100.0, 300.0], "startup_s": [40.0], "prompt_logprobs": [[-1.0, -2.0]]},
               "bfloat16": {"tokens_per_s": [50.0], "startup_s": [45.0], "prompt_logprobs": [[-1.0, -2.25]]}}
    batch = bench.TrainBatch(tokens=torch.zeros(1, 3, dtype=torch.long), response_mask=mask,
                             advantages=torch.ones(1), old_logp=None)
    res = bench.summarise(actor, engines, batch)
    assert res["actor"]["forward_speedup_bf16"] == pytest.approx(2.0 / 8.0)      # medians: fp32 / bf16 seconds
    assert res["actor"]["train_step_speedup_bf16"] == pytest.approx(5.0 / 25.0)
    assert res["engine"]["decode_speedup_bf16"] == pytest.approx(50.0 / 200.0)   # bf16 / fp32 tokens per second
    assert res["actor"]["bf16_vs_fp32_logprobs"]["max_abs_token"] == pytest.approx(0.5)
    assert res["engine"]["float32"]["vs_fp32_actor_logprobs"]["max_abs_token"] == 0.0
    assert res["engine"]["bfloat16"]["vs_fp32_actor_logprobs"]["max_abs_sequence"] == pytest.approx(0.25)
    bench.print_table(res)
    out = capsys.readouterr().out
    assert "actor train_step s" in out and "0.20x" in out and "engine bfloat16" in out
