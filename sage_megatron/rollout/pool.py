"""Rollout pool: K vLLM engines as Ray actors, fault-tolerant generation, in-place weight sync.

    pool = RolloutPool(RolloutPoolConfig(engine=EngineConfig(model_dir=...), num_engines=2))
    out = pool.generate(requests, SamplingConfig(n=8), min_version=pool.version)  # {uid: [Sample]*n}
    pool.update_weights(hf_named_tensors, version=step + 1)                       # every engine
    lps = pool.prompt_logprobs([ids, ...])                                         # --check-weight-sync
    pool.shutdown()

Ray: joined when ``ray_address`` is set, or when it is None and ``$RAY_ADDRESS`` is (the Slurm
scripts export it); otherwise (or with ``ray_address="local"``) started locally
(``ray.init(num_cpus=...)``). Engines live in one placement group: a CPU bundle per engine, or
``tensor_parallel_size`` GPU bundles per engine. ``placement`` says where (``plan_placement``):
"pack" lets Ray's PACK strategy choose; "spread" pins engine k to the k-th alive node (head node
first, then by IP; round-robin when there are more engines than nodes), all bundles of one engine
on the same node; "auto" (default) is spread on a multi-node cluster, pack on one node. At start
the pool prints the cluster's nodes and, as each engine becomes ready, the node it runs on
(``[rollout] ...`` lines on stderr, also with ``verbose=False``; ``show_placement=False`` mutes them).

Generation: requests are spread over the engines by count, every request asks vLLM for its n
samples at once, and results come back keyed by ``uid`` (never by position). Sampling seeds are
per request (``SamplingConfig.seed + index of the request in the call``), so a result does not
depend on which engine drew it, nor on a retry. ``generate_batches`` runs several
``(requests, sampling)`` batches in one call, side by side in the engines' continuous batching
(SAGE writes its hints during the unhinted rollout that way); a request's index then counts
across the batches in order, so a one-batch call seeds exactly as ``generate``.

Fault tolerance: while a call runs, the pool polls every engine. An engine has failed when its
actor dies (process killed), its vLLM engine raises (e.g. EngineDeadError after a vLLM process was
killed), or it makes no progress for ``hang_timeout_s`` while it has requests. A failed engine is
killed (actor, then any of its vLLM processes still alive, by pid), restarted from the model
directory and given the CURRENT weights again (the last update's buckets kept in the Ray object
store, or ``restore_weights()``); its unfinished requests are re-issued at once to the healthy
engines (to the restarted one if none is healthy). A uid is accepted exactly once. Per call, each
engine may be restarted ``max_restarts`` times and each request issued ``max_attempts`` times;
beyond that the call raises :class:`RolloutEngineError` naming the engine and the cause. A call
returns only when every engine is healthy again, at the pool's weight version.

Weights: ``update_weights`` packs the trainer's ``(hf_name, tensor)`` stream into buckets of at most
``bucket_bytes`` and loads each bucket into every engine in place (``weight_transport.py``); the
engines' version then becomes ``version``. Sender-side extra private memory: about one bucket. The
CPU transport's slot files (one per bucket index, reused by every update) hold one model copy in
/dev/shm; with ``keep_last_weights`` (default) they, plus object-store copies for engines on other
nodes, are what a restarted engine is given; the previous version's copy is dropped when the next
update starts.
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from sage_megatron.rollout.errors import RolloutEngineError, StaleWeightsError, short_error
from sage_megatron.rollout.lifecycle import EngineLifecycle, EngineSlot
from sage_megatron.rollout.placement import PLACEMENTS, PlacementPlan, ray_address_to_join, split_even
from sage_megatron.rollout.vllm_engine import EngineConfig
from sage_megatron.rollout.weight_transport import (
    DEFAULT_BUCKET_BYTES,
    TransportConfig,
    iter_buckets,
    make_transport,
    select_transport,
    tensor_nbytes,
    vllm_weight_transfer_backend,
)
from sage_megatron.types import RolloutRequest, Sample, SamplingConfig

FINISH_REASONS = ("stop", "length")



@dataclass(frozen=True)
class RolloutPoolConfig:
    """The rollout pool: how many engines, where, and how failures are handled."""

    engine: EngineConfig
    """Start-up parameters shared by every engine (model dir, dtype, max_model_len, kv-cache GiB,
    seed, enforce_eager, tensor_parallel_size, ...)."""
    num_engines: int = 2
    """K engines; each is one vLLM instance (data parallel across engines)."""
    ray_address: str | None = None
    """Join this Ray cluster ("auto", "ip:port"); None: join ``$RAY_ADDRESS`` when it is set, else
    start a local Ray with ``ray_num_cpus``; "local": always start a local Ray."""
    placement: str = "auto"
    """Where the engines go: "pack" (Ray's PACK strategy), "spread" (engine k pinned to the k-th
    alive node, head first, round-robin), "auto" (spread when the cluster has more than one alive
    node, else pack). See ``plan_placement``."""
    engine_ips: tuple[str, ...] = ()
    """The node (Ray address) of each engine, decided with the trainer's ranks in one ledger
    (``sage_megatron.cluster``); when set it replaces ``placement``."""
    show_placement: bool = True
    """Print the Ray cluster's nodes and each engine's node ("[rollout] ..." lines), even when not verbose."""
    ray_num_cpus: int | None = None
    """CPUs of the local Ray (None: num_engines * cpus_per_engine)."""
    ray_log_to_driver: bool = False
    """Forward the engines' own vLLM log lines to this process (noisy; for debugging)."""
    cpus_per_engine: float = 1.0
    """CPU bundle per engine (CPU engines) or per GPU bundle (GPU engines)."""
    split_cpu_cores: bool = True
    """CPU engines on a local Ray: bind engine k's OpenMP threads to its own slice of this
    machine's cores (else every engine binds the same cores)."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """How weight buckets reach the engines (see weight_transport.py)."""
    keep_last_weights: bool = True
    """Keep the last update's buckets (CPU transport: its slot files / object-store copies) for restarted engines."""
    hang_timeout_s: float = 120.0
    """An engine with requests pending and no completed step for this long is restarted."""
    rpc_timeout_s: float = 60.0
    """An actor that does not answer a control call for this long is treated as dead."""
    start_timeout_s: float = 900.0
    """An engine not ready this long after its launch counts as failed (restart or error)."""
    max_restarts: int = 2
    """Restarts allowed per engine within one call before the call fails."""
    max_attempts: int = 3
    """Times one request may be issued within one call (first try included)."""
    poll_interval_s: float = 0.05
    """Sleep between polls of the engines when nothing finished."""
    verbose: bool = True
    """Print start-up / failure / restart lines to stderr."""


