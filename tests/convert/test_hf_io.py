"""The streaming safetensors writer (hf_io.write_hf_safetensors): every file it writes is byte for byte
what safetensors' own save_file writes for the same shard, and a stream that differs from its plan is
refused with the tensor named."""
import json

import pytest
import torch
from safetensors.torch import save_file

from sage_megatron.parallel.hf_io import CheckpointError, PlannedTensor, plan_shards, write_hf_safetensors


def mixed_tensors() -> list[tuple[str, torch.Tensor]]:
    """Several dtypes, a 0-d and an empty tensor, a non-contiguous one and a slice of a larger one,
    in an order that is neither by name nor by dtype."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(6, 5, generator=g)
    return [
        ("z.weight", torch.randn(3, 4, generator=g)),
        ("a.bias", torch.randn(7, generator=g).to(torch.bfloat16)),
        ("m.transposed", torch.randn(4, 3, generator=g).t()),
        ("b.scalar", torch.tensor(2.5, dtype=torch.float64)),
        ("c.empty", torch.empty(0, 3)),
        ("d.half", torch.randn(2, 2, generator=g).half()),
        ("e.index", torch.arange(5, dtype=torch.int64)),
        ("f.gate", big[:3]),
        ("g.up", big[3:]),
        ("h.mask", torch.tensor([True, False, True])),
    ]


def plan_of(tensors) -> list[PlannedTensor]:
    return [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in tensors]


@pytest.mark.parametrize("max_shard_bytes", [2 << 30, 96, 1])
def test_files_equal_save_file_byte_for_byte(tmp_path, max_shard_bytes):
    tensors = mixed_tensors()
    planned = plan_of(tensors)
    total = write_hf_safetensors(iter(tensors), tmp_path, planned=planned, max_shard_bytes=max_shard_bytes)
    assert total == sum(t.numel() * t.element_size() for _, t in tensors)
    shards = plan_shards(planned, max_shard_bytes)
    by_name = dict(tensors)
    if len(shards) == 1:
        files = ["model.safetensors"]
        assert not (tmp_path / "model.safetensors.index.json").exists()
    else:
        files = [f"model-{i + 1:05d}.safetensors" for i in range(len(shards))]
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == total
        assert index["weight_map"] == {p.name: f for f, shard in zip(files, shards) for p in shard}
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(files)
    for f, shard in zip(files, shards):
        ref = tmp_path / "ref.safetensors"
        save_file({p.name: by_name[p.name].contiguous() for p in shard}, str(ref), metadata={"format": "pt"})
        assert (tmp_path / f).read_bytes() == ref.read_bytes(), f


def test_shards_are_filled_greedily_in_order():
    planned = [PlannedTensor(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5])]
    assert [[p.name for p in s] for s in plan_shards(planned, 80)] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert [[p.name for p in s] for s in plan_shards(planned, 1)] == [[f"t{i}"] for i in range(5)]
    assert plan_shards([], 80) == []


@pytest.mark.parametrize("mutate,message", [
    (lambda ts: ts[:-1], "ended before h.mask"),
    (lambda ts: ts + [("extra", torch.zeros(1))], "gave extra, which was not planned"),
    (lambda ts: [ts[1], ts[0]] + ts[2:], "gave a.bias .* where z.weight"),
    (lambda ts: [("z.weight", torch.zeros(4, 3))] + ts[1:], r"gave z.weight \(4, 3\)"),
])
def test_a_stream_that_differs_from_its_plan_is_refused(tmp_path, mutate, message):
    tensors = mixed_tensors()
    with pytest.raises(CheckpointError, match=message):
        write_hf_safetensors(iter(mutate(tensors)), tmp_path, planned=plan_of(tensors))
