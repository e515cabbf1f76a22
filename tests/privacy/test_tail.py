"""The noise's tail cutoff (docs/design.md, "What the tail's cutoff costs"): the bound on what it adds to delta holds
for a truncated Gaussian, and runs where it would take more than 1% of delta are refused or stopped."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_dpzero as dpz
from lightning_dpzero.accounting import TAIL_CUTOFF, TAIL_SHARE, tail_delta, tail_noise_multiplier
from lightning_dpzero.ledger import PrivacyBudgetExhausted
from lightning_dpzero.step import DPStep


def _truncated_pairs(n: int, cutoff: float, rng: np.random.Generator) -> np.ndarray:
    """[n, 2] Box-Muller pairs whose radius stops at ``cutoff``, as the samplers' do (u >= exp(-cutoff^2 / 2))."""
    u = rng.uniform(math.exp(-(cutoff**2) / 2), 1.0, n)
    radius, angle = np.sqrt(-2 * np.log(u)), rng.uniform(0, 2 * math.pi, n)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


@pytest.mark.parametrize("shift", [0.5, 1.0, 2.0])
def test_the_outputs_only_a_neighbour_gives_are_as_rare_as_the_bound_says(shift: float) -> None:
    """Reference: Monte Carlo with a small cutoff R = 3 (so the event is common). The neighbouring run's noise is
    shifted by ``shift`` (1/sigma: the clipped gradient, all on one pair); the outputs the run without the example
    cannot give (|N + shift| > R) have probability <= exp(-(R - shift)^2 / 2) (``tail_delta``'s per-step term),
    within 5 standard errors; and the bound is not vacuous (the event has at least a tenth of it)."""
    cutoff, n = 3.0, 400_000
    noise = _truncated_pairs(n, cutoff, np.random.default_rng(int(shift * 10)))
    moved = noise + np.array([shift, 0.0])
    p = float(np.mean(np.hypot(moved[:, 0], moved[:, 1]) > cutoff))
    bound = tail_delta(noise_multiplier=1 / shift, sample_rate=1.0, steps=1, cutoff=cutoff)
    assert math.isclose(bound, math.exp(-((cutoff - shift) ** 2) / 2))
    assert p <= bound + 5 * math.sqrt(bound / n)
    assert p >= bound / 10


def test_the_smallest_noise_multiplier_for_the_tail_is_the_bounds_inverse() -> None:
    """Reference: ``tail_delta`` at the returned sigma is ``TAIL_SHARE`` of delta (1e-9 relative), above it at 0.99
    of that sigma; with q T = 100 and delta = 1e-5 the threshold is 0.45 (the figure in docs/design.md)."""
    for q, steps, delta in [(0.01, 10_000, 1e-5), (0.2, 150, 1e-3), (0.001, 1_000_000, 1e-8)]:
        sigma = tail_noise_multiplier(sample_rate=q, steps=steps, delta=delta)
        extra = tail_delta(noise_multiplier=sigma, sample_rate=q, steps=steps)
        assert math.isclose(extra, TAIL_SHARE * delta, rel_tol=1e-9)
        assert tail_delta(noise_multiplier=0.99 * sigma, sample_rate=q, steps=steps) > TAIL_SHARE * delta
    assert round(tail_noise_multiplier(sample_rate=0.01, steps=10_000, delta=1e-5), 2) == 0.45
    assert math.isclose(TAIL_CUTOFF, 8.65, abs_tol=5e-3)
    assert tail_noise_multiplier(sample_rate=1.0, steps=10**30, delta=1e-10) == math.inf


def _ledger(sigma: float, n: int = 10_000, b: int = 100):
    config = dpz.PrivacyConfig(noise_multiplier=sigma, expected_batch_size=b, physical_batch_size=8, delta=1e-5)
    return DPStep(config).ledger, DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=b)


def test_a_run_whose_noise_is_too_small_for_the_tail_is_refused_with_the_sigma_it_needs() -> None:
    """Reference: ``tail_noise_multiplier`` for q = 0.01 over 10,000 planned steps (0.45): sigma = 0.44 is refused
    naming noise_multiplier and the sigma that would do; 0.46 binds."""
    needed = tail_noise_multiplier(sample_rate=0.01, steps=10_000, delta=1e-5)
    ledger, loader = _ledger(0.44)
    with pytest.raises(ValueError, match=r"noise_multiplier=0.44 is too small .* use noise_multiplier >= 0.45"):
        ledger.bind_data(loader, planned_steps=lambda _: 10_000, owner="test")
    ledger, loader = _ledger(needed * 1.01)
    ledger.bind_data(loader, planned_steps=lambda _: 10_000, owner="test")


def test_a_run_without_planned_steps_stops_where_the_tail_would_pass_its_share() -> None:
    """Reference: ``tail_delta`` step by step. Unbounded (no planned steps) at sigma = 0.35: ``may_step`` holds
    exactly while one more step keeps the bound within 1% of delta, then the step is refused, the reason naming the
    tail cutoff."""
    sigma, q = 0.35, 0.01
    ledger, loader = _ledger(sigma)
    ledger.bind_data(loader, planned_steps=lambda _: None, owner="test")
    allowed = math.floor(TAIL_SHARE * 1e-5 / tail_delta(noise_multiplier=sigma, sample_rate=q, steps=1))
    assert 0 < allowed < 1000
    taken = 0
    while ledger.may_step():
        ledger.release([])
        taken += 1
    assert taken == allowed
    assert "tail cutoff" in (ledger.stop_reason() or "")  # what the strategy's stop warning says
    with pytest.raises(PrivacyBudgetExhausted, match="tail cutoff"):
        ledger.refuse_past_budget()
