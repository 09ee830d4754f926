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

Token alignment: see ``actor/batch.py``; the vocab-parallel log-softmax: ``actor/logprobs.py``.

Loss (sage.md, "Loss and advantage"): PPO clipped surrogate (``algo.losses.policy_loss``, asymmetric
clip 0.2 / 0.28, dual clip 3.0) + kl_coef * KL(pi || ref) - entropy_coef * entropy, each aggregated
over the WHOLE mini-batch (token mean: divided by the global number of response tokens), so the
result does not depend on micro-batch size or data-parallel size.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from sage_megatron.actor.batch import (ActorError, TrainBatch, micro_batch_width, move_response_values,
                                       padded_tokens, plan_micro_batches, row_lengths, rows_with_gradient,
                                       select_rows)
from sage_megatron.actor.logprobs import align_to_tokens, next_token_targets, vocab_parallel_logprobs
from sage_megatron.algo.losses import AggMode, KLKind, aggregate, kl_loss, policy_loss
from sage_megatron.parallel.layout import ParallelLayout
from sage_megatron.parallel.precision import Fp8Options

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
    """AdamW peak learning rate."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to lr (step k of the warmup runs at lr * k / lr_warmup_steps)."""
    lr_decay_style: str = "constant"
    """constant | linear | cosine after the warmup (megatron-core's OptimizerParamScheduler)."""
    lr_decay_steps: int = 0
    """Optimizer step at which a linear/cosine decay reaches min_lr (> lr_warmup_steps); unused when constant."""
    min_lr: float = 0.0
    """lr at the end of a linear/cosine decay."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay; the scheduler applies it with megatron's per-group multiplier, which is 0
    for biases and norm weights."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (over all TP/PP/DP shards); 0 disables."""
    micro_batch_size: int = 1
    """At most this many sequences per micro-batch per data-parallel rank."""
    max_tokens_per_micro_batch: int = 0
    """When > 0, at most this many padded tokens (rows x longest row) per micro-batch; a longer row runs
    alone. 0: micro_batch_size alone decides."""
    group_by_length: bool = True
    """Micro-batches of rows of similar length, each cut to its own longest row; False: batch order,
    every micro-batch padded to the batch's longest (the unpacked layout, for comparisons)."""
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
    skip_zero_advantage_rows: bool = True
    """With kl_coef = entropy_coef = 0, rows whose advantage is 0 (their gradient is exactly 0) are not run;
    the loss keeps the whole batch's denominators, so the step is the same. False: run every row."""


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
        self.optimizer = self.lr_schedule = None
        if trainable:
            self.model, self.optimizer = _wrap_for_training(model, config, dtype=self.dtype)
            self.lr_schedule = _lr_schedule(self.optimizer, config)
        else:
            model.requires_grad_(False)
            model.eval()
            self.model = model
        self.steps = 0

    # -- helpers shared by both passes --

    def _micro_batches(self, batch: TrainBatch) -> tuple[list[dict], int]:
        """This DP rank's micro-batches of ``batch`` (``plan_micro_batches``: grouped by length, each cut to
        its own longest row) and the tokens all ranks compute (padding included). Each micro-batch keeps
        its ``rows`` (indices into the batch). A rank without rows runs one padding row (token id 0, mask
        0: no loss term), because every rank runs the schedule."""
        from megatron.core import parallel_state as ps

        from sage_megatron.parallel.device import compute_device

        cfg = self.config
        lengths = row_lengths(batch.response_mask)
        plan = plan_micro_batches(lengths, dp=ps.get_data_parallel_world_size(), max_rows=cfg.micro_batch_size,
                                  max_tokens=cfg.max_tokens_per_micro_batch, group_by_length=cfg.group_by_length)
        device = compute_device()
        out = []
        for rows in plan[ps.get_data_parallel_rank()] or [[]]:
            idx = torch.tensor(rows, dtype=torch.long)
            width = micro_batch_width(rows, lengths, group_by_length=cfg.group_by_length)
            if not rows:                # the padding row of a rank without rows: two columns (or the batch's one)
                width = min(max(lengths, default=1), 2)

            def take(x: torch.Tensor | None) -> torch.Tensor | None:
                if x is None:
                    return None
                return x[idx, :width] if rows else x.new_zeros(1, width)

            tokens = take(batch.tokens)
            item = {"rows": rows, "tokens": tokens.to(device),
                    "positions": torch.arange(width, device=device).unsqueeze(0).expand(tokens.shape[0], width),
                    "mask": take(batch.response_mask).to(device, torch.float32),
                    "advantages": (batch.advantages[idx] if rows else batch.advantages.new_zeros(1)).to(
                        device, torch.float32),
                    "old_logp": None if batch.old_logp is None else take(batch.old_logp).to(device, torch.float32)}
            if batch.ref_logp is not None:
                item["ref_logp"] = take(batch.ref_logp).to(device, torch.float32)
            out.append(item)
        return out, padded_tokens(plan, lengths, group_by_length=cfg.group_by_length)

    def _token_logprobs(self, output: torch.Tensor, tokens: torch.Tensor, *,
                        with_entropy: bool | str) -> tuple[torch.Tensor, torch.Tensor | None]:
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

        # Micro-batches differ in shape; the model config's variable_seq_lengths makes pipeline stages
        # exchange each one's shape (parallel/model.py), so these maxima only size the first receive.
        seq = max(mb["tokens"].shape[1] for mb in micro)
        rows = max(mb["tokens"].shape[0] for mb in micro)
        with on_cpu_if_needed():
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(micro), model=[self.model],
                num_microbatches=len(micro), seq_length=seq, micro_batch_size=rows, forward_only=forward_only)

    # -- public API --

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch | torch.Tensor) -> torch.Tensor:
        """Per-token log-probs (B, T) of ``batch.tokens`` (aligned: column t = log p(tokens[t] | tokens[<t]),
        column 0 = 0; 0 after a row's last response token, see ``row_lengths``), float32, on every rank.
        Collective: every rank calls it with the same batch."""
        from megatron.core import parallel_state as ps

        if isinstance(batch, torch.Tensor):
            batch = TrainBatch(tokens=batch, response_mask=torch.zeros(batch.shape), old_logp=torch.zeros(batch.shape),
                               advantages=torch.zeros(batch.shape[0]))
        batch.validate(vocab_size=self.arch.vocab_size)
        micro, _ = self._micro_batches(batch)
        was_training = self.model.training
        self.model.eval()

        def loss_func(mb: dict, output: torch.Tensor):
            logp, _ = self._token_logprobs(output, mb["tokens"], with_entropy=False)
            return output.new_zeros(()), {"logp": logp.float(), "rows": mb["rows"]}

        try:
            collected = self._run_schedule(micro, forward_only=True, loss_func=loss_func)
        finally:
            self.model.train(was_training)
        logp = torch.zeros(batch.tokens.shape, dtype=torch.float32)
        if ps.is_pipeline_last_stage():
            for c in collected:
                if c["rows"]:
                    logp[c["rows"], :c["logp"].shape[1]] = c["logp"].cpu()
            # a row shorter than its micro-batch got columns past its end: 0 there, whatever the grouping
            lengths = torch.tensor(row_lengths(batch.response_mask))
            logp *= torch.arange(logp.shape[1])[None, :] < lengths[:, None]
        logp = _broadcast_from_last_stage(logp)
        return _sum_over_dp(logp)              # each row was computed on one DP rank, 0 on the others

    def old_logprobs(self, batch: TrainBatch, *, only_update: bool = False) -> torch.Tensor | None:
        """pi_old log-probs of the batch's response tokens, at its response columns (0 elsewhere), computed
        under the context the responses were sampled in: ``batch.behavior`` when set (loss context
        "original"), else the batch itself. Collective, like ``compute_logprobs``.

        Only the rows the update will run are computed (``rows_to_run``); the others, whose gradient is
        exactly 0 and whose pi_old is never read, stay 0.

        ``only_update``: the batch gets the step's only optimizer update, with the weights it was sampled
        with. pi_old is then the update's own forward pass: returns None (no extra forward; see
        TrainBatch.old_logp), except under the "original" context, whose pi_old is on other rows."""
        if only_update and batch.behavior is None:
            return None
        sampled = batch.behavior if batch.behavior is not None else batch
        logp = self._response_logprobs(sampled, self.rows_to_run(batch))
        if batch.behavior is None:
            return logp
        return move_response_values(logp, sampled.response_mask, batch.response_mask)

    def rows_to_run(self, batch: TrainBatch) -> torch.Tensor | None:
        """Indices of the rows ``train_step`` runs; None = every row. Rows whose gradient is exactly 0 (advantage
        0 with the KL and entropy coefficients at 0) are skipped unless ``skip_zero_advantage_rows`` is off."""
        cfg = self.config
        if not cfg.skip_zero_advantage_rows:
            return None
        return rows_with_gradient(batch.advantages, kl_coef=cfg.kl_coef, entropy_coef=cfg.entropy_coef)

    def _response_logprobs(self, batch: TrainBatch, rows: torch.Tensor | None) -> torch.Tensor:
        """``compute_logprobs`` at the response columns (0 elsewhere), of ``rows`` only when given (others 0)."""
        if rows is None:
            return self.compute_logprobs(batch) * batch.response_mask
        out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
        if len(rows):
            run = select_rows(batch, rows)
            out[rows, :run.tokens.shape[1]] = self.compute_logprobs(run) * run.response_mask
        return out

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
        # Rows with an exactly zero gradient are not run; the loss keeps the whole batch's denominators,
        # so the gradient equals the unskipped step's.
        rows = self.rows_to_run(batch)
        run = batch if rows is None else select_rows(batch, rows)
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        collected, computed = [], 0
        if run.tokens.shape[0]:
            micro, computed = self._micro_batches(run)
            # The schedule divides each micro-batch loss by num_microbatches and DDP averages gradients
            # over DP; both undone here so the gradient is that of the global-batch loss.
            grad_scale = len(micro) * ps.get_data_parallel_world_size()
            loss_func = partial(self._loss, num_tokens=num_tokens, num_seqs=num_seqs, grad_scale=grad_scale,
                                run_tokens=float(run.response_mask.sum()), run_seqs=float(run.tokens.shape[0]))
            collected = self._run_schedule(micro, forward_only=False, loss_func=loss_func)
        # lr and weight decay of optimizer step number self.steps (derived from it, so a resume needs no
        # scheduler state of its own).
        self.lr_schedule.num_steps = self.steps
        self.lr_schedule.step(0)
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
        # tokens: the batch's response tokens; the per-token metrics above are over the rows run.
        out.update(tokens=num_tokens, tokens_run=float(run.response_mask.sum()),
                   padded_tokens_run=float(computed), rows_skipped=num_seqs - run.tokens.shape[0])
        # megatron computes the norm only when clipping is on (it reports 0.0 otherwise): nan then.
        norm_known = cfg.grad_clip > 0 and grad_norm is not None
        out.update(grad_norm=float(grad_norm) if norm_known else float("nan"),
                   lr=float(self.optimizer.param_groups[0]["lr"]), update_ok=float(bool(update_ok)))
        return out

    def _loss(self, mb: dict, output: torch.Tensor, *, num_tokens: float, num_seqs: float, grad_scale: float,
              run_tokens: float, run_seqs: float) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch as its share of the global-batch loss (times grad_scale for the schedule).

        num_tokens / num_seqs: the whole batch's; run_tokens / run_seqs: of the rows run (fewer when rows
        with an exactly zero gradient are skipped, which happens only with entropy_coef == 0, so the
        entropy, then a metric only, is averaged over the rows run)."""
        cfg = self.config
        mask = mb["mask"]                                                                   # (b, T)
        logp, ent = self._token_logprobs(output, mb["tokens"],
                                         with_entropy=True if cfg.entropy_coef != 0 else "detached")
        agg = dict(num_tokens=num_tokens, num_seqs=num_seqs)
        old_logp = logp.detach() if mb["old_logp"] is None else mb["old_logp"]          # None: on-policy
        pg = policy_loss(logp=logp, old_logp=old_logp, advantages=mb["advantages"], mask=mask,
                         clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_c=cfg.clip_c, agg=cfg.loss_agg, **agg)
        entropy = aggregate(ent, mask, mode=cfg.loss_agg, num_tokens=run_tokens, num_seqs=run_seqs)
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
        optimizer="adam", lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay,
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


def _lr_schedule(optimizer, config: ActorConfig):
    """megatron-core's OptimizerParamScheduler for ``config``: linear warmup from 0, then constant, linear or
    cosine down to min_lr at lr_decay_steps. It also sets each param group's weight decay (0 for biases and
    norm weights through megatron's wd_mult)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decays = config.lr_decay_style != "constant"
    if decays and not config.lr_warmup_steps < config.lr_decay_steps:
        raise ActorError(f"lr_decay_steps={config.lr_decay_steps} must exceed lr_warmup_steps={config.lr_warmup_steps} "
                         f"for a {config.lr_decay_style} decay")
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if config.lr_warmup_steps else config.lr, max_lr=config.lr,
        min_lr=config.min_lr if decays else config.lr, lr_warmup_steps=config.lr_warmup_steps,
        lr_decay_steps=config.lr_decay_steps if decays else config.lr_warmup_steps + 1,
        lr_decay_style=config.lr_decay_style, start_wd=config.weight_decay, end_wd=config.weight_decay,
        wd_incr_steps=1, wd_incr_style="constant")


def _broadcast_from_last_stage(x: torch.Tensor) -> torch.Tensor:
    """x as held by the last pipeline stage, on every stage (same shape/dtype everywhere)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return x
    x = x.contiguous()
    dist.broadcast(x, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return x


def _sum_over_dp(x: torch.Tensor) -> torch.Tensor:
    """x summed over the data-parallel ranks (exact where each element is non-zero on one rank only)."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() > 1:
        x = x.contiguous()
        dist.all_reduce(x, group=ps.get_data_parallel_group())
    return x
