"""The reducers and the ledger's release, in one process (the multi-process oracles are in test_parallel.py).

Reference: for every coordinate, released = (sum of the clipped sums added + noise) / B with noise ~ N(0, sigma^2 C^2)
drawn once; one accounting event per release; a release past the budget moves nothing.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dpzero as dpz
from lightning_dpzero.config import _ZERO_NOISE_ENV
from lightning_dpzero.strategies.deepspeed import PartitionReducer
from lightning_dpzero.strategies.reducers import LocalReducer, ReplicaReducer

CPU = torch.device("cpu")


def _bound_ledger(sigma: float, n: int = 40, b: int = 8, **kwargs: object) -> dpz.PrivacyLedger:
    ledger = dpz.PrivacyLedger(dpz.PrivacyConfig(noise_multiplier=sigma, expected_batch_size=b, seed=1, **kwargs))
    ledger.bind_data(DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=b), planned_steps=lambda _: 10, owner="t")
    return ledger


@pytest.mark.parametrize("reducer_cls", [LocalReducer, ReplicaReducer])
def test_release_writes_the_summed_clipped_sums_over_b_and_accounts_once(monkeypatch, reducer_cls) -> None:
    """sigma = 0: grads are exactly (sum of what was added) / B, zeros where nothing was added; one event."""
    monkeypatch.setenv(_ZERO_NOISE_ENV, "1")
    ledger = _bound_ledger(0.0)
    a, b, c = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(1))
    reducer = reducer_cls(CPU, "test")
    reducer.bind({"a": a, "b": b, "c": c})
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)  # in the optimizer, never updated: skipped
    named = reducer.select({"a": a, "b": b, "c": c}, torch.optim.SGD([b, frozen, a, c], lr=1.0))
    assert [name for name, _ in named] == ["b", "a", "c"]  # the optimizer's order
    with pytest.raises(ValueError, match="not one of the LightningModule.s parameters trained under DP"):
        reducer.select({"a": a}, torch.optim.SGD([a, nn.Parameter(torch.zeros(1))], lr=1.0))
    first, second = torch.randn(2, 3), torch.randn(2, 3)
    reducer.add("a", first)
    reducer.add("a", second)  # two physical batches of the same parameter accumulate
    reducer.add("b", torch.arange(4.0))
    reducer.add("c", None)
    reducer.release(ledger, named)
    torch.testing.assert_close(a.grad, (first + second) / 8.0)
    torch.testing.assert_close(b.grad, torch.arange(4.0) / 8.0)
    assert torch.equal(c.grad, torch.zeros(1))
    assert ledger.steps == 1


def test_release_noise_has_std_sigma_c_over_b_drawn_once_per_coordinate() -> None:
    """Reference: N(0, (sigma C / B)^2) per coordinate, 6 standard errors; consecutive steps uncorrelated."""
    sigma, clip, b = 2.0, 0.5, 8
    ledger = _bound_ledger(sigma, clip_norm=clip)
    p = nn.Parameter(torch.zeros(20_000))
    reducer = LocalReducer(CPU, "test")
    draws = []
    for _ in range(2):
        reducer.release(ledger, [("p", p)])
        assert p.grad is not None
        draws.append(p.grad.clone())
    expected, n = sigma * clip / b, p.numel()
    for draw in draws:
        assert abs(draw.std().item() - expected) < 6 * expected / math.sqrt(2 * n)
    assert abs(torch.corrcoef(torch.stack(draws))[0, 1].item()) < 6 / math.sqrt(n)
    assert ledger.steps == 2


def test_a_release_past_the_budget_moves_nothing() -> None:
    ledger = _bound_ledger(1.0)
    ledger.tighten_budget(1e-9)
    values = torch.ones(3)
    with pytest.raises(dpz.PrivacyBudgetExhausted):
        ledger.release([values])
    assert torch.equal(values, torch.ones(3)) and ledger.steps == 0


def test_deepspeed_partitions_are_released_only_for_a_finished_step() -> None:
    """The noise wrapper's release refuses partitions no logical step handed over (un-noised gradients)."""
    reducer = PartitionReducer(CPU, "test", engine=lambda: None, streams=False, world_size=2)
    with pytest.raises(RuntimeError, match="un-noised"):
        reducer.release_partitions([torch.zeros(3)])
    ledger = _bound_ledger(1.0)
    reducer.release(ledger, [])
    first, second = torch.zeros(3), torch.zeros(3)
    reducer.release_partitions([first])  # ZeRO-3 steps its optimizer once per sub-group
    reducer.release_partitions([second])
    assert ledger.steps == 0 and not torch.equal(first, second)  # two pieces, two draws; accounted at close
    reducer.close()
    assert ledger.steps == 1
    with pytest.raises(RuntimeError, match="un-noised"):
        reducer.release_partitions([first])  # one release per logical step
