"""Moving weights into and out of a live (TP/PP-sharded) Megatron model through the weight maps.

``iter_global_tensors`` yields this stage's parameters as global (TP-gathered) tensors, one at a time,
so peak extra memory is one gathered parameter (the per-iteration weight sync); ``save_dist_checkpoint``
and ``load_dist_checkpoint`` are megatron-core's torch_dist save and load of a live model.
"""
from __future__ import annotations

from typing import Iterator

import torch

from sage_megatron.parallel import weight_maps as wm
from sage_megatron.parallel.host_gather import gather_shards, host_exchange
from sage_megatron.parallel.model import ModelArch


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def layer_offset(model) -> int:
    """Global index of this stage's first transformer layer."""
    layers = unwrap(model).decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def stage_params(model) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(mapping key, parameter) for every parameter of this rank's stage."""
    offset = layer_offset(model)
    for name, param in unwrap(model).named_parameters():
        yield wm.canonical_name(name, layer_offset=offset), param


def tp_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


@torch.no_grad()
def iter_global_tensors(model, *, arch: ModelArch, to_all: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's parameters as (global name, TP-merged tensor); collective over the TP group.

    ``to_all=False``: only TP rank 0 receives and yields (the weight sync's sources); the other TP ranks
    send their shards and yield nothing. Shards travel through shared memory where the TP group's ranks
    share a host on gloo (``host_gather``), else through torch.distributed's collectives.
    """
    from megatron.core import parallel_state as ps

    rank, tp = tp_rank_and_size()
    maps = wm.mappings_by_name(arch)
    params = list(stage_params(model))
    exchange = group = None
    if tp > 1:
        group = ps.get_tensor_model_parallel_group()
        largest = max((p.numel() * p.element_size() for k, p in params if maps[k].tp_split != wm.REPLICATED),
                      default=0)
        exchange = host_exchange(group, region_bytes=largest)
    for key, param in params:
        m = maps[key]
        if tp == 1 or m.tp_split == wm.REPLICATED:
            if to_all or rank == 0:
                yield key, param.detach()
            continue
        shards = gather_shards(param, group=group, to_all=to_all, exchange=exchange)
        if shards is not None:
            yield key, wm.merge_shards(m, shards)


def save_dist_checkpoint(model, directory: str) -> None:
    """megatron-core dist checkpoint (torch_dist) of the model, written collectively by all ranks."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(unwrap(model).sharded_state_dict(), directory)


def load_dist_checkpoint(model, directory: str) -> None:
    """Load a dist checkpoint written at any TP/PP into this rank's stage."""
    from megatron.core import dist_checkpointing

    m = unwrap(model)
    state = dist_checkpointing.load(m.sharded_state_dict(), directory)
    m.load_state_dict(state)
