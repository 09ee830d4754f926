"""Per-token log-probs with the vocabulary split over TP ranks (no full-vocabulary gather).

Max and sum-exp are all-reduced over the TP group, over the REAL vocabulary only: the rows the
checkpoint pads the vocabulary with (ids >= arch.vocab_size) are masked to -inf, so the numbers
equal HF's / vLLM's. Alignment as in ``actor/batch.py``.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist


def next_token_targets(tokens: torch.Tensor) -> torch.Tensor:
    """targets[:, s] = tokens[:, s + 1]: what the logits at position s predict. (B, T) -> (B, T).

    The last column has no next token; it repeats tokens[:, -1] (a valid id, result discarded).
    """
    return torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)


def align_to_tokens(per_position: torch.Tensor) -> torch.Tensor:
    """Shift a per-position value (column s: the prediction made AT s) to the predicted token's column.

    (B, T) -> (B, T): out[:, t] = per_position[:, t - 1] for t >= 1, out[:, 0] = 0.
    """
    return torch.cat([torch.zeros_like(per_position[:, :1]), per_position[:, :-1]], dim=1)


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, vocab_size: int,
                            with_entropy: bool | Literal["detached"] = False
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits)[target] over the real vocabulary, with the vocabulary split over TP ranks.

    logits: (B, S, V_local), this TP rank's slice [rank * V_local, (rank + 1) * V_local) of the
    padded vocabulary; targets: (B, S) global ids. Columns with global id >= ``vocab_size`` (the
    checkpoint's padding rows) are masked to -inf. Returns (logp (B, S), entropy (B, S) or None),
    identical on every TP rank, differentiable: max is detached (log-sum-exp is shift invariant) and
    every TP sum is a sum of purely local terms through megatron's reduce_from_tensor_model_parallel_region
    (all-reduce forward, identity backward: each rank's shard feeds only its own partial sum, and
    every rank computes the same function of the global sums). ``with_entropy="detached"``: the
    entropy for logging, from the same exponentials, outside the autograd graph (no second pass).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    v_local = logits.shape[-1]
    start = tp_rank * v_local
    z = logits.float()                                                                  # (B, S, Vl)
    real = (torch.arange(start, start + v_local, device=z.device) < vocab_size)         # (Vl,)
    z = z.masked_fill(~real, float("-inf"))
    with torch.no_grad():
        zmax = z.max(dim=-1).values                                                     # (B, S)
        if tp > 1:
            dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    shifted = z - zmax.unsqueeze(-1)                                  # (B, S, Vl), <= 0, -inf on padding
    exp_z = torch.exp(shifted)                                                          # (B, S, Vl), 0 on padding
    sum_exp = reduce_from_tensor_model_parallel_region(exp_z.sum(dim=-1).contiguous())  # S = sum_v e^z, (B, S)
    log_z = torch.log(sum_exp)
    local = (targets >= start) & (targets < start + v_local)                            # (B, S)
    idx = (targets - start).clamp(0, v_local - 1).unsqueeze(-1)
    picked = torch.gather(shifted, -1, idx).squeeze(-1)                                 # (B, S)
    picked = torch.where(local, picked, torch.zeros_like(picked))
    target_logit = reduce_from_tensor_model_parallel_region(picked.contiguous())
    logp = target_logit - log_z
    entropy = None
    if with_entropy:
        # H = log S - A / S with A = sum_v e^z z: both global sums of purely local terms, so the
        # identity backward of each reduce is exact (a per-rank sum of p = e^z / S would not be:
        # its dependence on the global S would only see this rank's share).
        with torch.set_grad_enabled(torch.is_grad_enabled() and with_entropy != "detached"):
            finite = torch.where(real, shifted, torch.zeros_like(shifted))
            a = reduce_from_tensor_model_parallel_region((exp_z * finite).sum(dim=-1).contiguous())
            entropy = log_z - a / sum_exp
    return logp, entropy
