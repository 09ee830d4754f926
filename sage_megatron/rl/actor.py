"""The Megatron actor / reference worker: per-token log-probs and PPO updates on one rank.

One ``MegatronActor`` lives in every process of a (tp, pp, dp) layout (the process has called
``sage_megatron.parallel.distributed.init_parallel``); an SPMD training loop calls the same methods
on every rank with the same ``TrainBatch``:

    actor = MegatronActor(cfg)                                  # policy: DDP + megatron AdamW
    ref = build_reference(cfg)                                  # None unless cfg.kl_coef != 0
    batch = batch_from_groups(groups, advantages_by_uid, pad_id=tok.pad_token_id, max_len=4096)
    batch = replace(batch, old_logp=actor.old_logprobs(batch),
                    ref_logp=ref.compute_logprobs(batch) if ref else None)
    metrics = actor.train_step(batch)                           # one optimizer step

Token alignment (every (B, T) tensor in this module uses it): column t belongs to token
``tokens[:, t]``; ``logp[:, t] = log p(tokens[:, t] | tokens[:, :t])``, the log-prob the model gave
that token when it predicted it from position t - 1. Column 0 has no prediction: logp[:, 0] = 0 and
``response_mask[:, 0]`` must be 0. A response of n tokens after a prompt of p tokens occupies
columns p .. p + n - 1, exactly where its sampling log-probs (``Sample.logprobs``) go.

Log-probs use a vocab-parallel log-softmax (no full-vocabulary gather: max and sum-exp are
all-reduced over the TP group) over the REAL vocabulary only: the rows the checkpoint pads the
vocabulary with (ids >= arch.vocab_size) are masked to -inf, so the numbers equal HF's / vLLM's.

Loss (sage.md, "Loss and advantage"): PPO clipped surrogate (``rl.losses.policy_loss``, asymmetric
clip 0.2 / 0.28, dual clip 3.0) + kl_coef * KL(pi || ref) - entropy_coef * entropy, each aggregated
over the WHOLE mini-batch (token mean: divided by the global number of response tokens), so the
result does not depend on micro-batch size or data-parallel size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from sage_megatron.parallel.layout import ParallelLayout
from sage_megatron.parallel.precision import Fp8Options
from sage_megatron.rl.losses import AggMode, KLKind, aggregate, kl_loss, policy_loss
from sage_megatron.types import PromptGroup


class ActorError(ValueError):
    """A batch or configuration the actor cannot run; the message says what to change."""


# ---- configuration ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ActorConfig:
    """Everything one actor (or reference) rank needs; the same object on every rank."""

    ckpt_dir: str
    """Converted checkpoint folder (sage_megatron.json + dist/), written at any TP/PP."""
    layout: ParallelLayout = ParallelLayout()
    """(tp, pp, dp) of this run; must match the initialised megatron parallel state."""
    dtype: str | None = None
    """Parameter/compute dtype ("float32", "bfloat16"); None = the checkpoint's dtype."""
    lr: float = 1e-6
    """AdamW learning rate (constant; no scheduler)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (megatron skips biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (over all TP/PP/DP shards); 0 disables."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank (pipeline schedule granularity)."""
    use_te: bool = False
    """Transformer Engine layer spec (GPU only); False = megatron's local spec."""
    fp8: Fp8Options | None = None
    """FP8 training options (TE + Hopper only); None = off."""
    clip_low: float = 0.2
    """PPO ratio clip below: ratio >= 1 - clip_low."""
    clip_high: float = 0.28
    """PPO ratio clip above (DAPO clip-higher): ratio <= 1 + clip_high."""
    clip_c: float | None = 3.0
    """Dual-clip constant for negative advantages (> 1); None disables."""
    kl_coef: float = 0.0
    """Weight of the KL(pi || ref) loss; 0 means no reference model is built."""
    kl_kind: KLKind = "low_var_kl"
    """KL estimator: "k1"/"kl", "k2"/"mse", "k3"/"low_var_kl"."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    loss_agg: AggMode = "token-mean"
    """Aggregation over the mini-batch: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum"."""


# ---- the batch --------------------------------------------------------------------------------------

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
    (``MegatronActor.old_logprobs``; the loss is then ``rl.losses.is_corrected_policy_loss``).
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


