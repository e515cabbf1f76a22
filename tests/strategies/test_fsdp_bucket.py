"""dp_fsdp's coalesced reduce-scatter: each rank receives exactly its FSDP2 (torch.chunk) rows of every parameter."""

from __future__ import annotations

import pytest
import torch

from lightning_dpzero._internals import torch as torch_internals
from lightning_dpzero.strategies.fsdp import _ReduceScatterBucket


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_gets_its_torch_chunk_rows_of_every_parameter(world_size: int, monkeypatch) -> None:
    """Reference: torch.chunk(full, W)[rank] (FSDP2's dim-0 sharding; empty for ranks past the last chunk), summed
    over W ranks that all sent the same tensors. The collective is simulated: rank r receives the sum over the
    ranks of row r of their send buffers."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (1, 4), (7,), (2, 2, 3), (4, 1)]
    fulls = [torch.randn(shape, generator=gen) for shape in shapes]
    fulls[2] = None  # a parameter nothing reached: zeros

    for rank in range(world_size):

        def reduce_scatter(out, send, op=None, rank=rank):
            out.copy_(world_size * send.view(world_size, -1)[rank])

        for name in ("reduce_scatter_single", "reduce_scatter_tensor"):  # the new name where torch has it
            monkeypatch.setattr(torch_internals.dist, name, reduce_scatter, raising=False)
        bucket = _ReduceScatterBucket()
        expected = {}
        for i, (shape, full) in enumerate(zip(shapes, fulls)):
            chunks = torch.chunk(torch.zeros(shape) if full is None else full, world_size)
            mine = chunks[rank] if rank < len(chunks) else torch.zeros(0, *shape[1:])
            expected[f"p{i}"] = world_size * mine
            assert not bucket.add(f"p{i}", full, shape, mine.shape[0])
        shards = bucket.reduce_scatter(world_size, torch.device("cpu"))
        assert [name for name, _ in shards] == list(expected)
        for name, shard in shards:
            assert shard.shape == expected[name].shape
            torch.testing.assert_close(shard, expected[name], rtol=0, atol=0)
        assert bucket.entries == [] and bucket.elements == 0


def test_bucket_reports_full_at_capacity(monkeypatch) -> None:
    monkeypatch.setattr(_ReduceScatterBucket, "capacity", 10)
    bucket = _ReduceScatterBucket()
    assert not bucket.add("a", None, (3, 3), 2)
    assert bucket.add("b", None, (1,), 1)
    assert bucket.elements == 10 and len(bucket.entries) == 2
