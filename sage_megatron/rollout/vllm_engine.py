"""One vLLM engine (``vllm.LLM``) wrapped for use as a Ray actor by the rollout pool.

The class is plain Python; ``pool.py`` makes it a threaded Ray actor
(``ray.remote(VLLMEngine).options(max_concurrency=4, ...)``) so that ``poll`` answers while a
generation runs in the actor's background thread. Nothing here imports Ray or vLLM at module
level: the module imports on any machine.

Generation is asynchronous so that the pool can watch progress and survive a dead or hung engine.
A stepping thread (started with the engine) adds queued requests and calls ``LLMEngine.step()``:

    submit(job_id, items, sampling)  -> queues the requests and returns at once
    poll(job_ids)                    -> requests finished since the last poll, jobs done, seconds
                                        since the engine last completed a step (while busy), the
                                        engine error if any, and the vLLM processes' states
    cancel(job_id)                   -> drops the job; its requests are aborted

Each request carries the pool's key; results come back under that key (never by position).
Weights are updated in a session (``begin_update`` / ``load_bucket`` / ``finish_update``) that
goes to the worker extension (``vllm_worker_ext.py``); the engine's weight version changes only
when a session finishes. GPU transports use vLLM's native weight-transfer calls (``native_*``).
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from sage_megatron.procs import proc_start_time

WORKER_EXTENSION = "sage_megatron.rollout.vllm_worker_ext.SageWorkerExtension"


@dataclass(frozen=True)
class EngineConfig:
    """Start-up parameters of one vLLM engine (every engine of a pool gets the same)."""

    model_dir: str
    """Local HF checkpoint directory (config, safetensors, tokenizer). No hub downloads."""
    dtype: str = "bfloat16"
    """Engine compute dtype: "bfloat16", "float16" or "float32" (use float32 for parity tests)."""
    max_model_len: int = 2048
    """Longest prompt + response, in tokens."""
    kv_cache_gib: int = 1
    """CPU: KV-cache size per engine in GiB (VLLM_CPU_KVCACHE_SPACE; whole GiB, at least 1).
    GPU engines size their KV cache from ``gpu_memory_utilization`` instead."""
    gpu_memory_utilization: float = 0.85
    """GPU: fraction of the GPU memory vLLM may take (weights + KV cache)."""
    seed: int = 0
    """Engine seed; engine k of a pool uses ``seed + k``. Per-request seeds (SamplingConfig.seed)
    make samples reproducible whichever engine draws them."""
    enforce_eager: bool = True
    """No torch.compile / CUDA graphs: fast start-up; on CPU the compiled path gains little."""
    tensor_parallel_size: int = 1
    """GPUs (or CPU worker processes) per engine."""
    device: str = "auto"
    """"cpu", "cuda" or "auto" (cuda when the installed vLLM platform is CUDA)."""
    cpu_threads_bind: str | None = None
    """CPU: cores for this engine's OpenMP threads (VLLM_CPU_OMP_THREADS_BIND, e.g. "0-3" or
    "0-1|2-3" for TP=2). The pool fills it per engine; None keeps vLLM's "auto"."""
    weight_transfer_backend: str | None = None
    """GPU transports: vLLM's native weight-transfer backend ("nccl" or "ipc"); None on CPU."""
    max_num_seqs: int | None = None
    """Cap on sequences decoded together (None: vLLM's default)."""
    own_log: bool = True
    """Write this engine's (and its vLLM processes') output to ``sage-engine-K.log`` in Ray's log
    folder instead of the Ray worker's stdout, which a driver with log_to_driver would print."""
    extra_llm_kwargs: tuple[tuple[str, Any], ...] = ()
    """Further ``vllm.LLM`` keyword arguments, as (name, value) pairs."""


