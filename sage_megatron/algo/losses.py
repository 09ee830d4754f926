"""Policy-gradient losses as pure torch functions on (B, T) response-token tensors.

B = responses in the micro-batch, T = padded response length; ``mask`` (B, T) is 1 on response
tokens that count and 0 on padding. Log-probs are of the sampled tokens, (B, T).

* ``policy_loss``: PPO clipped surrogate with asymmetric clip (DAPO: 1 - 0.2 .. 1 + 0.28) and
  dual clip c = 3.0 for negative advantages, exactly as verl's ``compute_policy_loss_vanilla``
  (log-ratio clamped to [-20, 20] before exp).
* ``is_corrected_policy_loss``: the "original prompt + importance-sampling correction" context
  (Guide-GRPO) for hinted groups trained as if the hint were absent (see its docstring).
* ``kl_penalty`` k1 / k2 / k3 ("low_var_kl", clamped to [-10, 10] as verl) and ``kl_loss``.
* ``entropy_from_logits``; ``aggregate`` ("token-mean" default, "seq-mean-token-mean",
  "seq-mean-token-sum"). For a token mean over a whole mini-batch split into micro-batches (and
  data-parallel ranks), pass ``num_tokens`` = the mini-batch's token count to every micro-batch so the
  summed gradients equal the mini-batch token mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
KLKind = Literal["k1", "kl", "k2", "mse", "k3", "low_var_kl"]

CLIP_LOW = 0.2
CLIP_HIGH = 0.28
CLIP_C = 3.0


@dataclass
class PolicyLossOut:
    """Loss and metrics of one call (all 0-dim tensors; only ``loss`` carries gradient)."""

    loss: torch.Tensor
    clip_frac: torch.Tensor        # share of tokens where the (low/high) clip was active
    clip_frac_lower: torch.Tensor  # share of tokens where the dual clip (A < 0, ratio > c) was active
    ppo_kl: torch.Tensor           # token mean of old_logp - logp (approximate KL(old || new))
    ratio_mean: torch.Tensor       # token mean of the importance ratio


def masked_mean(x: torch.Tensor, mask: torch.Tensor, *, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1; 0 where the mask is empty.

    x, mask: (B, T). dim None -> 0-dim; dim=-1 -> (B,).
    """
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim=dim) / m.sum(dim=dim).clamp(min=1)


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, *, mode: AggMode = "token-mean",
              num_tokens: float | None = None, num_seqs: float | None = None) -> torch.Tensor:
    """A per-token loss (B, T) reduced to a scalar.

    token-mean:           sum(loss * mask) / N_tokens     (N_tokens = num_tokens or mask.sum())
    seq-mean-token-mean:  mean over sequences of each sequence's token mean (divided by num_seqs
                          or B; a sequence with no tokens contributes 0)
    seq-mean-token-sum:   mean over sequences of each sequence's token sum
    """
    m = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        denom = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=loss_mat.dtype)
        return (loss_mat * m).sum() / denom.clamp(min=1)
    seqs = float(loss_mat.shape[0]) if num_seqs is None else float(num_seqs)
    if mode == "seq-mean-token-mean":
        per_seq = (loss_mat * m).sum(-1) / m.sum(-1).clamp(min=1)   # (B,)
        return per_seq.sum() / max(seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return (loss_mat * m).sum(-1).sum() / max(seqs, 1.0)
    raise ValueError(f"loss aggregation must be token-mean, seq-mean-token-mean or seq-mean-token-sum, got {mode!r}")


def policy_loss(*, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_low: float = CLIP_LOW, clip_high: float = CLIP_HIGH,
                clip_c: float | None = CLIP_C, agg: AggMode = "token-mean",
                num_tokens: float | None = None, num_seqs: float | None = None) -> PolicyLossOut:
    """PPO clipped surrogate, asymmetric clip, dual clip on negative advantages (verl's rule).

    logp, old_logp, mask: (B, T); advantages: (B, T) or (B,) (broadcast over tokens).
    Per token, with r = exp(clamp(logp - old_logp, -20, 20)):
        l1 = -A r,  l2 = -A clip(r, 1 - clip_low, 1 + clip_high),  l = max(l1, l2)
        if A < 0 and clip_c is not None:  l = min(l, -A clip_c)      (dual clip)
    then aggregated with ``agg``. clip_frac counts tokens with l2 > l1; clip_frac_lower tokens with
    A < 0 and max(l1, l2) > -A clip_c.
    """
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"dual-clip c must be > 1.0, got {clip_c}")
    adv = advantages[:, None] if advantages.dim() == 1 else advantages                # (B, T) or (B, 1)
    log_ratio = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(l1, l2)
    if clip_c is not None:
        l3 = -adv * clip_c
        lower = (clipped > l3) & (adv < 0)
        per_token = torch.where(adv < 0, torch.minimum(clipped, l3), clipped)
    else:
        lower = torch.zeros_like(clipped, dtype=torch.bool)
        per_token = clipped
    with torch.no_grad():
        clip_frac = masked_mean((l2 > l1).to(logp.dtype), mask)
        clip_frac_lower = masked_mean(lower.to(logp.dtype), mask)
        ppo_kl = masked_mean(-log_ratio, mask)
        ratio_mean = masked_mean(ratio, mask)
    loss = aggregate(per_token, mask, mode=agg, num_tokens=num_tokens, num_seqs=num_seqs)
    return PolicyLossOut(loss=loss, clip_frac=clip_frac, clip_frac_lower=clip_frac_lower,
                         ppo_kl=ppo_kl, ratio_mean=ratio_mean)


