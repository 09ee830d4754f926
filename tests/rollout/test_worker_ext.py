"""How the worker extension decides to load weights in place (vllm_worker_ext.weights_load_in_place): only where
no layer computes from a packed copy of its weight. The modules below carry the two attributes vLLM-CPU's
``dispatch_cpu_unquantized_gemm`` leaves behind (an emptied ``weight``; a ``cpu_linear`` closing over the packed
copy); the end-to-end check against real engines is tests/rollout/test_rollout_pool.py's bf16 update test."""
from __future__ import annotations

import torch

from sage_megatron.rollout.vllm_worker_ext import weights_load_in_place


def _model(**layer_attrs) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    for name, value in layer_attrs.items():
        if name == "weight":
            model[1].weight = value
        else:
            setattr(model[1], name, value)
    return model


def test_plain_weights_load_in_place():
    assert weights_load_in_place(_model())
    assert weights_load_in_place(_model(cpu_linear=torch.nn.functional.linear))
    # vLLM's fallback: a lambda that computes from the weight it is given, closing over nothing
    assert weights_load_in_place(_model(cpu_linear=lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)))


def test_packed_weights_do_not_load_in_place():
    emptied = torch.nn.Parameter(torch.empty(0), requires_grad=False)   # oneDNN/sgl: remove_weight=True
    assert not weights_load_in_place(_model(weight=emptied))
    packed = torch.randn(4, 4)                                          # an lm_head that keeps its weight
    assert not weights_load_in_place(_model(cpu_linear=lambda x, weight, bias: x @ packed.t()))