def engine_config_for(rollout, *, model_dir: str, seed: int) -> EngineConfig:
    """The engines' settings from a ``config.RolloutConfig`` (the trainer's, and the benchmarks' so that
    they measure the engine the trainer runs): dtype, lengths, KV cache, chunked prefill and token budget."""
    return EngineConfig(model_dir=model_dir, dtype=rollout.engine_dtype, max_model_len=rollout.max_model_len,
                        kv_cache_gib=rollout.kv_cache_gib, seed=seed,
                        extra_llm_kwargs=(("enable_chunked_prefill", rollout.chunked_prefill),
                                          ("max_num_batched_tokens", rollout.max_num_batched_tokens)))


@dataclass
class _Job:
    job_id: int
    keys: dict[str, str] = field(default_factory=dict)      # vLLM request id -> pool key
    finished: list[dict] = field(default_factory=list)      # not yet handed out by poll()
    cancelled: bool = False


class VLLMEngine:
    """A ``vllm.LLM`` plus a stepping thread; see the module docstring for the protocol."""

    def __init__(self, config: EngineConfig, *, engine_index: int):
        self.config = config
        self.index = engine_index
        self.llm = None
        self.weight_version = 0
        self._engine_lock = threading.RLock()   # everything that touches the vLLM engine
        self._state_lock = threading.Lock()     # job bookkeeping; never held while stepping
        self._jobs: dict[int, _Job] = {}
        self._req_to_job: dict[str, int] = {}
        self._incoming: list[tuple[str, dict, Any]] = []   # (request id, prompt, params) to add
        self._to_abort: list[str] = []
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = False
        self._error: str | None = None
        self._error_detail = ""
        self._children: list[tuple[int, str | None]] = []
        self._worker_pids: set[int] = set()
        self._last_progress = time.monotonic()
        self._req_ids = itertools.count(1)
        self._updating = False
        self._native_session = False
        self._remote_workers = False
        if config.own_log:
            _write_output_to_own_log(engine_index)

    # ------------------------------------------------------------------ start-up / introspection
    def start(self) -> dict[str, Any]:
        """Build the engine (blocking, tens of seconds); returns pids and start-up seconds."""
        t0 = time.monotonic()
        cfg = self.config
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(cfg.kv_cache_gib)))
        if cfg.cpu_threads_bind:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_threads_bind
        if cfg.weight_transfer_backend == "ipc":
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # pickled CUDA IPC handles
        host_ip = _ray_node_ip()
        if host_ip and not os.environ.get("VLLM_HOST_IP"):
            # vLLM's get_ip() finds the address via a UDP "connect" to 8.8.8.8; on a node without a
            # default route (air-gapped compute nodes, the test cluster's namespaces) that fails and
            # it falls back to 0.0.0.0. The Ray node's address is the one this node is reached at.
            os.environ["VLLM_HOST_IP"] = host_ip
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=cfg.model_dir, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
            seed=cfg.seed + self.index, enforce_eager=cfg.enforce_eager,
            tensor_parallel_size=cfg.tensor_parallel_size, worker_extension_cls=WORKER_EXTENSION,
        )
        if self._device() == "cuda":
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            if cfg.tensor_parallel_size > 1:
                kwargs["distributed_executor_backend"] = "ray"  # workers in the engine's bundles
                self._remote_workers = True
        if cfg.weight_transfer_backend:
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=cfg.weight_transfer_backend)
        if cfg.max_num_seqs:
            kwargs["max_num_seqs"] = cfg.max_num_seqs
        kwargs.update(dict(cfg.extra_llm_kwargs))
        self.llm = LLM(**kwargs)
        self._worker_pids = set(self.llm.collective_rpc("sage_pid"))  # before the stepping thread
        self._last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._step_loop, name=f"vllm-engine-{self.index}",
                                        daemon=True)
        self._thread.start()
        return {"index": self.index, "seconds": time.monotonic() - t0, **self.pids()}

    def _device(self) -> str:
        if self.config.device != "auto":
            return self.config.device
        from vllm.platforms import current_platform

        return "cuda" if current_platform.is_cuda_alike() else "cpu"

    def pids(self) -> dict[str, Any]:
        """This actor's pid, its child processes (engine core, workers) and the worker pids."""
        import psutil

        children = psutil.Process().children(recursive=True)
        self._children = [(p.pid, proc_start_time(p.pid)) for p in children]
        return {
            "actor_pid": os.getpid(),
            "child_pids": list(self._children),
            "worker_pids": sorted(self._worker_pids),
            "node_id": _node_id(),
        }

    def ping(self) -> dict[str, Any]:
        return {"index": self.index, "weight_version": self.weight_version, "error": self._error}

    def param_checksum(self) -> float:
        with self._engine_lock:
            return float(self.llm.collective_rpc("sage_param_checksum")[0])

    # ------------------------------------------------------------------ generation
    def submit(self, job_id: int, items: list[tuple[str, list[int], int | None]], sampling: dict) -> int:
        """Queue ``items`` = [(key, prompt_ids, seed_or_None), ...] under ``job_id``.

        Never waits for the engine: the stepping thread adds queued requests between steps, so a
        hung engine cannot block the pool here (the hang shows up as ``idle_s`` in ``poll``).
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._error is not None:
            raise RuntimeError(f"engine {self.index} is broken: {self._error}")
        if self._updating:
            raise RuntimeError(f"engine {self.index}: cannot generate during a weight update")
        job = _Job(job_id)
        queued = []
        for key, prompt_ids, seed in items:
            params = SamplingParams(
                n=sampling["n"], temperature=sampling["temperature"], top_p=sampling["top_p"],
                max_tokens=sampling["max_tokens"], seed=seed, stop=list(sampling["stop"]) or None,
                logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY,
            )
            rid = f"j{job_id}-{next(self._req_ids)}"
            job.keys[rid] = key
            queued.append((rid, {"prompt_token_ids": list(prompt_ids)}, params))
        with self._state_lock:
            for rid in job.keys:
                self._req_to_job[rid] = job_id
            self._jobs[job_id] = job
            self._incoming.extend(queued)
            self._last_progress = time.monotonic()
        self._wake.set()
        return len(items)

    def poll(self, job_ids: list[int]) -> dict[str, Any]:
        """Results of ``job_ids`` finished since the last poll; never waits for the engine.

        ``done_jobs``: jobs with nothing left (forgotten here); ``idle_s``: seconds since the
        engine last completed a step while it had requests (0 when it has none).
        """
        results: list[dict] = []
        done = []
        with self._state_lock:
            for job_id in job_ids:
                job = self._jobs.get(job_id)
                if job is None:
                    done.append(job_id)
                    continue
                results.extend(job.finished)
                job.finished = []
                if not job.keys:
                    del self._jobs[job_id]
                    done.append(job_id)
            busy = any(j.keys for j in self._jobs.values())
            idle = (time.monotonic() - self._last_progress) if busy else 0.0
        return {
            "results": results,
            "done_jobs": done,
            "idle_s": idle,
            "error": self._error,
            "error_detail": self._error_detail,
            "weight_version": self.weight_version,
            # only when something looks wrong: what the vLLM processes are doing
            "processes": self.process_report() if (self._error or idle > 5.0) else "",
        }

    def process_report(self) -> str:
        """State of this engine's vLLM processes, e.g. "pid 123 stopped (T), pid 456 gone"."""
        parts = []
        for pid, started in self._children:
            state = "gone"
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[19] == started:
                    state = {"R": "running", "S": "sleeping", "D": "disk wait", "T": "stopped (T)",
                             "t": "traced", "Z": "zombie"}.get(fields[0], fields[0])
            except (OSError, IndexError):
                pass
            role = "worker" if pid in self._worker_pids else "vLLM"
            parts.append(f"{role} pid {pid} {state}")
        return ", ".join(parts)

    def cancel(self, job_id: int) -> None:
        """Forget ``job_id``; its requests are aborted by the stepping thread."""
        with self._state_lock:
            job = self._jobs.pop(job_id, None)
            for rid in (job.keys if job else ()):
                self._req_to_job.pop(rid, None)
                self._to_abort.append(rid)
        self._wake.set()

    def _step_loop(self) -> None:
        engine = self.llm.llm_engine
        while not self._stop:
            with self._state_lock:
                incoming, self._incoming = self._incoming, []
                to_abort, self._to_abort = self._to_abort, []
            try:
                with self._engine_lock:
                    for rid, prompt, params in incoming:
                        if rid in self._req_to_job:  # else cancelled before it was added
                            engine.add_request(rid, prompt, params)
                    if to_abort:
                        engine.abort_request(to_abort)
                    outputs = engine.step() if engine.has_unfinished_requests() else None
            except BaseException as exc:  # engine core died or raised: report, stop stepping
                self._error = f"{type(exc).__name__}: {exc}"
                self._error_detail = traceback.format_exc(limit=6)
                return
            if outputs is None:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            now = time.monotonic()
            try:
                with self._state_lock:
                    self._last_progress = now
                    for out in outputs:
                        if not out.finished:
                            continue
                        job_id = self._req_to_job.pop(out.request_id, None)
                        job = self._jobs.get(job_id) if job_id is not None else None
                        if job is None:
                            continue  # cancelled
                        key = job.keys.pop(out.request_id)
                        job.finished.append(_to_result(key, out, self.weight_version))
            except BaseException as exc:
                self._error = f"{type(exc).__name__}: {exc}"
                self._error_detail = traceback.format_exc(limit=6)
                return

    # ------------------------------------------------------------------ prompt log-probs
    def prompt_logprobs(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        """log p(x_t | x_<t) for t = 1..L-1 of each sequence (vLLM ``prompt_logprobs=0``)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        self._ensure_idle("prompt_logprobs")
        with self._engine_lock:
            outs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in token_id_lists],
                                     params, use_tqdm=False)
        result = []
        for ids, out in zip(token_id_lists, outs):
            plp = out.prompt_logprobs or []
            result.append([float(plp[t][ids[t]].logprob) for t in range(1, len(ids))])
        return result

    def _ensure_idle(self, what: str) -> None:
        with self._state_lock:
            if any(j.keys for j in self._jobs.values()):
                raise RuntimeError(f"engine {self.index}: {what} while a generation is running")
        if self._error is not None:
            raise RuntimeError(f"engine {self.index} is broken: {self._error}")

    # ------------------------------------------------------------------ weights (CPU transport)
    def begin_update(self) -> str:
        """Open a session in every worker; returns how the workers load (``"in_place"`` or ``"layerwise"``)."""
        self._ensure_idle("weight update")
        with self._engine_lock:
            self._updating = True
            return self.llm.collective_rpc("sage_begin_update")[0]

    def load_bucket(self, ref_box: list, *, payload_mode: str = "shm") -> int:
        """Load one encoded bucket (an ObjectRef in a one-element list) into every worker."""
        import ray

        data = ray.get(ref_box[0])  # zero-copy view of the object store on this node
        return int(self._handoff("sage_load_bucket", data, payload_mode))

    def load_bucket_file(self, payload: dict) -> int:
        """Load one bucket from a slot file of the sender (``ShmSlots``) on this node into every worker."""
        if self._remote_workers:  # TP workers may sit on other nodes: they get the bytes
            with open(payload["shm_path"], "rb") as f:
                return int(self._handoff("sage_load_bucket", f.read(), "rpc_bytes"))
        with self._engine_lock:
            return int(self.llm.collective_rpc("sage_load_bucket", args=(payload,))[0])

    def sees_file(self, path: str, identity: list[int]) -> bool:
        """Is ``path`` here the very file the sender made (same ``[st_dev, st_ino]``)? False on another node."""
        from sage_megatron.fsutil import file_identity

        return file_identity(path) == list(identity)

    def probe_bucket(self, ref_box: list, *, payload_mode: str = "shm") -> dict[str, float]:
        """The path of :meth:`load_bucket` without loading, timed (transport measurements)."""
        import ray

        t0 = time.perf_counter()
        data = ray.get(ref_box[0])
        t1 = time.perf_counter()
        n = self._handoff("sage_probe_payload", data, payload_mode)
        return {"get_s": t1 - t0, "handoff_s": time.perf_counter() - t1, "bytes": n}

    def _handoff(self, method: str, data: Any, payload_mode: str) -> Any:
        """Pass an encoded bucket to the workers: as a /dev/shm file ("shm") or as bytes."""
        from sage_megatron.rollout.weight_transport import ShmBucketFile

        if self._remote_workers:  # TP workers may sit on other nodes: no shared /dev/shm
            payload_mode = "rpc_bytes"
        with self._engine_lock:
            if payload_mode == "shm":
                with ShmBucketFile(data, tag=f"e{self.index}") as payload:
                    return self.llm.collective_rpc(method, args=(payload,))[0]
            if payload_mode == "rpc_bytes":
                return self.llm.collective_rpc(method, args=(bytes(data),))[0]
        raise ValueError(f"unknown payload_mode {payload_mode!r}; use 'shm' or 'rpc_bytes'")

    def finish_update(self, *, version: int) -> int:
        with self._engine_lock:
            n = self.llm.collective_rpc("sage_finish_update")[0]
            self.llm.reset_prefix_cache()
            self.weight_version = version
            self._updating = False
        return int(n)

    def abort_update(self) -> None:
        """After a failed update: close the open session (the weights are then partly updated)."""
        if not self._updating:
            return
        with self._engine_lock:
            try:
                if self._native_session:
                    self.llm.finish_weight_update()
                else:
                    self.llm.collective_rpc("sage_finish_update")
            finally:
                self._updating = self._native_session = False

    # ------------------------------------------------------------------ weights (GPU transports)
    def init_weight_transfer(self, init_info: dict) -> None:
        """Join the trainer's transfer group (NCCL: blocks until the trainer joins too)."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def shutdown_weight_transfer(self) -> None:
        """Leave the transfer group (before it is rebuilt around a restarted engine)."""
        self.llm.shutdown_weight_transfer_engine()

    def native_start_update(self) -> None:
        self._ensure_idle("weight update")
        with self._engine_lock:
            self._updating = self._native_session = True
            self.llm.start_weight_update()

    def native_update(self, update_info: dict) -> None:
        with self._engine_lock:
            self.llm.update_weights({"update_info": update_info})

    def native_finish_update(self, *, version: int) -> None:
        with self._engine_lock:
            self.llm.finish_weight_update(weight_version=str(version))
            self.llm.reset_prefix_cache()
            self.weight_version = version
            self._updating = self._native_session = False

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # already dead
                pass


def _to_result(key: str, out: Any, weight_version: int) -> dict[str, Any]:
    samples = []
    for c in sorted(out.outputs, key=lambda c: c.index):
        token_ids = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(token_ids):
            raise RuntimeError(f"request {key}: vLLM returned {0 if c.logprobs is None else len(c.logprobs)} "
                               f"log-prob entries for {len(token_ids)} tokens")
        logprobs = [float(pos[tok].logprob) for pos, tok in zip(c.logprobs, token_ids)]
        samples.append({"index": c.index, "response_ids": token_ids, "logprobs": logprobs,
                        "finish_reason": c.finish_reason, "text": c.text})
    return {"key": key, "samples": samples, "weight_version": weight_version}


def _ray_node_ip() -> str | None:
    try:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else None
    except Exception:
        return None


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def _write_output_to_own_log(engine_index: int) -> None:
    """Point this process's stdout/stderr (inherited by vLLM's worker processes) at its own file in Ray's
    session log folder; the trainer's driver then forwards rank output only."""
    import ray

    try:
        logs = ray._private.worker._global_node.get_logs_dir_path()   # noqa: SLF001 (no public accessor)
    except AttributeError:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(os.path.join(logs, f"sage-engine-{engine_index}-{os.getpid()}.log"),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