def pad_rows(batch: TrainBatch, *, multiple: int, pad_id: int) -> TrainBatch:
    """The batch with all-padding rows (mask 0, advantage 0) appended until B % multiple == 0.

    Padding rows contribute nothing to any loss term (their mask is 0) and are cut from results.
    """
    b, t = batch.tokens.shape
    extra = (-b) % multiple
    if extra == 0:
        return batch

    def grow(x: torch.Tensor | None, value: float) -> torch.Tensor | None:
        if x is None:
            return None
        return torch.cat([x, torch.full((extra, *x.shape[1:]), value, dtype=x.dtype)], dim=0)

    return TrainBatch(tokens=grow(batch.tokens, pad_id), response_mask=grow(batch.response_mask, 0.0),
                      advantages=grow(batch.advantages, 0.0), old_logp=grow(batch.old_logp, 0.0),
                      ref_logp=grow(batch.ref_logp, 0.0), uids=batch.uids + [""] * extra)


def row_slice(batch: TrainBatch, start: int, stop: int) -> TrainBatch:
    """Rows [start, stop) of every tensor."""
    def cut(x):
        return None if x is None else x[start:stop]

    return TrainBatch(tokens=cut(batch.tokens), response_mask=cut(batch.response_mask),
                      advantages=cut(batch.advantages), old_logp=cut(batch.old_logp),
                      ref_logp=cut(batch.ref_logp), uids=batch.uids[start:stop])


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


