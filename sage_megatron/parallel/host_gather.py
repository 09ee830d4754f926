"""TP shards -> the global tensor through one shared-memory file, for gloo groups whose ranks share a host.

Why: a gloo all-gather goes through TCP on the loopback device. On the 2-core dev box the TP=2 gather of a
1.77 GB bf16 model took 3.3 s of a 6.5 s weight sync (bench/weight_sync.py before this module), about
0.5 GB/s. Ranks on one host can instead copy their shard once into a file in /dev/shm that every rank
of the group has mapped, and the receiving rank reads the others' shards in place.

When it is used (:func:`host_exchange`, decided once per group): the group's backend is gloo (NCCL on GPU
keeps ``all_gather``/``gather``) and every rank maps the very file rank 0 made (same ``[st_dev, st_ino]``;
ranks on other hosts, or with their own /dev/shm, do not, and the group keeps torch.distributed's
collectives). The file is unlinked as soon as every rank has mapped it, so nothing is left behind when a
process dies; the memory goes back when the last rank exits.

Layout: two buffers, each with one region per rank of ``region_bytes`` (the largest local shard). Tensor
i goes through buffer ``i % 2``: a rank writes its region, all ranks meet in a barrier, the receivers read.
The next barrier (of tensor i + 1) is passed only after every receiver finished reading tensor i, so the
writers of tensor i + 2 never overwrite a buffer still being read: one barrier per tensor.
"""
from __future__ import annotations

import mmap
import os
import secrets

import torch
import torch.distributed as dist

from sage_megatron.fsutil import file_identity, shm_directory

_EXCHANGES: dict[tuple[int, ...], tuple[object, "HostExchange | None"]] = {}
"""Group ranks -> (the group object, its exchange or None: the group keeps torch.distributed's collectives).
The group object is kept so that a group made again with the same ranks gets a new exchange."""


class HostExchange:
    """A shared file mapped by every rank of a gloo group on one host (see the module docstring)."""

    def __init__(self, group, mapped: mmap.mmap, region_bytes: int):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.region_bytes = region_bytes
        self._mapped = mapped
        self._bytes = torch.frombuffer(mapped, dtype=torch.uint8, count=2 * self.size * region_bytes)
        self._count = 0

    def region(self, buffer: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        """The region of ``rank`` in ``buffer`` viewed as a tensor shaped and typed like ``like``."""
        start = (buffer * self.size + rank) * self.region_bytes
        n = like.numel() * like.element_size()
        return self._bytes[start:start + n].view(like.dtype).view(like.shape)

    def gather(self, local: torch.Tensor, *, to_all: bool) -> list[torch.Tensor] | None:
        """Every rank's ``local`` (same shape and dtype on all ranks), in group-rank order.

        ``to_all``: every rank gets the list; else only group rank 0 does (the others get None and
        do not read). The returned regions are valid until the next call but one: copy what you keep.
        """
        if local.numel() * local.element_size() > self.region_bytes:
            raise ValueError(f"a shard of {local.numel() * local.element_size()} bytes does not fit the host "
                             f"exchange's {self.region_bytes}-byte regions")
        buffer, self._count = self._count % 2, self._count + 1
        if to_all or self.rank != 0:
            self.region(buffer, self.rank, local).copy_(local)
        dist.barrier(group=self.group)
        if not to_all and self.rank != 0:
            return None
        return [local if r == self.rank else self.region(buffer, r, local) for r in range(self.size)]


def host_exchange(group, *, region_bytes: int) -> HostExchange | None:
    """The group's shared-memory exchange with regions of at least ``region_bytes`` (made on first use, made
    again when a larger one is asked for); None where the group's backend is not gloo or its ranks do not
    share a host. Collective over ``group``: every rank must ask with the same ``region_bytes``."""
    key = tuple(dist.get_process_group_ranks(group))
    known = _EXCHANGES.get(key, False)
    if known is not False and known[0] is group and (known[1] is None or known[1].region_bytes >= region_bytes):
        return known[1]
    exchange = None
    if dist.get_backend(group) == "gloo":
        exchange = _open_exchange(group, region_bytes=max(region_bytes, 1))
    _EXCHANGES[key] = (group, exchange)   # a replaced mapping lives on while views of it do
    return exchange


def _open_exchange(group, *, region_bytes: int) -> HostExchange | None:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    total = 2 * size * region_bytes
    box: list = [(None, None)]
    if rank == 0:
        path = os.path.join(shm_directory(), f"sage_tpx_{os.getpid()}_{secrets.token_hex(4)}")
        try:   # allocated up front: a /dev/shm too small for it (64 MiB in a default Docker) fails here, not
            with open(path, "wb") as f:   # with a SIGBUS at the first write into the mapping
                os.posix_fallocate(f.fileno(), 0, total)
            box = [(path, file_identity(path))]
        except OSError:
            if os.path.exists(path):
                os.unlink(path)
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    path, identity = box[0]
    mapped = None
    if path is not None and file_identity(path) == identity:
        with open(path, "r+b") as f:
            mapped = mmap.mmap(f.fileno(), total, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    seen = torch.tensor([0 if mapped is None else 1], dtype=torch.int32)
    dist.all_reduce(seen, op=dist.ReduceOp.MIN, group=group)   # also: every rank has opened the file
    if rank == 0 and path is not None:
        os.unlink(path)
    if int(seen) == 0:
        if mapped is not None:
            mapped.close()
        return None
    return HostExchange(group, mapped, region_bytes)


def gather_shards(local: torch.Tensor, *, group, to_all: bool,
                  exchange: HostExchange | None = None) -> list[torch.Tensor] | None:
    """Every rank's ``local`` (same shape and dtype on all ranks of ``group``), in group-rank order: through
    ``exchange`` where given (:func:`host_exchange`), else torch.distributed's ``all_gather`` (``to_all``) or
    ``gather`` to group rank 0. Collective; None on the ranks that do not receive. An exchange's regions are
    views, valid until the next call but one: merge (copy) them first."""
    local = local.detach().contiguous()
    if exchange is not None:
        return exchange.gather(local, to_all=to_all)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if to_all:
        shards = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(shards, local, group=group)
        return shards
    shards = [torch.empty_like(local) for _ in range(size)] if rank == 0 else None
    dist.gather(local, gather_list=shards, dst=dist.get_global_rank(group, 0), group=group)
    return shards