def is_corrected_policy_loss(*, logp_original: torch.Tensor, behavior_logp_hinted: torch.Tensor,
                             advantages: torch.Tensor, mask: torch.Tensor, clip_low: float = CLIP_LOW,
                             clip_high: float = CLIP_HIGH, clip_c: float | None = CLIP_C,
                             agg: AggMode = "token-mean", num_tokens: float | None = None,
                             num_seqs: float | None = None) -> PolicyLossOut:
    """Loss context "original" (Guide-GRPO): train log pi(y | x) on responses sampled from pi_old(y | x, h).

    What we implement, per response token t of a hinted group's response y:
        r_t = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, h, y_<t)
            = exp(logp_original - behavior_logp_hinted)
    i.e. the numerator is the CURRENT policy on the ORIGINAL prompt x (no hint), the denominator the
    OLD (behaviour) policy on the HINTED prompt (x, h) the response was sampled from; r_t replaces
    the on-policy ratio in the same clipped surrogate as ``policy_loss`` (asymmetric clip, dual
    clip, aggregation). Consequences, stated so nobody is surprised: at the first update r_t is
    usually < 1 (the hint made the tokens likelier), so for A > 0 the surrogate is unclipped below
    1 - clip_low and its gradient is weighted by r_t; for A < 0 and r_t < 1 - clip_low it is clipped
    (no gradient). Unhinted groups use ``policy_loss`` unchanged (their two contexts coincide).

    logp_original: (B, T) current-policy log-probs of the response tokens computed on the unhinted
    prompt (PromptGroup.unhinted_prompt_ids); behavior_logp_hinted: (B, T) old/sampling log-probs
    on the hinted prompt (PromptGroup.prompt_ids); advantages (B, T) or (B,); mask (B, T).
    ``ratio_mean`` of the result is the mean IS weight (a useful metric for this context).
    """
    return policy_loss(logp=logp_original, old_logp=behavior_logp_hinted, advantages=advantages, mask=mask,
                       clip_low=clip_low, clip_high=clip_high, clip_c=clip_c, agg=agg,
                       num_tokens=num_tokens, num_seqs=num_seqs)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, *, kind: KLKind = "low_var_kl") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs.

    logp, ref_logp: (B, T). Returns (B, T).
      k1 / "kl":          logp - ref_logp
      k2 / "mse":         0.5 (logp - ref_logp)^2
      k3 / "low_var_kl":  exp(ref - logp) - (ref - logp) - 1, with ref - logp clamped to [-20, 20]
                          and the result clamped to [-10, 10] (verl's kl_penalty).
    """
    if kind in ("k1", "kl"):
        return logp - ref_logp
    if kind in ("k2", "mse"):
        return 0.5 * (logp - ref_logp).square()
    if kind in ("k3", "low_var_kl"):
        d = torch.clamp(ref_logp - logp, min=-20.0, max=20.0)
        return torch.clamp(torch.exp(d) - d - 1.0, min=-10.0, max=10.0)
    raise ValueError(f"kl kind must be one of k1/kl, k2/mse, k3/low_var_kl, got {kind!r}")


def kl_loss(*, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kind: KLKind = "low_var_kl",
            agg: AggMode = "token-mean", num_tokens: float | None = None,
            num_seqs: float | None = None) -> torch.Tensor:
    """``kl_penalty`` aggregated like the policy loss (multiply by the KL coefficient outside).

    logp, ref_logp, mask: (B, T). Returns a 0-dim tensor.
    """
    return aggregate(kl_penalty(logp, ref_logp, kind=kind), mask, mode=agg, num_tokens=num_tokens,
                     num_seqs=num_seqs)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

    logits: (B, T, V). Returns (B, T): logsumexp(z) - sum softmax(z) z. Logits of -inf (masked
    tokens) have probability 0 and contribute 0.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    finite = torch.where(torch.isinf(logits), torch.zeros_like(logits), logits)
    return torch.logsumexp(logits, dim=-1) - (probs * finite).sum(dim=-1)