# ---- vocab-parallel log-softmax ---------------------------------------------------------------------

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
                            with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits)[target] over the real vocabulary, with the vocabulary split over TP ranks.

    logits: (B, S, V_local), this TP rank's slice [rank * V_local, (rank + 1) * V_local) of the
    padded vocabulary; targets: (B, S) global ids. Columns with global id >= ``vocab_size`` (the
    checkpoint's padding rows) are masked to -inf. Returns (logp (B, S), entropy (B, S) or None),
    identical on every TP rank, differentiable: max is detached (log-sum-exp is shift invariant) and
    every TP sum is a sum of purely local terms through megatron's reduce_from_tensor_model_parallel_region
    (all-reduce forward, identity backward: each rank's shard feeds only its own partial sum, and
    every rank computes the same function of the global sums).
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
        finite = torch.where(real, shifted, torch.zeros_like(shifted))
        a = reduce_from_tensor_model_parallel_region((exp_z * finite).sum(dim=-1).contiguous())
        entropy = log_z - a / sum_exp
    return logp, entropy


# ---- the actor --------------------------------------------------------------------------------------

# Metrics summed over micro-batches and DP ranks (each already normalised by the global batch).
_SUM_KEYS = ("loss", "pg_loss", "kl", "entropy", "clip_frac", "clip_frac_lower", "ppo_kl", "ratio_mean", "tokens")


class MegatronActor:
    """This rank's pipeline stage of the policy (trainable) or the frozen reference model."""

    def __init__(self, config: ActorConfig, *, trainable: bool = True):
        from megatron.core import parallel_state as ps

        from sage_megatron.parallel.convert import check_layout_for, read_meta
        from sage_megatron.parallel.model import build_gpt_model
        from sage_megatron.parallel.precision import parse_dtype
        from sage_megatron.parallel.shards import load_dist_checkpoint

        self.config = config
        self.trainable = trainable
        meta = read_meta(config.ckpt_dir)
        self.arch = meta.arch
        self.padded_vocab = meta.padded_vocab
        self.dtype = parse_dtype(config.dtype or meta.dtype)
        lay = config.layout
        check_layout_for(meta.arch, lay, meta.padded_vocab)
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_data_parallel_world_size())
        if have != (lay.tp, lay.pp, lay.dp):
            raise ActorError(f"ActorConfig.layout (tp, pp, dp) = {(lay.tp, lay.pp, lay.dp)} but the initialised "
                             f"parallel state is {have}: pass the same layout to init_parallel and the actor")
        if config.micro_batch_size < 1:
            raise ActorError(f"micro_batch_size must be >= 1, got {config.micro_batch_size}")
        model = build_gpt_model(meta.arch, layout=lay, padded_vocab=meta.padded_vocab, dtype=self.dtype,
                                use_te=config.use_te, fp8=config.fp8)
        load_dist_checkpoint(model, str(Path(config.ckpt_dir) / "dist"))
        self.optimizer = None
        if trainable:
            self.model, self.optimizer = _wrap_for_training(model, config, dtype=self.dtype)
        else:
            model.requires_grad_(False)
            model.eval()
            self.model = model
        self.steps = 0

    # -- helpers shared by both passes --

    def _local_rows(self, batch: TrainBatch) -> tuple[TrainBatch, int, int]:
        """(this DP rank's rows, micro-batch size, global padded B) after padding B to dp * mbs.

        Padding rows are token id 0 (always a valid id) with mask 0: they change no loss term and are
        cut from returned log-probs.
        """
        from megatron.core import parallel_state as ps

        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        b = batch.tokens.shape[0]
        mbs = max(1, min(self.config.micro_batch_size, math.ceil(b / dp)))
        padded = pad_rows(batch, multiple=dp * mbs, pad_id=0)
        per_rank = padded.tokens.shape[0] // dp
        return row_slice(padded, dp_rank * per_rank, (dp_rank + 1) * per_rank), mbs, padded.tokens.shape[0]

    def _micro_batches(self, local: TrainBatch, mbs: int) -> list[dict]:
        from sage_megatron.parallel.device import compute_device

        device = compute_device()
        out = []
        for i in range(0, local.tokens.shape[0], mbs):
            mb = row_slice(local, i, i + mbs)
            seq = mb.tokens.shape[1]
            item = {"tokens": mb.tokens.to(device),
                    "positions": torch.arange(seq, device=device).unsqueeze(0).expand(mb.tokens.shape[0], seq),
                    "mask": mb.response_mask.to(device, torch.float32),
                    "advantages": mb.advantages.to(device, torch.float32),
                    "old_logp": None if mb.old_logp is None else mb.old_logp.to(device, torch.float32)}
            if mb.ref_logp is not None:
                item["ref_logp"] = mb.ref_logp.to(device, torch.float32)
            out.append(item)
        return out

    def _token_logprobs(self, output: torch.Tensor, tokens: torch.Tensor, *,
                        with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last-stage logits (b, T, V_local) -> aligned (logp (b, T), entropy (b, T) or None)."""
        logp, ent = vocab_parallel_logprobs(output, next_token_targets(tokens), vocab_size=self.arch.vocab_size,
                                            with_entropy=with_entropy)
        return align_to_tokens(logp), (align_to_tokens(ent) if ent is not None else None)

    def _run_schedule(self, micro: list[dict], *, forward_only: bool, loss_func) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from sage_megatron.parallel.device import on_cpu_if_needed

        def forward_step(data_iter: Iterator[dict], model):
            mb = next(data_iter)
            out = model(mb["tokens"], mb["positions"], attention_mask=None)
            return out, partial(loss_func, mb)

        seq = micro[0]["tokens"].shape[1]
        with on_cpu_if_needed():
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(micro), model=[self.model],
                num_microbatches=len(micro), seq_length=seq, micro_batch_size=micro[0]["tokens"].shape[0],
                forward_only=forward_only)

    # -- public API --

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch | torch.Tensor) -> torch.Tensor:
        """Per-token log-probs (B, T) of ``batch.tokens`` (aligned: column t = log p(tokens[t] | tokens[<t]),
        column 0 = 0), float32, on every rank. Collective: every rank calls it with the same batch."""
        from megatron.core import parallel_state as ps

        if isinstance(batch, torch.Tensor):
            batch = TrainBatch(tokens=batch, response_mask=torch.zeros(batch.shape), old_logp=torch.zeros(batch.shape),
                               advantages=torch.zeros(batch.shape[0]))
        batch.validate(vocab_size=self.arch.vocab_size)
        b, t = batch.tokens.shape
        local, mbs, _ = self._local_rows(batch)
        micro = self._micro_batches(local, mbs)
        was_training = self.model.training
        self.model.eval()

        def loss_func(mb: dict, output: torch.Tensor):
            logp, _ = self._token_logprobs(output, mb["tokens"], with_entropy=False)
            return output.new_zeros(()), {"logp": logp.float()}

        try:
            collected = self._run_schedule(micro, forward_only=True, loss_func=loss_func)
        finally:
            self.model.train(was_training)
        if ps.is_pipeline_last_stage():
            local_logp = torch.cat([c["logp"] for c in collected], dim=0).cpu()
        else:
            local_logp = torch.zeros(local.tokens.shape, dtype=torch.float32)
        local_logp = _broadcast_from_last_stage(local_logp)
        return _all_gather_dp(local_logp)[:b]

    def old_logprobs(self, batch: TrainBatch, *, only_update: bool = False) -> torch.Tensor | None:
        """pi_old log-probs of the batch's response tokens, at its response columns (0 elsewhere), computed
        under the context the responses were sampled in: ``batch.behavior`` when set (loss context
        "original"), else the batch itself. Collective, like ``compute_logprobs``.

        ``only_update``: the batch gets the step's only optimizer update, with the weights it was sampled
        with. pi_old is then the update's own forward pass: returns None (no extra forward; see
        TrainBatch.old_logp), except under the "original" context, whose pi_old is on other rows."""
        if only_update and batch.behavior is None:
            return None
        sampled = batch.behavior if batch.behavior is not None else batch
        logp = self.compute_logprobs(sampled) * sampled.response_mask
        if batch.behavior is None:
            return logp
        return move_response_values(logp, sampled.response_mask, batch.response_mask)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on the whole batch (split over DP ranks and micro-batches).

        Collective. Returns, identical on every rank: loss, pg_loss, kl, entropy (token means over the
        batch, or the configured aggregation), clip_frac, clip_frac_lower, ppo_kl, ratio_mean (token means;
        ratio_mean is the mean importance weight pi_theta / pi_old),
        grad_norm (global, before clipping; nan when grad_clip = 0), lr, tokens (response tokens in the
        batch), update_ok (1.0 unless fp16 loss scaling skipped the step).
        """
        from megatron.core import parallel_state as ps

        from sage_megatron.parallel.device import on_cpu_if_needed

        if not self.trainable:
            raise ActorError("train_step on a reference (trainable=False) actor")
        cfg = self.config
        batch.validate(vocab_size=self.arch.vocab_size)
        if cfg.kl_coef != 0 and batch.ref_logp is None:
            raise ActorError(f"kl_coef={cfg.kl_coef} needs batch.ref_logp: compute it with the reference actor "
                             "(build_reference(config).compute_logprobs(batch))")
        num_tokens = float(batch.response_mask.sum())
        num_seqs = float(batch.tokens.shape[0])
        local, mbs, _ = self._local_rows(batch)
        micro = self._micro_batches(local, mbs)
        # The schedule divides each micro-batch loss by num_microbatches and DDP averages gradients
        # over DP; both undone here so the gradient is that of the global-batch loss.
        grad_scale = len(micro) * ps.get_data_parallel_world_size()
        loss_func = partial(self._loss, num_tokens=num_tokens, num_seqs=num_seqs, grad_scale=grad_scale)

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        collected = self._run_schedule(micro, forward_only=False, loss_func=loss_func)
        with on_cpu_if_needed():
            update_ok, grad_norm, _ = self.optimizer.step()
        self.steps += 1

        sums = torch.zeros(len(_SUM_KEYS), dtype=torch.float64)
        if ps.is_pipeline_last_stage():
            for c in collected:
                sums += torch.stack([c[k].double().cpu() for k in _SUM_KEYS])
        if ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(sums, group=ps.get_data_parallel_group())
        sums = _broadcast_from_last_stage(sums)
        out = dict(zip(_SUM_KEYS, sums.tolist()))
        tokens = max(out["tokens"], 1.0)
        for k in ("clip_frac", "clip_frac_lower", "ppo_kl", "ratio_mean"):   # token-weighted sums -> token means
            out[k] /= tokens
        # megatron computes the norm only when clipping is on (it reports 0.0 otherwise): nan then.
        norm_known = cfg.grad_clip > 0 and grad_norm is not None
        out.update(grad_norm=float(grad_norm) if norm_known else float("nan"),
                   lr=float(self.optimizer.param_groups[0]["lr"]), update_ok=float(bool(update_ok)))
        return out

    def _loss(self, mb: dict, output: torch.Tensor, *, num_tokens: float, num_seqs: float,
              grad_scale: float) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch as its share of the global-batch loss (times grad_scale for the schedule)."""
        cfg = self.config
        mask = mb["mask"]                                                                   # (b, T)
        want_entropy_grad = cfg.entropy_coef != 0
        logp, ent = self._token_logprobs(output, mb["tokens"], with_entropy=want_entropy_grad)
        if ent is None:
            with torch.no_grad():
                _, ent = self._token_logprobs(output.detach(), mb["tokens"], with_entropy=True)
        agg = dict(num_tokens=num_tokens, num_seqs=num_seqs)
        old_logp = logp.detach() if mb["old_logp"] is None else mb["old_logp"]          # None: on-policy
        pg = policy_loss(logp=logp, old_logp=old_logp, advantages=mb["advantages"], mask=mask,
                         clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_c=cfg.clip_c, agg=cfg.loss_agg, **agg)
        entropy = aggregate(ent, mask, mode=cfg.loss_agg, **agg)
        loss = pg.loss - cfg.entropy_coef * entropy
        kl = torch.zeros((), dtype=loss.dtype, device=loss.device)
        if "ref_logp" in mb:
            kl = kl_loss(logp=logp, ref_logp=mb["ref_logp"], mask=mask, kind=cfg.kl_kind, agg=cfg.loss_agg, **agg)
            if cfg.kl_coef != 0:
                loss = loss + cfg.kl_coef * kl
        mb_tokens = mask.sum()
        metrics = {"loss": loss.detach().clone(), "pg_loss": pg.loss.detach(), "kl": kl.detach(),
                   "entropy": entropy.detach(), "clip_frac": pg.clip_frac * mb_tokens,
                   "clip_frac_lower": pg.clip_frac_lower * mb_tokens, "ppo_kl": pg.ppo_kl * mb_tokens,
                   "ratio_mean": pg.ratio_mean * mb_tokens, "tokens": mb_tokens.detach()}
        return loss * grad_scale, metrics

    def global_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """This stage's parameters as (global name, TP-merged tensor); collective over the TP group."""
        from sage_megatron.parallel.shards import iter_global_tensors

        return iter_global_tensors(self.model, arch=self.arch)


