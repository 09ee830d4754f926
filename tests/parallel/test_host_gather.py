"""The shared-memory TP exchange (parallel/host_gather.py) on real gloo processes: every rank's shard arrives
intact in rank order, to all ranks or to rank 0 only, equal to torch.distributed's own all_gather/gather, with
a slow reader, and the file leaves nothing behind in /dev/shm."""
from __future__ import annotations

import os
import time

import torch

from sage_megatron.parallel.launch import run_distributed

SHAPES = [((4, 3), torch.float32), ((7,), torch.bfloat16), ((2, 5, 3), torch.int64), ((1,), torch.float32),
          ((6, 6), torch.bfloat16), ((3, 2), torch.float32)]


def _shard(i: int, rank: int, shape, dtype) -> torch.Tensor:
    """Tensor i of ``rank``: values that tell rank and tensor apart."""
    n = 1
    for d in shape:
        n *= d
    return (torch.arange(n) + 1000 * rank + 100 * i).reshape(shape).to(dtype)


def _exchange_on_ranks() -> dict:
    import torch.distributed as dist

    from sage_megatron.fsutil import shm_directory
    from sage_megatron.parallel.host_gather import gather_shards, host_exchange

    dist.init_process_group("gloo")
    rank, size, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    largest = max(torch.empty(s, dtype=d).numel() * torch.empty(0, dtype=d).element_size() for s, d in SHAPES)
    exchange = host_exchange(group, region_bytes=largest)
    out = {"exchange": exchange is not None, "bad": []}
    for to_all in (True, False):
        for i, (shape, dtype) in enumerate(SHAPES):
            got = gather_shards(_shard(i, rank, shape, dtype), group=group, to_all=to_all, exchange=exchange)
            if rank == 0:
                time.sleep(0.05)   # a slow reader: the writers must not overwrite what it has not read yet
            ref = gather_shards(_shard(i, rank, shape, dtype), group=group, to_all=to_all)   # gloo's own
            if not to_all and rank != 0:
                if got is not None or ref is not None:
                    out["bad"].append(f"rank {rank} received tensor {i}")
                continue
            want = [_shard(i, r, shape, dtype) for r in range(size)]
            for r in range(size):
                if not (torch.equal(got[r], want[r]) and torch.equal(ref[r], want[r]) and got[r].dtype == dtype):
                    out["bad"].append(f"tensor {i} of rank {r} (to_all={to_all})")
    bigger = host_exchange(group, region_bytes=4 * largest)   # a larger request makes a new, larger exchange
    got = gather_shards(torch.full((largest,), rank, dtype=torch.float32), group=group, to_all=True, exchange=bigger)
    out["bigger"] = bigger is not exchange and [int(t[0]) for t in got] == list(range(size))
    maker = [os.getpid()]
    dist.broadcast_object_list(maker, src=0)   # group rank 0 makes the files
    out["left_files"] = [n for n in os.listdir(shm_directory()) if n.startswith(f"sage_tpx_{maker[0]}_")]
    dist.destroy_process_group()
    return out


def test_host_exchange_gathers_every_rank_shard_like_gloo():
    results = run_distributed(_exchange_on_ranks, world_size=3)
    for rank, r in enumerate(results):
        assert r["exchange"], f"rank {rank}: ranks on one host should share the exchange"
        assert r["bad"] == [], f"rank {rank}: {r['bad']}"
        assert r["bigger"], f"rank {rank}: the larger exchange did not gather"
        assert r["left_files"] == [], f"rank {rank}: files left in /dev/shm: {r['left_files']}"


def _without_room_on_ranks() -> dict:
    import torch.distributed as dist

    from sage_megatron.parallel import host_gather

    host_gather.shm_directory = lambda: "/nonexistent-shm"   # rank 0 cannot make the file (as with a full /dev/shm)
    dist.init_process_group("gloo")
    rank, group = dist.get_rank(), dist.group.WORLD
    exchange = host_gather.host_exchange(group, region_bytes=64)
    got = host_gather.gather_shards(_shard(0, rank, (4, 4), torch.float32), group=group, to_all=False,
                                    exchange=exchange)
    dist.destroy_process_group()
    return {"exchange": exchange, "got": got}


def test_without_a_shared_file_the_group_keeps_gloo():
    rank0, rank1 = run_distributed(_without_room_on_ranks, world_size=2)
    assert rank0["exchange"] is None and rank1["exchange"] is None
    assert [t.tolist() for t in rank0["got"]] == [_shard(0, r, (4, 4), torch.float32).tolist() for r in range(2)]
    assert rank1["got"] is None
