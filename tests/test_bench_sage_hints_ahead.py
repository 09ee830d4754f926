"""bench/sage_hints_ahead.py's token count: what each side asks of the engine, counted per engine call."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sage_hints_ahead import TokenCountingSampler  # noqa: E402
from sage_megatron.types import RolloutRequest, Sample, SamplingConfig  # noqa: E402


class LengthSampler:
    """Answers request uid "u<L>" with n samples of L response tokens, in one call per batch list."""

    def __init__(self) -> None:
        self.calls = 0

    def generate_batches(self, batches):
        self.calls += 1
        out = {}
        for requests, sampling in batches:
            for r in requests:
                length = int(r.uid[1:])
                out[r.uid] = [Sample(uid=r.uid, prompt_ids=r.prompt_ids, response_ids=[5] * length,
                                     logprobs=[-0.1] * length, finish_reason="stop", weight_version=0,
                                     text="", sample_index=i) for i in range(sampling.n)]
        return out


def request(uid):
    return RolloutRequest(uid=uid, prompt_ids=(1, 2, 3))


def test_counts_every_sample_of_every_batch_and_each_call_once():
    inner = LengthSampler()
    sampler = TokenCountingSampler(inner)
    sampler.generate([request("u3"), request("u5")], SamplingConfig(n=2))               # 2 x (3 + 5)
    sampler.generate_batches([([request("u7")], SamplingConfig(n=4)),                   # 4 x 7
                              ([request("u11")], SamplingConfig(n=1))])                 # 11, same call
    assert (sampler.calls, inner.calls) == (2, 2)
    assert sampler.tokens == 2 * (3 + 5) + 4 * 7 + 11