def build_reference(config: ActorConfig) -> MegatronActor | None:
    """The frozen reference model, or None when ``config.kl_coef == 0`` (it is then never needed)."""
    if config.kl_coef == 0:
        return None
    return MegatronActor(config, trainable=False)


# ---- construction and collectives -------------------------------------------------------------------

def _wrap_for_training(model, config: ActorConfig, *, dtype: torch.dtype):
    """megatron DistributedDataParallel + get_megatron_optimizer (AdamW), wired into the model config."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from sage_megatron.parallel.device import on_cpu_if_needed

    mcfg = model.config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=config.lr, min_lr=config.lr, weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, adam_eps=config.adam_eps,
        clip_grad=config.grad_clip, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        params_dtype=dtype, decoupled_weight_decay=True, use_distributed_optimizer=False,
    )
    with on_cpu_if_needed():
        ddp = DistributedDataParallel(config=mcfg, ddp_config=ddp_config, module=model)
        optimizer = get_megatron_optimizer(opt_config, [ddp])
    # The schedule reads these from the model config: DP grad all-reduce + tied-embedding grad
    # all-reduce across first/last pipeline stage after the last micro-batch.
    mcfg.finalize_model_grads_func = finalize_model_grads
    mcfg.no_sync_func = ddp.no_sync
    mcfg.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer


def _broadcast_from_last_stage(x: torch.Tensor) -> torch.Tensor:
    """x as held by the last pipeline stage, on every stage (same shape/dtype everywhere)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return x
    x = x.contiguous()
    dist.broadcast(x, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return x


def _all_gather_dp(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each DP rank's rows (dim 0) in DP-rank order."""
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    if dp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dp)]
    dist.all_gather(parts, x.contiguous(), group=ps.get_data_parallel_group())
    return torch.cat(parts, dim=0)

