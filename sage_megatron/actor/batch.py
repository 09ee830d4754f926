"""Train batches from scored prompt groups: right-padded (B, T) tensors, token-aligned.

Token alignment (every (B, T) tensor of the actor uses it): column t belongs to token
``tokens[:, t]``; ``logp[:, t] = log p(tokens[:, t] | tokens[:, :t])``, the log-prob the model gave
that token when it predicted it from position t - 1. Column 0 has no prediction: logp[:, 0] = 0 and
``response_mask[:, 0]`` must be 0. A response of n tokens after a prompt of p tokens occupies
columns p .. p + n - 1, exactly where its sampling log-probs (``Sample.logprobs``) go.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch

from sage_megatron.types import PromptGroup


class ActorError(ValueError):
    """A batch or configuration the actor cannot run; the message says what to change."""



@dataclass
class TrainBatch:
    """One mini-batch of B right-padded sequences (prompt + response), aligned as the module docstring says.

    tokens (B, T) long; response_mask (B, T) float 0/1 (1 on response tokens whose log-prob counts,
    column 0 always 0); advantages (B,) float (one per sequence, broadcast over its tokens);
    old_logp (B, T) float, behaviour log-probs at the same columns (0 outside the response), or None
    for an exactly on-policy update (the batch's only optimizer step, right after the weight sync): the
    loss then uses the step's own log-probs, detached, as pi_old (ratio 1), and the extra forward pass
    that would recompute them is skipped, as TRL and verl do;
    ref_logp (B, T) float or None, reference-model log-probs (needed when kl_coef != 0).
    """

    tokens: torch.Tensor
    response_mask: torch.Tensor
    advantages: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None = None
    uids: list[str] = field(default_factory=list)   # group uid of each row (bookkeeping only)
    behavior: "TrainBatch | None" = None
    """Loss context "original" only: the same responses after the prompts they were SAMPLED under (the
    hinted ones), row for row; the old (behaviour) log-probs are computed on it (``old_logprobs``)."""

    @property
    def num_tokens(self) -> int:
        """Response tokens that count in the whole batch (the token-mean denominator)."""
        return int(self.response_mask.sum().item())

    def validate(self, *, vocab_size: int | None = None) -> None:
        """Raise ActorError naming the tensor whose shape or content is wrong."""
        if self.tokens.dim() != 2:
            raise ActorError(f"tokens must be (B, T), got shape {tuple(self.tokens.shape)}")
        b, t = self.tokens.shape
        for name in ("response_mask", "old_logp", "ref_logp"):
            x = getattr(self, name)
            if x is not None and tuple(x.shape) != (b, t):
                raise ActorError(f"{name} has shape {tuple(x.shape)}, expected (B, T) = {(b, t)} like tokens")
        if tuple(self.advantages.shape) != (b,):
            raise ActorError(f"advantages has shape {tuple(self.advantages.shape)}, expected (B,) = ({b},)")
        if b and bool(self.response_mask[:, 0].any()):
            raise ActorError("response_mask[:, 0] must be 0: column 0 has no predicted log-prob "
                             "(every sequence needs at least one prompt token)")
        if vocab_size is not None and b and int(self.tokens.max()) >= vocab_size:
            raise ActorError(f"token id {int(self.tokens.max())} >= vocabulary size {vocab_size}: "
                             "pad_id or the tokenizer does not match the checkpoint")


def batch_from_groups(groups: Sequence[PromptGroup], advantages_by_uid: Mapping[str, Sequence[float]], *,
                      pad_id: int, max_len: int, loss_context: str = "hinted") -> TrainBatch:
    """Right-padded TrainBatch of every sample of ``groups`` (group order, then sample order).

    Row i is ``sample.prompt_ids + sample.response_ids`` (each Sample's OWN prompt, which is the
    hinted one for hinted groups), padded with ``pad_id`` to T = the longest row. old_logp holds
    ``sample.logprobs`` (the rollout engine's sampling log-probs) at the response columns; a trainer
    that recomputes them replaces the field. ``advantages_by_uid[g.uid][j]`` is sample j's advantage.
    A row longer than ``max_len`` raises (nothing is truncated silently).

    ``loss_context="original"`` (Guide-GRPO, sage.md): groups that carry ``unhinted_prompt_ids`` put
    their responses after that ORIGINAL prompt instead, and the batch keeps the sampled rows as
    ``behavior`` so the importance ratio pi_theta(y | x) / pi_old(y | x, hint) can be formed
    (``MegatronActor.old_logprobs``; the loss is then ``algo.losses.is_corrected_policy_loss``).
    """
    if loss_context not in ("hinted", "original"):
        raise ActorError(f"loss_context must be 'hinted' or 'original', got {loss_context!r}")
    sampled = _rows_from_groups(groups, advantages_by_uid, pad_id=pad_id, max_len=max_len)
    if loss_context == "hinted" or not any(g.unhinted_prompt_ids for g in groups):
        return sampled
    trained_on = _rows_from_groups(groups, advantages_by_uid, pad_id=pad_id, max_len=max_len, original_context=True)
    return replace(trained_on, behavior=sampled)


def _rows_from_groups(groups: Sequence[PromptGroup], advantages_by_uid: Mapping[str, Sequence[float]], *,
                      pad_id: int, max_len: int, original_context: bool = False) -> TrainBatch:
    rows, masks, olds, advs, uids = [], [], [], [], []
    for g in groups:
        if g.uid not in advantages_by_uid:
            raise ActorError(f"no advantages for group uid {g.uid!r}")
        adv = advantages_by_uid[g.uid]
        if len(adv) != len(g.samples):
            raise ActorError(f"group {g.uid!r}: {len(adv)} advantages for {len(g.samples)} samples")
        for j, s in enumerate(g.samples):
            p = list(g.unhinted_prompt_ids if original_context and g.unhinted_prompt_ids else s.prompt_ids)
            r = list(s.response_ids)
            if not p:
                raise ActorError(f"group {g.uid!r} sample {j}: empty prompt (need >= 1 prompt token)")
            if len(p) + len(r) > max_len:
                raise ActorError(f"group {g.uid!r} sample {j}: prompt {len(p)} + response {len(r)} tokens "
                                 f"> max_len {max_len}; raise max_len or cap the rollout length")
            if len(s.logprobs) != len(r):
                raise ActorError(f"group {g.uid!r} sample {j}: {len(s.logprobs)} logprobs for {len(r)} tokens")
            rows.append(p + r)
            masks.append([0.0] * len(p) + [1.0] * len(r))
            olds.append([0.0] * len(p) + [float(x) for x in s.logprobs])
            advs.append(float(adv[j]))
            uids.append(g.uid)
    t = max((len(r) for r in rows), default=1)

    def pad(xs: list, value) -> list:
        return xs + [value] * (t - len(xs))

    return TrainBatch(
        tokens=torch.tensor([pad(r, pad_id) for r in rows], dtype=torch.long).reshape(-1, t),
        response_mask=torch.tensor([pad(m, 0.0) for m in masks], dtype=torch.float32).reshape(-1, t),
        advantages=torch.tensor(advs, dtype=torch.float32),
        old_logp=torch.tensor([pad(o, 0.0) for o in olds], dtype=torch.float32).reshape(-1, t),
        uids=uids,
    )


def row_lengths(response_mask: torch.Tensor) -> list[int]:
    """Columns each row needs: up to and including its last response column (causal, so the log-probs
    there do not depend on the padding after it); every column for a row without response tokens."""
    b, t = response_mask.shape
    last = torch.where(response_mask.bool().any(dim=1), t - response_mask.flip(1).argmax(dim=1), t)
    return [int(x) for x in last.tolist()] if b else []


def plan_micro_batches(lengths: Sequence[int], *, dp: int, max_rows: int, max_tokens: int = 0,
                       group_by_length: bool = True) -> list[list[list[int]]]:
    """Rows per micro-batch per data-parallel rank: ``plan[dp_rank][k]`` = the row indices of that rank's
    micro-batch k, which runs right-padded to its own longest row.

    ``group_by_length``: rows taken longest first, so each micro-batch holds rows of similar length and
    pads little; False: rows in batch order and every micro-batch padded to the batch's longest row (the
    unpacked layout, for comparisons). Rows go to the DP rank with the fewest tokens so far (ties: the
    lower rank), so ranks get balanced work. A micro-batch holds at most ``max_rows`` rows and, when
    ``max_tokens`` > 0, at most ``max_tokens`` padded tokens (rows x its longest); a longer row runs alone.
    A rank with no rows gets an empty plan (the caller runs one padding row there: every rank must run
    the schedule). Every rank computes the same plan from the same batch."""
    if dp < 1 or max_rows < 1 or max_tokens < 0:
        raise ActorError(f"plan_micro_batches: need dp >= 1, max_rows >= 1, max_tokens >= 0; "
                         f"got dp={dp}, max_rows={max_rows}, max_tokens={max_tokens}")
    width = [int(n) for n in lengths] if group_by_length else [max(lengths, default=0)] * len(lengths)
    order = sorted(range(len(width)), key=lambda i: -width[i]) if group_by_length else list(range(len(width)))
    per_rank: list[list[int]] = [[] for _ in range(dp)]
    load = [0] * dp
    for i in order:
        r = min(range(dp), key=lambda k: (load[k], k))
        per_rank[r].append(i)
        load[r] += width[i]
    plan = []
    for rows in per_rank:
        micro: list[list[int]] = []
        for i in rows:                  # longest first within a rank: a micro-batch's first row is its widest
            mb = micro[-1] if micro else None
            if mb is None or len(mb) >= max_rows or (max_tokens and (len(mb) + 1) * width[mb[0]] > max_tokens):
                micro.append([i])
            else:
                mb.append(i)
        plan.append(micro)
    return plan


def micro_batch_width(rows: Sequence[int], lengths: Sequence[int], *, group_by_length: bool = True) -> int:
    """Columns the micro-batch of ``rows`` runs at: its own longest row, or the batch's longest when not
    grouping by length (see ``plan_micro_batches``)."""
    return max((lengths[i] for i in rows), default=0) if group_by_length else max(lengths, default=0)


def padded_tokens(plan: Sequence[Sequence[Sequence[int]]], lengths: Sequence[int], *,
                  group_by_length: bool = True) -> int:
    """Tokens the forward pass computes for ``plan`` (rows x width per micro-batch, padding included)."""
    return sum(len(mb) * micro_batch_width(mb, lengths, group_by_length=group_by_length)
               for rank in plan for mb in rank if mb)


def rows_with_gradient(advantages: torch.Tensor, *, kl_coef: float, entropy_coef: float) -> torch.Tensor | None:
    """Indices of the rows whose loss terms can have a non-zero gradient; None = every row.

    With the KL and entropy coefficients at 0 a row's only term is the policy-gradient one, which is
    its advantage times a function of the ratio: exactly 0, with an exactly zero gradient, when the
    advantage is 0 (a group whose samples all got the same reward).
    """
    if kl_coef != 0 or entropy_coef != 0:
        return None
    rows = (advantages != 0).nonzero().flatten()
    return None if len(rows) == len(advantages) else rows


def rows_response_mask(batch: TrainBatch, rows: torch.Tensor | None) -> torch.Tensor:
    """``batch.response_mask`` (B, T) with only ``rows`` kept (every row when None)."""
    if rows is None:
        return batch.response_mask
    keep = torch.zeros(batch.response_mask.shape[0], dtype=batch.response_mask.dtype)
    keep[rows] = 1
    return batch.response_mask * keep[:, None]


def select_rows(batch: TrainBatch, rows: torch.Tensor) -> TrainBatch:
    """``rows`` of every tensor, cut after the last response column any of them has (causal: the
    log-probs of the columns kept do not depend on the right padding dropped)."""
    mask = batch.response_mask[rows]
    used = mask.any(dim=0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1

    def take(x):
        return None if x is None else x[rows, :width]

    return TrainBatch(tokens=take(batch.tokens), response_mask=mask[:, :width], advantages=batch.advantages[rows],
                      old_logp=take(batch.old_logp), ref_logp=take(batch.ref_logp),
                      uids=[batch.uids[i] for i in rows.tolist()] if batch.uids else [])


def move_response_values(values: torch.Tensor, src_mask: torch.Tensor, dst_mask: torch.Tensor) -> torch.Tensor:
    """Per-row response values moved from the columns ``src_mask`` marks to those ``dst_mask`` marks.

    The same responses after prompts of different lengths (hinted vs original context): row i has
    the same number of response tokens in both masks, so the k-th marked value of a row goes to the
    k-th marked column of the same row. Everything else is 0.
    """
    src, dst = src_mask.bool(), dst_mask.bool()
    if src.shape[0] != dst.shape[0] or not torch.equal(src.sum(dim=1), dst.sum(dim=1)):
        raise ActorError("move_response_values: the two masks must mark the same number of tokens in every row "
                         f"(got per-row counts {src.sum(dim=1).tolist()} and {dst.sum(dim=1).tolist()})")
    out = torch.zeros(dst.shape, dtype=values.dtype)
    out[dst] = values[src]          # boolean indexing is row-major: row by row, left to right
    return out
