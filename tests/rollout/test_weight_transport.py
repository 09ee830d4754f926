"""Weight transport: bucketing, the CPU wire format, transport selection (no CUDA, no engines).

Run: .venv/bin/python -m pytest tests/rollout/test_weight_transport.py -q
The end-to-end path through real engines is in test_rollout_pool.py (marked vllm).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from sage_megatron.rollout import weight_transport as wt


def _named(sizes):
    return [(f"w{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate(sizes)]


def test_iter_buckets_respects_limit_and_order():
    tensors = _named([10, 10, 10, 30, 5, 100, 1])  # float32: 4 bytes per element
    buckets = list(wt.iter_buckets(iter(tensors), bucket_bytes=80))
    names = [[n for n, _ in b] for b in buckets]
    assert names == [["w0", "w1"], ["w2"], ["w3"], ["w4"], ["w5"], ["w6"]]
    # every bucket within the limit unless it holds a single oversized tensor
    for b in buckets:
        size = sum(wt.tensor_nbytes(t) for _, t in b)
        assert size <= 80 or len(b) == 1
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]


def test_iter_buckets_is_lazy():
    produced = []

    def gen():
        for i in range(6):
            produced.append(i)
            yield f"w{i}", torch.zeros(4)

    it = wt.iter_buckets(gen(), bucket_bytes=32)
    first = next(it)
    assert [n for n, _ in first] == ["w0", "w1"]
    assert produced == [0, 1, 2]  # only one tensor past the first bucket has been pulled


def test_iter_buckets_rejects_duplicates_and_bad_limits():
    with pytest.raises(ValueError, match="appears twice"):
        list(wt.iter_buckets([("a", torch.zeros(1)), ("a", torch.zeros(1))], bucket_bytes=100))
    with pytest.raises(ValueError, match="positive"):
        list(wt.iter_buckets([], bucket_bytes=0))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        list(wt.iter_buckets([("a", [1, 2])], bucket_bytes=100))


def test_encode_decode_roundtrip_dtypes_views_and_shared_storage():
    base = torch.randn(6, 4)
    tensors = [
        ("f32", torch.randn(3, 5)),
        ("bf16", torch.randn(7).to(torch.bfloat16)),
        ("f16", torch.randn(2, 2).half()),
        ("i64", torch.arange(9)),
        ("bool", torch.tensor([True, False, True])),
        ("noncontig", base.t()),            # transposed view
        ("tied_a", base), ("tied_b", base),  # same storage under two names (tied embeddings)
        ("empty", torch.empty(0, 3)),
        ("scalar", torch.tensor(2.5)),
    ]
    buf = wt.encode_bucket(tensors)
    assert wt.bucket_names(buf) == [n for n, _ in tensors]
    decoded = wt.decode_bucket(buf)
    assert [n for n, _ in decoded] == [n for n, _ in tensors]
    for (n, ref), (_, got) in zip(tensors, decoded):
        assert got.dtype == ref.dtype and got.shape == ref.shape, n
        assert torch.equal(got, ref), n


def test_shm_file_roundtrip_and_cleanup():
    tensors = [("a", torch.randn(100)), ("b", torch.randn(3, 3).to(torch.bfloat16))]
    buf = wt.encode_bucket(tensors)
    shm = wt.ShmBucketFile(buf, tag="test")
    with shm as payload:
        assert os.path.exists(payload["shm_path"])
        got = wt.read_payload(payload)
    assert not os.path.exists(shm.path)
    for (n, ref), (m, t) in zip(tensors, got):  # the mapping outlives the unlinked file
        assert n == m and torch.equal(ref, t)
    assert [n for n, _ in wt.read_payload(bytes(buf))] == ["a", "b"]
    with pytest.raises(TypeError):
        wt.read_payload(12)


@pytest.mark.parametrize(
    ("kind", "device", "colocated", "expected"),
    [
        ("auto", "cpu", False, "cpu"),
        ("auto", "cpu", True, "cpu"),
        ("auto", "cuda", False, "nccl"),
        ("auto", "cuda", True, "ipc"),
        ("cpu", "cuda", False, "cpu"),
        ("nccl", "cuda", True, "nccl"),
        ("ipc", "cuda", True, "ipc"),
    ],
)
def test_select_transport(kind, device, colocated, expected):
    cfg = wt.TransportConfig(kind=kind, colocated=colocated)
    assert wt.select_transport(cfg, device=device) == expected


@pytest.mark.parametrize(
    ("kind", "device", "colocated", "match"),
    [
        ("nccl", "cpu", False, "needs GPU engines"),
        ("ipc", "cpu", True, "needs GPU engines"),
        ("ipc", "cuda", False, "colocated"),
        ("gloo", "cpu", False, "unknown transport"),
    ],
)
def test_select_transport_errors(kind, device, colocated, match):
    with pytest.raises(ValueError, match=match):
        wt.select_transport(wt.TransportConfig(kind=kind, colocated=colocated), device=device)


def test_make_transport_gpu_classes_construct_without_cuda():
    cfg = wt.TransportConfig(kind="nccl")
    t = wt.make_transport(cfg, device="cuda", tensor_parallel_size=2)
    assert isinstance(t, wt.NcclBroadcastTransport) and t.tp == 2 and not t.keeps_refs
    t = wt.make_transport(wt.TransportConfig(colocated=True), device="cuda", tensor_parallel_size=1)
    assert isinstance(t, wt.CudaIpcTransport)
    t = wt.make_transport(wt.TransportConfig(), device="cpu", tensor_parallel_size=1)
    assert isinstance(t, wt.CpuObjectStoreTransport) and t.keeps_refs
    assert wt.vllm_weight_transfer_backend("cpu") is None
    assert wt.vllm_weight_transfer_backend("nccl") == "nccl"
    assert wt.vllm_weight_transfer_backend("ipc") == "ipc"


def test_nccl_ranks_are_disjoint_per_engine():
    infos = wt.nccl_worker_init_infos(num_engines=3, tensor_parallel_size=2,
                                      master_address="10.0.0.1", master_port=1234)
    assert [i["rank_offset"] for i in infos] == [1, 3, 5]
    assert {i["world_size"] for i in infos} == {7}
    ranks = [i["rank_offset"] + r for i in infos for r in range(2)]
    assert sorted(ranks) == list(range(1, 7))  # trainer is rank 0


def test_bucket_update_info_and_ipc_merge():
    info = wt.bucket_update_info([("a", torch.zeros(2, 3)), ("b", torch.zeros(4, dtype=torch.bfloat16))])
    assert info == {"names": ["a", "b"], "dtype_names": ["float32", "bfloat16"], "shapes": [[2, 3], [4]]}
    merged = wt.merge_ipc_handles([[{"gpu0": (1,)}, {"gpu0": (2,)}], [{"gpu1": (3,)}, {"gpu1": (4,)}]])
    assert merged == [{"gpu0": (1,), "gpu1": (3,)}, {"gpu0": (2,), "gpu1": (4,)}]
    with pytest.raises(ValueError):
        wt.merge_ipc_handles([[{"a": 1}], []])


def test_transport_modules_import_without_cuda_or_ray_or_vllm():
    """The worker extension and transport import in a bare interpreter (no vllm/ray loaded)."""
    import subprocess

    code = ("import sys; import sage_megatron.rollout.weight_transport, sage_megatron.rollout.vllm_worker_ext, "
            "sage_megatron.rollout.vllm_engine, sage_megatron.rollout.pool; "
            "bad = [m for m in ('vllm', 'ray') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
