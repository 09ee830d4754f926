"""Weight transport: bucketing, the CPU wire format, transport selection (no CUDA, no engines).

Run: .venv/bin/python -m pytest tests/rollout/test_weight_transport.py -q
The end-to-end path through real engines is in test_rollout_pool.py (marked vllm).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from sage_megatron.fsutil import file_identity
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


def test_slot_files_persist_per_index_and_readers_keep_their_mapping(tmp_path):
    slots = wt.ShmSlots(directory=str(tmp_path))
    first = [("a", torch.randn(64)), ("b", torch.randn(3, 5).to(torch.bfloat16))]
    p0 = slots.write(0, first)
    got0 = wt.read_payload(p0)
    for (n, ref), (m, t) in zip(first, got0):
        assert n == m and torch.equal(ref, t)
    mapping = wt.slot_mapping(p0["shm_path"])

    # bucket 1 of the same sync goes to its own file: bucket 0's views (a layer still incomplete in the
    # engine) keep their values
    p1 = slots.write(1, [("c", torch.ones(10))])
    assert p1["shm_path"] != p0["shm_path"] and len(slots) == 2
    assert torch.equal(wt.read_payload(p1)[0][1], torch.ones(10))
    assert torch.equal(got0[0][1], first[0][1])

    # the next sync rewrites file 0 in place: the reader's kept mapping sees the new bytes, no new mapping
    second = [("a", torch.randn(64)), ("b", torch.randn(3, 5).to(torch.bfloat16))]
    inode = os.stat(p0["shm_path"]).st_ino
    assert slots.write(0, second) == p0 and os.stat(p0["shm_path"]).st_ino == inode
    got = wt.read_payload(p0)
    assert wt.slot_mapping(p0["shm_path"]) is mapping
    assert all(torch.equal(ref, t) for (_, ref), (_, t) in zip(second, got))

    # a bigger bucket grows the file; the reader maps it again
    big = [("a", torch.randn(1000))]
    slots.write(0, big)
    assert torch.equal(wt.read_payload(p0)[0][1], big[0][1])
    assert wt.slot_mapping(p0["shm_path"]) is not mapping
    assert torch.equal(torch.from_numpy(slots.read(0)[-4000:].copy()).view(torch.float32), big[0][1])

    # a sync with fewer buckets removes the files beyond it; readers drop those mappings
    slots.trim(1)
    assert not os.path.exists(p1["shm_path"]) and os.path.exists(p0["shm_path"])
    assert wt.release_stale_slot_mappings() == 1 and p0["shm_path"] in wt._SLOT_MAPPINGS
    with pytest.raises(ValueError, match="slot 3 written before slot 1"):
        slots.write(3, big)
    slots.close()
    assert os.listdir(tmp_path) == []
    assert wt.release_stale_slot_mappings() == 1


def test_slot_files_of_dead_writers_are_removed_and_a_lost_sender_cleans_up(tmp_path):
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f"{wt._slot_owner()}{dead}_abcd1234_0"
    stale.write_bytes(b"x" * 10)
    elsewhere = tmp_path / f"{wt.ShmSlots.PREFIX}otherhost_{dead}_abcd1234_0"   # another host's process table
    elsewhere.write_bytes(b"x" * 10)
    mine = wt.ShmSlots(directory=str(tmp_path))   # sweeps this host's files of writers that are gone
    assert not stale.exists() and elsewhere.exists()
    elsewhere.unlink()
    path = mine.write(0, [("a", torch.zeros(4))])["shm_path"]
    other = wt.ShmSlots(directory=str(tmp_path))  # a live writer's files are left alone
    assert os.path.exists(path)
    del mine                                      # dropped without close(): unlinked all the same
    assert not os.path.exists(path) and os.listdir(tmp_path) == []
    other.close()
    assert file_identity(path) is None
    assert file_identity(str(tmp_path)) == [os.stat(tmp_path).st_dev, os.stat(tmp_path).st_ino]


def test_slot_file_without_room_fails_with_what_to_fix(tmp_path, monkeypatch):
    """A /dev/shm too small for the slot files (a container's default 64 MiB) is an error naming the directory
    and the fix when the file is made, not a SIGBUS when the mapping is first written."""
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    slots = wt.ShmSlots(directory=str(tmp_path))
    monkeypatch.setattr(wt.os, "posix_fallocate", full)
    with pytest.raises(OSError, match=rf"cannot reserve \d+ bytes for a weight bucket .*No space left.*give "
                                      rf"{tmp_path} at least the model's size.*--shm-size"):
        slots.write(0, [("a", torch.zeros(1024))])
    assert os.listdir(tmp_path) == [] and len(slots) == 0   # nothing half-made is left
    monkeypatch.undo()
    assert slots.write(0, [("a", torch.ones(4))])["shm_path"]   # with room, the same slot works
    slots.close()


def test_cpu_transport_refuses_an_unknown_payload_mode():
    with pytest.raises(ValueError, match="unknown cpu_payload 'pipes'"):
        wt.CpuObjectStoreTransport(wt.TransportConfig(cpu_payload="pipes"))


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