@dataclass
class _Call:
    """Bookkeeping of one ``generate`` call."""

    by_uid: dict[str, RolloutRequest]
    seeds: dict[str, int | None]
    sampling_of: dict[str, dict[str, Any]]                        # uid -> the engine's sampling fields
    results: dict[str, list[Sample]] = field(default_factory=dict)
    attempts: Counter = field(default_factory=Counter)
    assigned: dict[int, set[str]] = field(default_factory=dict)   # engine -> uids in flight
    jobs: dict[int, list[int]] = field(default_factory=dict)      # engine -> its job ids
    waiting: list[str] = field(default_factory=list)              # uids that need an engine
    restarts: Counter = field(default_factory=Counter)            # engine -> restarts this call


class RolloutPool(EngineLifecycle):
    """K vLLM engines behind one ``generate`` / ``update_weights`` / ``prompt_logprobs`` API."""

    def __init__(
        self,
        config: RolloutPoolConfig,
        *,
        restore_weights: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
    ):
        """Start Ray (or join it), the placement group and the engines; blocks until all are ready.

        ``restore_weights``: returns the current ``(hf_name, tensor)`` stream again; used to bring
        a restarted engine to the current version when no copy of the last update is kept.
        """
        import ray

        if config.num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {config.num_engines}")
        self.config = config
        self.restore_weights = restore_weights
        self.version = 0
        self._broken_update: str | None = None
        self._owns_ray = False
        self._job_ids = itertools.count(1)
        self._kept_refs: list[Any] = []
        self._kept_version = 0
        self._tokenizer = None
        self._t0 = time.monotonic()
        self._pg = None
        self._placement: PlacementPlan | None = None
        self.slots: list[EngineSlot] = []

        if config.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {config.placement!r}")
        self._address = ray_address_to_join(config.ray_address, os.environ)
        if not ray.is_initialized():
            if self._address:
                ray.init(address=self._address, log_to_driver=config.ray_log_to_driver)
            else:
                num_cpus = config.ray_num_cpus or max(1, int(config.num_engines * config.cpus_per_engine))
                ray.init(address="local" if os.environ.get("RAY_ADDRESS") else None, num_cpus=num_cpus,
                         include_dashboard=False, log_to_driver=config.ray_log_to_driver)
                self._owns_ray = True
        try:
            self.device = self._detect_device()
            self._transport_name = select_transport(config.transport, device=self.device)
            self.transport = make_transport(config.transport, device=self.device,
                                            tensor_parallel_size=config.engine.tensor_parallel_size)
            self._engine_cfg = replace(
                config.engine, device=self.device, own_log=not config.ray_log_to_driver,
                weight_transfer_backend=vllm_weight_transfer_backend(self._transport_name))
            self._cpu_binds = self._plan_cpu_binding()
            self._pg = self._make_placement_group()
            self.slots = [EngineSlot(index=k) for k in range(config.num_engines)]
            self._say(f"starting {config.num_engines} vLLM engine(s): model={config.engine.model_dir} "
                      f"dtype={config.engine.dtype} tp={config.engine.tensor_parallel_size} "
                      f"device={self.device} transport={self._transport_name}")
            for slot in self.slots:
                self._launch(slot)
            self._wait_ready(self.slots)
            if self._transport_name != "cpu":
                self.transport.setup([s.actor for s in self.slots])
        except BaseException:
            self.shutdown()
            raise

    # ================================================================== generation
    def generate(
        self,
        requests: Sequence[RolloutRequest],
        sampling: SamplingConfig,
        *,
        min_version: int | None = None,
    ) -> dict[str, list[Sample]]:
        """``sampling.n`` samples per request, keyed by uid (see the module docstring for failures).

        ``min_version`` (on-policy mode): refuse with :class:`StaleWeightsError` if any engine
        holds weights older than this version.
        """
        return self.generate_batches([(requests, sampling)], min_version=min_version)

    def generate_batches(
        self,
        batches: Sequence[tuple[Sequence[RolloutRequest], SamplingConfig]],
        *,
        min_version: int | None = None,
    ) -> dict[str, list[Sample]]:
        """Several ``(requests, sampling)`` batches in one call, decoded side by side; keyed by uid.

        The same as one ``generate`` per batch, except for the seeds (a request's index counts across
        the batches) and the wall time: no batch waits for another to finish.
        """
        requests = [r for batch, _ in batches for r in batch]
        uids = [r.uid for r in requests]
        if len(set(uids)) != len(uids):
            dupes = sorted(u for u, c in Counter(uids).items() if c > 1)
            raise ValueError(f"duplicate uids in one generate call: {dupes[:5]}"
                             f"{' ...' if len(dupes) > 5 else ''} ({len(dupes)} uids repeated); "
                             f"results are keyed by uid, so each request needs its own")
        for _, sampling in batches:
            if sampling.n < 1 or sampling.max_tokens < 1:
                raise ValueError(f"sampling needs n >= 1 and max_tokens >= 1, got {sampling}")
        self._check_usable()
        if any(s.state != "ready" for s in self.slots):
            self._recover_all()   # an engine lost by an earlier failed call
        self._check_version(min_version)
        if not requests:
            return {}
        seeds, sampling_of = {}, {}
        for batch, sampling in batches:
            fields = {"n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p,
                      "max_tokens": sampling.max_tokens, "stop": tuple(sampling.stop)}
            for r in batch:   # len(seeds): the request's index in the whole call
                seeds[r.uid] = None if sampling.seed is None else sampling.seed + len(seeds)
                sampling_of[r.uid] = fields
        call = _Call(
            by_uid={r.uid: r for r in requests},
            seeds=seeds,
            sampling_of=sampling_of,
            assigned={s.index: set() for s in self.slots},
            jobs={s.index: [] for s in self.slots},
            waiting=list(uids),
        )
        try:
            while len(call.results) < len(uids):
                self._advance_restarts(call.restarts)   # restarted engines: weights first, then work
                self._dispatch_waiting(call)
                progressed = False
                for slot in self.slots:
                    if slot.state == "ready" and call.jobs[slot.index]:
                        progressed |= self._poll_engine(call, slot)
                if not progressed:
                    time.sleep(self.config.poll_interval_s)
        except BaseException:
            self._cancel_jobs(call)
            raise
        while any(s.state == "starting" for s in self.slots):  # return with every engine healthy
            self._advance_restarts(call.restarts)
            time.sleep(0.2)
        return {u: call.results[u] for u in uids}

    def _dispatch_waiting(self, call: _Call) -> None:
        """Hand waiting uids to the healthy engines, least loaded first, in balanced shares."""
        healthy = sorted((s for s in self.slots if s.state == "ready"), key=lambda s: len(call.assigned[s.index]))
        if not call.waiting or not healthy:
            return
        batch, call.waiting = call.waiting, []
        for slot, share in zip(healthy, split_even(batch, len(healthy))):
            if share:
                self._issue(call, slot, share)

    def _issue(self, call: _Call, slot: EngineSlot, batch: list[str]) -> None:
        import ray

        for u in batch:
            call.attempts[u] += 1
            if call.attempts[u] > self.config.max_attempts:
                raise RolloutEngineError(
                    f"request {u!r} was issued {self.config.max_attempts} times (max_attempts) without "
                    f"finishing; last failure: engine {slot.index}: {slot.last_error or 'none recorded'}")
        shares: dict[tuple, list[str]] = {}   # one engine job per sampling, in request order
        for u in batch:
            shares.setdefault(tuple(call.sampling_of[u].items()), []).append(u)
        for i, share in enumerate(shares.values()):
            job_id = next(self._job_ids)
            items = [(u, list(call.by_uid[u].prompt_ids), call.seeds[u]) for u in share]
            try:
                ray.get(slot.actor.submit.remote(job_id, items, call.sampling_of[share[0]]),
                        timeout=self.config.rpc_timeout_s)
            except Exception as exc:  # it died since the last poll: take the rest back, restart it
                unsent = [u for rest in list(shares.values())[i:] for u in rest]
                for u in unsent:
                    call.attempts[u] -= 1
                call.waiting.extend(unsent)
                self._engine_failed(call, slot, f"submit failed: {short_error(exc)}")
                return
            call.jobs[slot.index].append(job_id)
            call.assigned[slot.index].update(share)

    def _poll_engine(self, call: _Call, slot: EngineSlot) -> bool:
        """Collect finished requests from one engine; detect death / errors / hangs."""
        import ray

        try:
            st = ray.get(slot.actor.poll.remote(call.jobs[slot.index]), timeout=self.config.rpc_timeout_s)
        except Exception as exc:  # RayActorError (process gone) or GetTimeoutError
            st = {"error": f"actor unreachable: {short_error(exc)}", "results": [], "done_jobs": []}
        progressed = False
        for res in st["results"]:
            u = res["key"]
            if u in call.assigned[slot.index] and u not in call.results:  # exactly once
                call.results[u] = self._samples(call.by_uid[u], res)
                call.assigned[slot.index].discard(u)
                progressed = True
        call.jobs[slot.index] = [j for j in call.jobs[slot.index] if j not in st["done_jobs"]]
        cause = st.get("error")
        if not cause and st.get("idle_s", 0.0) > self.config.hang_timeout_s:
            cause = (f"no progress for {st['idle_s']:.0f} s with requests pending "
                     f"(hang_timeout_s={self.config.hang_timeout_s:g})")
        if cause:
            if st.get("processes"):
                cause += f" [{st['processes']}]"
            self._engine_failed(call, slot, cause)
        return progressed

    def _engine_failed(self, call: _Call, slot: EngineSlot, cause: str) -> None:
        orphans = sorted(call.assigned[slot.index])
        call.assigned[slot.index].clear()
        call.jobs[slot.index] = []
        call.waiting.extend(orphans)
        self._say(f"engine {slot.index} failed ({cause}); re-issuing its {len(orphans)} unfinished request(s)")
        self._fail(slot, cause, call.restarts)

    def _cancel_jobs(self, call: _Call) -> None:
        """After a failed call: stop the work still running on healthy engines."""
        import ray

        for slot in self.slots:
            if slot.state != "ready":
                continue
            for job_id in call.jobs[slot.index]:
                try:
                    ray.get(slot.actor.cancel.remote(job_id), timeout=self.config.rpc_timeout_s)
                except Exception:
                    pass

    def requests_from_messages(self, items: Sequence[tuple[str, list[dict[str, str]]]]) -> list[RolloutRequest]:
        """``[(uid, messages), ...]`` -> requests, with the engine tokenizer's chat template."""
        out = []
        for uid, messages in items:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):  # a BatchEncoding in transformers 5
                ids = ids["input_ids"]
            out.append(RolloutRequest(uid=uid, prompt_ids=tuple(int(i) for i in ids)))
        return out

    @property
    def tokenizer(self):
        """The engines' tokenizer (loaded from ``engine.model_dir`` in this process)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.config.engine.model_dir)
        return self._tokenizer

    # ================================================================== weights
    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        version: int,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> dict[str, Any]:
        """Load HF-named tensors into every engine in place; the engines' version becomes ``version``.

        Names not in the stream keep their current values (a partial update is fine). Returns
        ``{version, buckets, tensors, bytes, seconds, transport, engine_load, phases}`` (``engine_load``: how
        the engines load, "in_place" or "layerwise", see vllm_worker_ext.py); ``phases`` splits the wall
        time: ``stream_s`` waiting for ``named_tensors`` (the trainer's gather and name mapping),
        ``send_s`` the transport's hand-off (encode into the slot files or the object store), ``load_s``
        waiting for the engines to load the buckets (with the CPU transport the engines load a bucket while
        the next one is streamed and encoded: only the wait beyond that overlap), ``begin_s``/``finish_s``
        opening and closing their update sessions (finish re-packs pending layers). An engine that dies
        during the update is restarted and brought to the new version afterwards. If the stream itself
        fails (the trainer's generator raises, a name is unknown to the model), the engines hold a mix of
        old and new weights: the pool refuses to generate until an update succeeds.
        """
        import ray

        if version <= self.version:
            raise ValueError(f"weight version must increase: the pool is at {self.version}, got {version}")
        if any(s.state != "ready" for s in self.slots):
            self._recover_all()
        t0 = time.monotonic()
        keep = self.config.keep_last_weights and self.transport.keeps_refs
        self._kept_refs, self._kept_version = [], 0   # drop the previous copy before making the next
        live = [s for s in self.slots if s.state == "ready"]
        stats = {"version": version, "buckets": 0, "tensors": 0, "bytes": 0, "transport": self._transport_name}
        phases = dict.fromkeys(("begin_s", "stream_s", "send_s", "load_s", "finish_s"), 0.0)
        refs = []
        self._broken_update = f"update_weights(version={version}) did not complete"
        try:
            tic = time.perf_counter()
            begun = self.transport.begin([s.actor for s in live])
            live = self._gather(live, begun, "begin weight update")
            stats["engine_load"] = _load_modes(begun)
            phases["begin_s"] += time.perf_counter() - tic
            # With a transport that loads in the background, the engines load bucket i while the trainer's
            # stream and the encoding of bucket i + 1 go on (the two sides run on different cores).
            loading: tuple[list[EngineSlot], list] | None = None   # the bucket the engines are loading
            background = getattr(self.transport, "loads_in_background", False)
            for bucket in iter_buckets(_timed(named_tensors, phases, "stream_s"), bucket_bytes=bucket_bytes):
                tic = time.perf_counter()
                ref, futures = self.transport.send_bucket([s.actor for s in live], bucket)
                sent = time.perf_counter()
                phases["send_s"] += sent - tic
                if background:
                    previous, loading = loading, (live, futures)
                    if previous is not None:
                        live = self._wait_loaded(live, *previous)
                else:
                    live = self._gather(live, futures, "load a weight bucket")
                phases["load_s"] += time.perf_counter() - sent
                if keep and ref is not None:
                    refs.append(ref)
                stats["buckets"] += 1
                stats["tensors"] += len(bucket)
                stats["bytes"] += sum(tensor_nbytes(t) for _, t in bucket)
                del bucket, ref
            if loading is not None:
                tic = time.perf_counter()
                live = self._wait_loaded(live, *loading)
                phases["load_s"] += time.perf_counter() - tic
            tic = time.perf_counter()
            live = self._gather(live, self.transport.finish([s.actor for s in live], version=version),
                                "finish weight update")
            phases["finish_s"] += time.perf_counter() - tic
        except BaseException as exc:
            self._broken_update = (f"update_weights(version={version}) failed after {stats['buckets']} "
                                   f"bucket(s): {short_error(exc)}; the engines hold a mix of old and new weights")
            for s in live:  # close the half-open sessions
                try:
                    ray.get(s.actor.abort_update.remote(), timeout=self.config.rpc_timeout_s)
                except Exception:
                    pass
            raise
        for s in live:
            s.version = version
        self.version = version
        self._broken_update = None
        if keep:
            self._kept_refs, self._kept_version = refs, version
        self._recover_all()   # engines that died during the update: restart + replay
        stats["seconds"] = time.monotonic() - t0
        stats["phases"] = phases
        return stats

    def prompt_logprobs(self, token_id_lists: Sequence[Sequence[int]]) -> list[list[float]]:
        """Per sequence, ``log p(x_t | x_<t)`` for t = 1..len-1 under the engines' current weights.

        vLLM's prompt log-probs (``SamplingParams(prompt_logprobs=0, max_tokens=1)``), spread over
        the engines; for comparing with the trainer (--check-weight-sync).
        """
        import ray

        lists = [[int(t) for t in ids] for ids in token_id_lists]
        for i, ids in enumerate(lists):
            if len(ids) < 2:
                raise ValueError(f"sequence {i} has {len(ids)} token(s); prompt log-probs need at least 2")
        self._check_usable()
        if any(s.state != "ready" for s in self.slots):
            self._recover_all()
        shares = split_even(list(range(len(lists))), len(self.slots))
        futures = [(share, s.actor.prompt_logprobs.remote([lists[i] for i in share]))
                   for s, share in zip(self.slots, shares) if share]
        out: list[list[float]] = [[] for _ in lists]
        for share, fut in futures:
            for i, lp in zip(share, ray.get(fut)):
                out[i] = lp
        return out

    # ================================================================== introspection / shutdown
    def weight_versions(self) -> list[int]:
        """The weight version each engine reports."""
        import ray

        return [ray.get(s.actor.ping.remote())["weight_version"] for s in self.slots]

    def engine_pids(self) -> list[dict[str, Any]]:
        """Per engine: actor pid, vLLM worker pids, child processes and node (tests / debugging)."""
        import ray

        return [ray.get(s.actor.pids.remote()) for s in self.slots]

    def shutdown(self) -> None:
        """Stop every engine and its processes; stop Ray if this pool started it. Idempotent."""
        import ray

        if not ray.is_initialized():
            return
        for slot in self.slots:
            self._kill(slot, graceful=True)
        self._kept_refs = []
        if self._pg is not None:
            try:
                ray.util.remove_placement_group(self._pg)
            except Exception:
                pass
            self._pg = None
        transport = getattr(self, "transport", None)
        if transport is not None:
            try:
                transport.teardown([])
            except Exception:
                pass
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ================================================================== helpers
    def _check_usable(self) -> None:
        if self._broken_update:
            raise RolloutEngineError(f"{self._broken_update}; call update_weights again before sampling")

    def _check_version(self, min_version: int | None) -> None:
        if min_version is None:
            return
        stale = [(s.index, s.version) for s in self.slots if s.version < min_version]
        if stale:
            desc = ", ".join(f"engine {i} has v{v}" for i, v in stale)
            raise StaleWeightsError(f"on-policy generation needs weight version >= {min_version}, but {desc}; "
                                    f"call update_weights(..., version={min_version}) first")

    def _wait_loaded(self, live: list[EngineSlot], sent_to: list[EngineSlot], futures: list) -> list[EngineSlot]:
        """Wait for the loads of an earlier bucket (sent to ``sent_to``); returns those of ``live`` still alive."""
        alive = self._gather(sent_to, futures, "load a weight bucket")
        return [s for s in live if s in alive]

    def _gather(self, slots: list[EngineSlot], futures: list, what: str) -> list[EngineSlot]:
        """Wait for one future per slot; returns the slots still alive.

        A dead actor, or an error on only some engines, marks those engines failed (restarted and
        replayed after the update). The same error on every engine is the input's fault: raise.
        """
        import ray

        alive, errors = [], []
        for slot, fut in zip(slots, futures):
            try:
                ray.get(fut)
                alive.append(slot)
            except ray.exceptions.RayActorError as exc:
                slot.state, slot.last_error = "failed", f"died during {what}: {short_error(exc)}"
                self._say(f"engine {slot.index} {slot.last_error}")
            except Exception as exc:
                errors.append((slot, short_error(exc, 1500)))
        if errors and not alive:
            raise RolloutEngineError(f"{what} failed on every engine; engine {errors[0][0].index}: {errors[0][1]}")
        for slot, err in errors:
            slot.state, slot.last_error = "failed", f"error during {what}: {err}"
            self._say(f"engine {slot.index} {slot.last_error}")
        if slots and not alive:
            raise RolloutEngineError(f"every engine died during {what}")
        return alive

    def _samples(self, req: RolloutRequest, res: dict) -> list[Sample]:
        out = []
        for s in res["samples"]:
            if s["finish_reason"] not in FINISH_REASONS:
                raise RolloutEngineError(f"request {req.uid!r}: unexpected finish reason {s['finish_reason']!r}")
            out.append(Sample(uid=req.uid, prompt_ids=req.prompt_ids, response_ids=s["response_ids"],
                              logprobs=s["logprobs"], finish_reason=s["finish_reason"],
                              weight_version=res["weight_version"], text=s["text"], sample_index=s["index"]))
        return out

    def _say(self, msg: str) -> None:
        if self.config.verbose:
            print(f"[rollout_pool +{time.monotonic() - self._t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _load_modes(begun: list) -> str | None:
    """How the engines that opened their session load (``VLLMEngine.begin_update``: "in_place", "layerwise";
    None for the GPU transports), comma-joined when they differ."""
    import ray

    modes = set()
    for future in begun:
        try:
            modes.add(ray.get(future))
        except Exception:   # that engine failed to begin: _gather has dealt with it
            pass
    return ",".join(sorted(m for m in modes if isinstance(m, str))) or None


def _timed(items: Iterable[Any], phases: dict[str, float], key: str) -> Iterator[Any]:
    """Yield from ``items``, adding the time spent waiting for each item to ``phases[key]``."""
    iterator = iter(items)
    while True:
        tic = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            phases[key] += time.perf_counter() - tic
            return
        phases[key] += time.perf_counter() - tic
        yield item
