"""Forward passes through megatron-core's pipeline schedule (any TP/PP)."""
from __future__ import annotations

import torch


def forward_logits(model, tokens: torch.Tensor, *, micro_batch_size: int | None = None,
                   vocab_size: int | None = None) -> torch.Tensor | None:
    """Full-vocabulary logits (B, T, V) for tokens (B, T).

    Returned on every rank of the last pipeline stage (TP-gathered, padding rows cut to
    ``vocab_size``); None on other stages.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from sage_megatron.parallel.device import compute_device, on_cpu_if_needed

    batch, seq = tokens.shape
    mbs = micro_batch_size or batch
    if batch % mbs:
        raise ValueError(f"batch {batch} is not divisible by micro_batch_size {mbs}")
    device = compute_device()
    micro = [tokens[i:i + mbs].to(device) for i in range(0, batch, mbs)]
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(mbs, seq)

    def forward_step(data_iter, model):
        tok = next(data_iter)
        out = model(tok, positions, attention_mask=None)

        def collect(output, non_loss_data=False):
            full = gather_from_tensor_model_parallel_region(output)  # (b, s, V_padded)
            return full[..., :vocab_size] if vocab_size else full

        return out, collect

    with torch.no_grad(), on_cpu_if_needed():
        collected = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
            num_microbatches=len(micro), seq_length=seq, micro_batch_size=mbs,
            forward_only=True, collect_non_loss_data=True,
        )
    if not ps.is_pipeline_last_stage():
        return None
    return torch.cat([c.float() for c in collected], dim=0)
