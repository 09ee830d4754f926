"""Entry point and the ONE training loop (SPMD over a (tp, pp, dp) Megatron layout).

    sage-megatron train --config configs/toy.yaml algorithm.name=sage run.steps=8
    sage-megatron toy                      # GRPO vs SAGE from the same start, comparison table

The driver validates the config, joins (or starts) Ray and plans every rank and engine over its nodes
(``cluster.py``; refused there when it does not fit), resolves the model (the cached pretrained toy
policy or an HF folder), converts it once to a Megatron dist checkpoint (cached by content), then runs
``run_rank`` on tp*pp*dp Ray rank actors (``rank_actors.py``; in place under torchrun/srun). Every rank runs the same
loop; global rank 0 also owns the rollout pool (Ray + vLLM), the reward, the hinting strategy, the
data iterator and the metrics writer, and broadcasts each step's groups to the other ranks. Several
runs can share one session (``train_runs``: GRPO then SAGE in ``sage-megatron toy``): one start-up of
Ray, the ranks and the engines, each run from its own start weights and seed.

Kept from the paper's recipe: GRPO group advantages, PPO clipped surrogate (asymmetric + dual clip,
token mean), one PPO epoch over ``optim.mini_batches`` mini-batches, old log-probs recomputed by the
actor, on-policy rollouts (the pool refuses stale weights: ``min_version``). The algorithm (GRPO,
SAGE, SAGE-light, hint source, trigger, replace/mix) is a hinting object chosen by config; the loop
has no algorithm branches.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sage_megatron.config import (Config, fp8_options, lr_decay_steps, validate, validate_for_device,
                                   validate_for_model, validate_one_session)
from sage_megatron.metrics import EVALS_FILE
from sage_megatron.run_inputs import (converted_checkpoint, eval_data_path, load_eval_rows, load_train_rows,
                                       resolve_model, template_dir, train_data_path)

# ============================================================================ the loop


def training_loop(t: "Trainer") -> dict:
    """next batch -> rollout + reward + hints -> advantages -> old/ref log-probs -> update -> weight sync
    -> log -> checkpoint. Same call sequence on every rank; rank-0-only work is inside the helpers."""
    from sage_megatron.algo.advantages import step_advantages
    from sage_megatron.algo.metrics_math import step_group_metrics
    from sage_megatron.metrics import PhaseTimer
    from sage_megatron.rollout.weight_sync import sync_weights

    cfg = t.cfg
    for step in range(t.state.step + 1, cfg.run.steps + 1):
        timer = PhaseTimer()
        with timer.phase("step"):
            out = t.broadcast(t.rollout_with_hints(step) if t.rank == 0 else None)    # rank 0 samples
            with timer.phase("advantages"):
                batches = t.mini_batches(out.groups, step_advantages(out.groups, cfg.algorithm,
                                                                          max_tokens=cfg.rollout.max_tokens))
            with timer.phase("logprob"):
                batches, logp_gap = t.old_logprobs(batches)
            with timer.phase("ref_logprob"):
                if t.ref is not None:
                    batches = [replace(b, ref_logp=t.ref.compute_logprobs(b)) for b in batches]
            with timer.phase("update"):
                updates = [t.actor.train_step(b) for b in batches]
            with timer.phase("weight_sync"):
                t.state.weight_version = sync_weights(t.actor.model, arch=t.actor.arch, pool=t.pool)["version"]
            t.solved.update(seen=[g.row_index for g in out.groups], solved=out.solved_rows)
        t.state.step = step
        t.log(step, {**out.metrics, **step_group_metrics(out.groups), **t.solved.metrics(),
                     **logp_gap, **mean_of(updates, prefix="train/"), **timer.metrics(), **t.maybe_evaluate(step)})
        t.maybe_checkpoint(step)
        if t.stop_requested():          # SIGTERM / Slurm's time-limit warning: save, exit for requeue
            t.checkpoint_for_requeue(step)
            break
    return t.finish()


def mean_of(dicts: list[dict], *, prefix: str) -> dict[str, float]:
    """Per-key mean of the mini-batch update metrics."""
    return {prefix + k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]} if dicts else {}


# ============================================================================ rank-level components


@dataclass
class LoopState:
    """What the loop itself carries across steps (checkpointed with the components' states)."""

    step: int = 0
    weight_version: int = 0
    evals: dict = field(default_factory=dict)   # {"start": {...}, "final": {...}}


class StepSampler:
    """The pool as the hinting object's Sampler for one step: seeded per step and per call (so a resumed
    run draws exactly what a straight run draws), on-policy (min_version = last synced version)."""

    def __init__(self, pool, *, seed: int, step: int, min_version: int) -> None:
        self.pool, self.base, self.min_version, self.calls = pool, seed * 1_000_003 + step * 10_007, min_version, 0

    def generate(self, requests, sampling):
        return self.generate_batches([(requests, sampling)])

    def generate_batches(self, batches):
        self.calls += 1
        seeded = [(requests, replace(sampling, seed=self.base + self.calls * 100_003 + (sampling.seed or 0)))
                  for requests, sampling in batches]
        return self.pool.generate_batches(seeded, min_version=self.min_version)


class Trainer:
    """Everything one rank holds. Rank 0 additionally holds pool, hinting, data, writer."""

    def __init__(self, cfg: Config, paths: dict, engine_ips: list[str] | None = None, *, pool=None) -> None:
        """``pool`` (rank 0): the rollout pool of an earlier run in this session, to reuse (its engines get
        this run's start weights); None starts one."""
        import torch.distributed as dist

        from sage_megatron import checkpoint as ck
        from sage_megatron.actor.worker import ActorConfig, MegatronActor, build_reference
        from sage_megatron.algo.metrics_math import SolvedTracker
        from sage_megatron.parallel.layout import ParallelLayout

        from sage_megatron.preemption import stop_file

        self.cfg, self.paths, self.engine_ips = cfg, paths, engine_ips
        self.stop_file, self.preempted_at, self.saved_step = stop_file(cfg.run.dir), None, None
        self.rank = dist.get_rank()
        self.layout = ParallelLayout(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        resume_from = ck.latest_checkpoint(self.ckpt_root) if cfg.run.resume else None
        a, o = cfg.algorithm, cfg.optim
        actor_cfg = ActorConfig(
            ckpt_dir=str(resume_from or paths["base_ckpt"]), layout=self.layout, dtype=cfg.model.dtype, lr=o.lr,
            lr_warmup_steps=o.lr_warmup_steps, lr_decay_style=o.lr_decay_style, lr_decay_steps=lr_decay_steps(cfg),
            min_lr=o.min_lr, weight_decay=o.weight_decay, grad_clip=o.grad_clip,
            micro_batch_size=cfg.parallel.micro_batch_size,
            max_tokens_per_micro_batch=cfg.parallel.max_tokens_per_micro_batch,
            group_by_length=cfg.parallel.group_by_length,
            clip_low=a.clip_low, clip_high=a.clip_high, clip_c=a.clip_c, kl_coef=a.kl_coef, kl_kind=a.kl_kind,
            entropy_coef=a.entropy_coef, loss_agg=a.loss_agg, use_te=cfg.model.use_te, fp8=fp8_options(cfg.model))
        self.actor = MegatronActor(actor_cfg)
        self.ref = build_reference(replace(actor_cfg, ckpt_dir=str(paths["base_ckpt"])))
        self.state, self.solved = LoopState(), SolvedTracker()
        self.pool = self.hinting = self.data = self.writer = self.eval_rows = None
        saved = ck.load_loop_state(resume_from, layout=self.layout) if resume_from else None
        if resume_from:
            ck.load_rank_state(resume_from, actor=self.actor)
            self.state = LoopState(step=saved["step"], weight_version=saved["weight_version"],
                                   evals=saved.get("evals", {}))
            self.solved.load_state_dict(saved["solved"])
        if self.rank == 0:
            self._start_rank0(saved, pool)
        # fresh engines load the HF start weights; a resumed run's actor holds a checkpoint's, and a reused
        # pool holds the previous run's end weights: then the engines get the actor's (collective)
        self.pad_id, engines_behind = self.broadcast((self.pad_id, bool(resume_from) or pool is not None)
                                                     if self.rank == 0 else None)
        if engines_behind:
            from sage_megatron.rollout.weight_sync import sync_weights

            self.state.weight_version = sync_weights(
                self.actor.model, arch=self.actor.arch, pool=self.pool,
                version=None if pool is not None else self.state.weight_version)["version"]
        self.resumed_from = str(resume_from) if resume_from else None
        if not resume_from and cfg.eval.at_start:
            self.maybe_evaluate(0)

    def _start_rank0(self, saved: dict | None, pool) -> None:
        from sage_megatron.algo.templates import chat_encoder
        from sage_megatron.metrics import MetricsWriter
        from sage_megatron.rollout.weight_sync import start_rollout_pool_in_trainer
        from sage_megatron.tasks.data import EpochIterator

        cfg = self.cfg
        self.pool = pool if pool is not None else start_rollout_pool_in_trainer(
            rollout_pool_config(cfg, hf_dir=self.paths["hf_dir"], engine_ips=self.engine_ips))
        tok = self.pool.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.encode = chat_encoder(tok)
        self.reward = build_reward(cfg)
        self.hinting = build_hinting(cfg, encode=self.encode)
        self.data = EpochIterator(load_train_rows(cfg, self.paths), batch_size=cfg.data.batch_size,
                                  seed=cfg.run.seed, shuffle=cfg.data.shuffle)
        if cfg.eval.data:
            self.eval_rows = load_eval_rows(self.paths["eval_data"], max_prompts=cfg.eval.max_prompts, seed=cfg.data.seed,
                                            difficulty_key=cfg.eval.difficulty_key)
        if saved:
            self.data.load_state_dict(saved["data"])
            self.hinting.load_state_dict(saved["hinting"])
        else:
            (self.run_dir / EVALS_FILE).unlink(missing_ok=True)    # a fresh run: a fresh learning curve
        start = self.state.step
        self.writer = MetricsWriter(self.run_dir, tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                                    total_steps=cfg.run.steps, start_step=start)
        self.t_start = time.perf_counter()

    # -- phases used by the loop --

    def broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def rollout_with_hints(self, step: int):
        rows = self.data.next_batch()
        sampler = StepSampler(self.pool, seed=self.cfg.run.seed, step=step, min_version=self.state.weight_version)
        return self.hinting.apply(rows, step=step, sampler=sampler, reward_fn=self.reward)

    def mini_batches(self, groups, advantages) -> list:
        from sage_megatron.actor.batch import batch_from_groups

        k = self.cfg.optim.mini_batches
        size = -(-len(groups) // k)
        return [batch_from_groups(groups[i:i + size], advantages, pad_id=self.pad_id,
                                  max_len=self.cfg.rollout.max_model_len, loss_context=self.cfg.algorithm.loss_context)
                for i in range(0, len(groups), size)]

    def old_logprobs(self, batches: list) -> tuple[list, dict[str, float]]:
        """pi_old for each mini-batch (skipped when the step has one update, see actor.old_logprobs), and how
        far the engine's sampling log-probs are from the actor's own (a sync or numerics mismatch shows here)."""
        from sage_megatron.actor.batch import rows_response_mask
        from sage_megatron.algo.metrics_math import logprob_gap

        out, gaps = [], []
        for b in batches:
            old = self.actor.old_logprobs(b, only_update=len(batches) == 1)
            if old is not None and b.behavior is None:
                computed = rows_response_mask(b, self.actor.rows_to_run(b))   # pi_old's rows only
                gaps.append(logprob_gap(b.old_logp, old, computed))
            out.append(replace(b, old_logp=old))
        return out, (mean_of(gaps, prefix="rollout/") if gaps else {})

    def log(self, step: int, metrics: dict) -> None:
        if self.rank == 0:
            hinted = {k: v for k, v in metrics.items() if k.startswith(("hint/hinted_l", "hint/level_l"))}
            metrics["hint/hinted_total"] = sum(v for k, v in hinted.items() if not k.endswith("_l0"))
            metrics["weight_version"] = self.state.weight_version
            self.writer.log(step, metrics)

    def maybe_evaluate(self, step: int) -> dict[str, float]:
        """Held-out avg@k (no hints) before the first step, every ``eval.every`` steps and after the last
        (rank 0; others wait): accuracy with its 95% interval over the set and its hard band. Appended to
        run_dir/evals.jsonl (the held-out learning curve) and returned as ``eval/*`` metrics for the step."""
        e = self.cfg.eval
        due = step in (0, self.cfg.run.steps) or (e.every and step % e.every == 0)
        if self.rank != 0 or self.eval_rows is None or not due:
            return {}
        from sage_megatron.algo.templates import load_templates
        from sage_megatron.evaluate import avg_at_k

        res = avg_at_k(self.pool, self.eval_rows, templates=load_templates(template_dir(self.cfg.algorithm.templates)),
                       encode=self.encode, k=e.k, temperature=e.temperature, top_p=e.top_p,
                       max_tokens=self.cfg.rollout.max_tokens, seed=self.cfg.run.seed + 17, reward_fn=self.reward,
                       min_version=self.state.weight_version, hard_min_difficulty=e.hard_min_difficulty)
        if step == 0:
            self.state.evals["start"] = res
        if step == self.cfg.run.steps:
            self.state.evals["final"] = res
        point = {k: v for k, v in res.items() if k != "per_prompt"}
        with (self.run_dir / EVALS_FILE).open("a") as f:
            f.write(json.dumps({"step": step, **point}) + "\n")
        hard = (f", hard band {res['hard_accuracy']:.3f} ± {res['hard_accuracy_ci95']:.3f}"
                if "hard_accuracy" in res else "")
        print(f"[eval step {step}] held-out avg@{e.k} = {res['accuracy']:.3f} ± {res['accuracy_ci95']:.3f}{hard} "
              f"(pass@{e.k} {res['pass_at_k']:.3f}, {res['prompts']} prompts, {res['seconds']:.1f}s)", flush=True)
        return {f"eval/{k}": float(v) for k, v in point.items() if k not in ("k", "seconds")}

    def maybe_checkpoint(self, step: int) -> None:
        every, last = self.cfg.run.checkpoint_every, step == self.cfg.run.steps
        if (every and step % every == 0) or (last and self.cfg.run.export_hf):
            self.save(step)

    def stop_requested(self) -> bool:
        """Whether a stop request exists (rank 0 looks, every rank gets the same answer)."""
        return bool(self.broadcast(self.stop_file.exists() if self.rank == 0 else None))

    def checkpoint_for_requeue(self, step: int) -> None:
        if self.saved_step != step:
            self.save(step)
        self.preempted_at = step
        if self.rank == 0:
            print(f"[train] stop requested: checkpoint of step {step} saved, exiting for requeue", flush=True)

    def save(self, step: int) -> None:
        from sage_megatron import checkpoint as ck

        loop = None
        if self.rank == 0:
            loop = {"weight_version": self.state.weight_version, "evals": self.state.evals,
                    "data": self.data.state_dict(), "hinting": self.hinting.state_dict(),
                    "solved": self.solved.state_dict()}
        path = ck.save_checkpoint(self.ckpt_root, step, actor=self.actor, base_ckpt=self.paths["base_ckpt"],
                                  loop_state=loop, layout=self.layout, keep=self.cfg.run.keep_checkpoints)
        self.last_checkpoint, self.saved_step = path, step

    def finish(self) -> dict:
        if self.rank != 0:
            return {}
        self.writer.close()
        return {"run_dir": str(self.run_dir), "steps": self.state.step, "evals": self.state.evals,
                "preempted": self.preempted_at is not None,
                "never_solved_share": self.solved.never_solved_share(), "resumed_from": self.resumed_from,
                "train_seconds": time.perf_counter() - self.t_start}


def run_rank(runs: list[tuple[Config, dict]], engine_ips: list[str] | None = None) -> list[dict]:
    """One rank of the SPMD trainer (a Ray rank actor, or one torchrun/srun task): the session's runs
    ``[(cfg, paths), ...]`` back to back, each a fresh Trainer from its own start weights and seed, all
    sharing this process's torch.distributed groups and (rank 0) one rollout pool. Stops after a run that
    was stopped on request. Rank 0 returns the runs' results; other ranks, empty dicts."""
    import gc

    import torch.distributed as dist

    from sage_megatron.parallel.distributed import describe_rank, init_parallel, seed_parallel
    from sage_megatron.parallel.layout import ParallelLayout

    first = runs[0][0]
    init_parallel(ParallelLayout(first.parallel.tp, first.parallel.pp, first.parallel.dp), seed=first.run.seed,
                  timeout_s=first.cluster.collective_timeout_s)
    print(f"[actor] {describe_rank()}", flush=True)
    pool, results = None, []
    try:
        for cfg, paths in runs:
            seed_parallel(cfg.run.seed)        # each run draws what it would draw in a session of its own
            if len(runs) > 1 and dist.get_rank() == 0:
                print(f"[run] {cfg.algorithm.name}: {cfg.run.steps} steps into {cfg.run.dir}", flush=True)
            trainer = Trainer(cfg, paths, engine_ips, pool=pool)
            pool = trainer.pool
            results.append(training_loop(trainer))
            stopped = trainer.preempted_at is not None
            del trainer               # this run's model and optimizer go before the next run builds its own
            gc.collect()
            if stopped:
                break
        return results
    finally:
        if pool is not None:
            pool.shutdown()
        from sage_megatron.procs import reap_children

        reap_children()


# ============================================================================ building from config


def rollout_pool_config(cfg: Config, *, hf_dir: str, engine_ips=None):
    """The rollout pool the config asks for (engines on ``engine_ips`` when the ranks' ledger placed them)."""
    from sage_megatron.rollout.pool import RolloutPoolConfig
    from sage_megatron.rollout.vllm_engine import engine_config_for
    from sage_megatron.rollout.weight_transport import TransportConfig

    r = cfg.rollout
    return RolloutPoolConfig(
        engine=engine_config_for(r, model_dir=str(hf_dir), seed=cfg.run.seed),
        num_engines=r.num_engines, ray_address=r.ray_address, placement=r.placement,
        cpus_per_engine=r.cpus_per_engine, engine_ips=tuple(engine_ips or ()), verbose=False,
        transport=TransportConfig(kind=r.transport, colocated=False))


def build_reward(cfg: Config):
    """The reward function the config asks for: math-verify on the extracted answer, in bounded workers."""
    from sage_megatron.algo.reward import batch_math_reward

    rw = cfg.reward
    return functools.partial(batch_math_reward, extractor=rw.extractor, workers=rw.workers,
                             timeout_s=rw.timeout_s, batch_timeout_s=rw.batch_timeout_s)


def build_hinting(cfg: Config, *, encode):
    """The hinting strategy (GRPO / SAGE / SAGE-light) and hint source the config asks for."""
    from sage_megatron.algo import hint_sources as HS
    from sage_megatron.algo import strategies as S
    from sage_megatron.algo.templates import load_templates
    from sage_megatron.types import SamplingConfig

    a, r = cfg.algorithm, cfg.rollout
    templates = load_templates(template_dir(a.templates))
    settings = S.RolloutSettings(templates=templates, encode=encode, sampling=SamplingConfig(
        n=r.group_size, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens))
    if a.name == "grpo":
        return S.GrpoHinting(settings)
    if a.hint_source == "policy":
        source = HS.PolicyHintSource(templates=templates, encode=encode, levels=a.levels, sampling=SamplingConfig(
            n=1, temperature=a.hint_temperature, max_tokens=a.hint_max_tokens), max_retries=a.hint_max_retries,
            retry_temperature=a.hint_retry_temperature)
    else:
        source = HS.ReferencePrefixHintSource(levels=a.levels, fractions=a.prefix_fractions)
    if a.name == "sage":
        return S.SageHinting(settings, hint_source=source, levels=a.levels, trigger=a.trigger,
                             trigger_threshold=a.trigger_threshold, mode=a.mode, mix_count=a.mix_count,
                             loss_context=a.loss_context, speculative_hints=a.hint_ahead,
                             speculative_levels=a.levels_ahead)
    schedule = S.SageLightSchedule(levels=a.levels, min_threshold=a.light_min_threshold,
                                   max_threshold=a.light_max_threshold, escalate_only=a.light_escalate_only)
    return S.SageLightHinting(settings, hint_source=source, schedule=schedule, loss_context=a.loss_context)


def prepare(cfg: Config) -> dict:
    """Everything before the ranks start: validation, model, data files, converted checkpoint."""
    validate(cfg)
    hf_dir = resolve_model(cfg)
    validate_for_model(cfg, hf_dir)
    cache = Path(cfg.model.cache_dir)
    eval_data = str(eval_data_path(cfg.eval.data, cache, seed=cfg.data.seed)) if cfg.eval.data else ""
    paths = {"hf_dir": str(hf_dir), "base_ckpt": str(converted_checkpoint(cfg, hf_dir)),
             "train_data": str(train_data_path(cfg, cache)), "eval_data": eval_data}
    Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
    from sage_megatron.config import to_dict

    (Path(cfg.run.dir) / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    return paths


def train(cfg: Config) -> dict:
    """Validate, prepare, place every rank over the Ray cluster and run it; returns rank 0's result."""
    return train_runs([cfg])[0]


def train_runs(cfgs: list[Config]) -> list[dict]:
    """Several runs back to back in ONE session: the Ray cluster, the rank processes and the rollout engines
    start once (each run syncs its start weights into the engines), which saves their start-up per run
    (``sage-megatron toy``: GRPO then SAGE; ``bench/sage_vs_grpo.py``: every algorithm of a seed). The runs
    must agree on what builds the session (config.SESSION_FIELDS). Rank 0's results, in order; fewer than
    ``cfgs`` when a run was stopped on request (the rest did not start)."""
    from sage_megatron.parallel.launch import launched_externally
    from sage_megatron.preemption import stop_file, stop_on_signals

    for cfg in cfgs:
        validate(cfg)
    validate_one_session(cfgs)
    stops = [stop_file(cfg.run.dir) for cfg in cfgs]
    for stop in stops:
        stop.unlink(missing_ok=True)     # a request that the previous (requeued) run acted on
    if launched_externally():
        runs = [(cfg, prepare(cfg)) for cfg in cfgs]
        with stop_on_signals(*stops):
            return run_rank(runs)
    results = run_on_cluster(cfgs)
    for cfg, result in zip(cfgs, results):
        if cfg.run.export_hf and not result["preempted"]:
            from sage_megatron.checkpoint import export_hf, latest_checkpoint

            result["hf_export"] = str(export_hf(latest_checkpoint(Path(cfg.run.dir) / "checkpoints"),
                                                Path(cfg.run.dir) / "hf"))
    return results


def run_on_cluster(cfgs: list[Config]) -> list[dict]:
    """Plan ranks and engines over the Ray cluster's nodes (one ledger, refused before anything starts when
    it does not fit), prepare the inputs, then run ``run_rank`` on a Ray actor per rank; rank 0's results."""
    import math

    from sage_megatron.cluster import plan_cluster
    from sage_megatron.preemption import stop_file, stop_on_signals
    from sage_megatron.rank_actors import ray_cluster, run_on_ranks, say
    from sage_megatron.rollout.placement import ray_cluster_device

    cfg = cfgs[0]                        # the runs agree on everything used here (validate_one_session)
    p, c, r = cfg.parallel, cfg.cluster, cfg.rollout
    world = p.tp * p.pp * p.dp
    local_cpus = math.ceil(world * c.cpus_per_rank + r.num_engines * r.cpus_per_engine)
    # (stop handlers after ray.init, which installs its own SIGTERM handler)
    with (ray_cluster(r.ray_address, local_cpus=local_cpus) as nodes,
          stop_on_signals(*[stop_file(each.run.dir) for each in cfgs])):
        device = ray_cluster_device()
        for each in cfgs:
            validate_for_device(each, device)   # engines are placed apart from the ranks: not colocated
        plan = plan_cluster(world_size=world, nodes=nodes, device=device, ranks_per_node=c.ranks_per_node,
                            cpus_per_rank=c.cpus_per_rank, num_engines=r.num_engines, cpus_per_engine=r.cpus_per_engine,
                            placement=r.placement)
        for line in plan.lines():
            say(line)
        runs = [(each, prepare(each)) for each in cfgs]
        return run_on_ranks(run_rank, (runs, plan.engine_ips()), plan=plan)[0]
