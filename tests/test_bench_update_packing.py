"""bench/update_packing.py: the cheap, pure parts (the batch it times, the layouts, the round order).

The benchmark itself: `python bench/update_packing.py --json OUT` (SmolLM2-135M, about 15 minutes here).
"""
from __future__ import annotations

from sage_megatron.actor.batch import row_lengths


def test_batch_lengths_are_the_drawn_prompt_plus_response_and_every_row_trains(load_bench):
    bench = load_bench("update_packing")
    b = bench.make_batch(rows=64, prompt_len=(30, 80), max_response=128, vocab_size=1000, seed=0)
    b.validate(vocab_size=1000)
    prompts = (b.response_mask.cumsum(1) == 0).sum(1)          # columns before the first response token
    responses = b.response_mask.sum(1)
    assert int(prompts.min()) >= 30 and int(prompts.max()) <= 80
    assert int(responses.min()) >= 1 and int(responses.max()) <= 128
    assert row_lengths(b.response_mask) == (prompts + responses).long().tolist()
    assert len(set(row_lengths(b.response_mask))) > 30         # lengths vary: there is padding to remove
    assert set(b.advantages.tolist()) == {-1.0, 1.0}            # no zero advantage: nothing is skipped
    again = bench.make_batch(rows=64, prompt_len=(30, 80), max_response=128, vocab_size=1000, seed=0)
    assert (again.tokens == b.tokens).all()


def test_layouts_and_rotating_order(load_bench):
    bench = load_bench("update_packing")
    layouts = bench.layouts(8, 1024)
    assert layouts["unpacked"] == {"micro_batch_size": 8, "group_by_length": False}
    assert layouts["packed"] == {"micro_batch_size": 8}
    assert layouts["packed_budget"]["max_tokens_per_micro_batch"] == 1024
    names = list(layouts)
    firsts = [bench.rotation(names, k)[0] for k in range(3)]
    assert sorted(firsts) == sorted(names)                       # each layout goes first once in 3 rounds
