"""Accounting against dp-accounting called directly (DESIGN.md section 4: epsilon matches, calibrated sigma reaches
the target). PLD evaluations cost ~1 s each, so they are few."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from lightning_dpzero.accounting import PrivacyAccountant, calibrate_noise_multiplier, epsilon_for
from lightning_dpzero.config import Accountant


def direct_epsilon(kind: Accountant, history: list[tuple[float, float, int]], delta: float) -> float:
    """dp-accounting on its own: compose SelfComposed(PoissonSampled(q, Gaussian(sigma)), T) per run."""
    accountant = rdp.RdpAccountant() if kind is Accountant.RDP else pld.PLDAccountant()
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    ("history", "delta"),
    [
        ([(1.0, 0.01, 1000)], 1e-5),
        ([(0.8, 0.05, 200)], 1e-6),
        ([(2.0, 0.001, 10000)], 1e-5),
        ([(1.0, 0.01, 500), (1.5, 0.02, 300), (1.0, 0.01, 7)], 1e-5),
    ],
)
def test_rdp_epsilon_matches_dp_accounting(history, delta):
    """Reference: dp_accounting.rdp.RdpAccountant composing the same events."""
    got = epsilon_for(history, delta=delta, accountant=Accountant.RDP)
    assert got == pytest.approx(direct_epsilon(Accountant.RDP, history, delta), rel=1e-9)


def test_pld_epsilon_matches_dp_accounting_and_reference_value():
    """Reference: dp_accounting.pld.PLDAccountant; sigma=1, q=0.01, T=1000, delta=1e-5 -> epsilon 1.828."""
    history = [(1.0, 0.01, 1000)]
    got = epsilon_for(history, delta=1e-5, accountant=Accountant.PLD)
    assert got == pytest.approx(direct_epsilon(Accountant.PLD, history, 1e-5), rel=1e-9)
    assert round(got, 3) == 1.828


def test_rdp_reference_value():
    """Reference: RDP epsilon for sigma=1, q=0.01, T=1000, delta=1e-5 is 2.101 (dp-accounting 0.6)."""
    assert round(epsilon_for([(1.0, 0.01, 1000)], delta=1e-5, accountant=Accountant.RDP), 3) == 2.101


@pytest.mark.parametrize("kind", list(Accountant), ids=str)
def test_epsilon_for_trivial_histories(kind):
    """Reference: no step (or q = 0) releases nothing -> 0; sigma = 0 has no guarantee -> inf."""
    assert epsilon_for([], delta=1e-5, accountant=kind) == 0.0
    assert epsilon_for([(1.0, 0.01, 0), (1.0, 0.0, 5)], delta=1e-5, accountant=kind) == 0.0
    assert epsilon_for([(0.0, 0.01, 3)], delta=1e-5, accountant=kind) == math.inf


def test_accountant_run_length_history_and_epsilon():
    """Reference: run-length encoding of the steps taken; epsilon_for and RdpAccountant on that history."""
    acc = PrivacyAccountant(Accountant.RDP, delta=1e-5)
    for sigma, count in ((1.0, 3), (1.5, 2), (1.0, 1)):
        for _ in range(count):
            acc.step(noise_multiplier=sigma, sample_rate=0.01)
    assert acc.history == [(1.0, 0.01, 3), (1.5, 0.01, 2), (1.0, 0.01, 1)]
    assert acc.steps == 6
    assert acc.epsilon() == epsilon_for(acc.history, delta=1e-5, accountant=Accountant.RDP)
    assert acc.epsilon() == pytest.approx(direct_epsilon(Accountant.RDP, acc.history, 1e-5), rel=1e-9)


def test_accountant_epsilon_after_k_steps_equals_epsilon_for():
    """Reference: epsilon_for([(sigma, q, k)]) after k identical steps; epsilon_after_next is one step ahead."""
    acc = PrivacyAccountant(Accountant.RDP, delta=1e-5)
    assert acc.epsilon() == 0.0
    for k in range(1, 51):
        acc.step(noise_multiplier=1.1, sample_rate=0.02)
        if k in (1, 17, 50):
            assert acc.epsilon() == epsilon_for([(1.1, 0.02, k)], delta=1e-5, accountant=Accountant.RDP)
    ahead = acc.epsilon_after_next(noise_multiplier=1.1, sample_rate=0.02)
    assert ahead == pytest.approx(epsilon_for([(1.1, 0.02, 51)], delta=1e-5, accountant=Accountant.RDP), rel=1e-12)
    assert ahead > acc.epsilon()
    assert acc.history == [(1.1, 0.02, 50)], "epsilon_after_next must not record a step"


def test_accountant_state_dict_round_trip():
    """Reference: the saved history (through JSON, as a checkpoint would keep it) gives the same ledger."""
    acc = PrivacyAccountant(Accountant.RDP, delta=1e-6)
    for sigma in (0.9, 0.9, 1.2, 1.2, 1.2):
        acc.step(noise_multiplier=sigma, sample_rate=0.03)
    state = json.loads(json.dumps(acc.state_dict()))

    restored = PrivacyAccountant(Accountant.PLD, delta=0.5)
    restored.load_state_dict(state)
    assert restored.kind is Accountant.RDP and restored.delta == 1e-6
    assert restored.history == acc.history and restored.steps == 5
    assert restored.epsilon() == acc.epsilon()
    restored.step(noise_multiplier=1.2, sample_rate=0.03)  # continues the last run
    assert restored.history == [(0.9, 0.03, 2), (1.2, 0.03, 4)]


@pytest.mark.parametrize(
    ("target", "delta", "q", "steps"),
    [(2.0, 1e-5, 0.01, 1000), (0.5, 1e-5, 1.0, 1)],  # subsampled; plain Gaussian mechanism
)
def test_rdp_calibration_reaches_target_and_is_tight(target, delta, q, steps):
    """Reference: epsilon_for (RDP): eps(sigma, T) <= target < eps(0.99 sigma, T)."""
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=delta, sample_rate=q, steps=steps, accountant=Accountant.RDP
    )
    assert epsilon_for([(sigma, q, steps)], delta=delta, accountant=Accountant.RDP) <= target
    assert epsilon_for([(0.99 * sigma, q, steps)], delta=delta, accountant=Accountant.RDP) > target


def test_pld_calibration_reaches_target_and_is_tight():
    """Reference: dp-accounting's PLDAccountant: eps(sigma, T) <= target < eps(0.99 sigma, T)."""
    target, delta, q, steps = 0.3, 1e-5, 0.01, 100
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=delta, sample_rate=q, steps=steps, accountant=Accountant.PLD
    )
    assert direct_epsilon(Accountant.PLD, [(sigma, q, steps)], delta) <= target
    assert direct_epsilon(Accountant.PLD, [(0.99 * sigma, q, steps)], delta) > target


def test_unreachable_budget_raises_with_the_numbers():
    """Reference: DESIGN.md section 6 (a budget that cannot be met -> error with the numbers)."""
    with pytest.raises(ValueError) as info:
        calibrate_noise_multiplier(
            target_epsilon=1e-6, delta=1e-5, sample_rate=1.0, steps=10000, accountant=Accountant.RDP
        )
    message = str(info.value)
    assert "target_epsilon=1e-06" in message and "10000" in message and "q=1" in message and "1e-05" in message
