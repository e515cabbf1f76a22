"""The one-run audit statistics (lightning_dpzero/audit/bound.py) and scores (scores.py) against independent oracles.

References: the values printed in Steinke, Nasr and Jagielski (arXiv 2305.08846v1: Appendix D p. 46 and Section 7
p. 28); a float64 loop over math.comb for the p-value; the textbook Gaussian likelihood ratio; Monte Carlo of
randomised response for the validity of the bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_dpzero import audit
from lightning_dpzero.audit import best_guess, epsilon_lower_bound, guess_from_scores, log_likelihood_ratio, p_value


def _reference_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Corollary 5.4 with exact binomial terms from math.comb (float64, no scipy)."""
    q = 1.0 / (1.0 + math.exp(-eps))
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    beta = math.fsum(pmf[v:])
    alpha = max((math.fsum(pmf[v - i : v]) / i for i in range(1, v + 1)), default=0.0)
    return min(beta + 2 * m * delta * alpha, 1.0)


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "published"),
    [(1000, 100, 75, 1e-4, 0.673), (100000, 1510, 1439, 1e-5, 2.675)],
)
def test_lower_bound_reproduces_the_papers_printed_values(m, r, v, delta, published) -> None:
    """Reference: the paper prints 0.673 (App. D) and 2.675 (Sec. 7) at 95%; one unit in the last digit allowed."""
    bound = epsilon_lower_bound(num_canaries=m, num_guesses=r, num_correct=v, delta=delta, confidence=0.95)
    assert abs(bound - published) < 1e-3, bound


@pytest.mark.parametrize(("m", "r", "v"), [(200, 60, 50), (200, 60, 31), (1000, 120, 120), (50, 10, 0)])
@pytest.mark.parametrize("eps", [0.0, 0.7, 2.5])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_p_value_matches_exact_binomial_reference(m, r, v, eps, delta) -> None:
    """Reference: _reference_p_value above (exact integer binomial coefficients)."""
    actual = p_value(num_canaries=m, num_guesses=r, num_correct=v, epsilon=eps, delta=delta)
    assert actual == pytest.approx(_reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_lower_bound_is_the_edge_of_the_rejection_region() -> None:
    """At the returned epsilon the p-value is below 1 - confidence; a hair above it, it is not."""
    kwargs = dict(num_canaries=1000, num_guesses=300, num_correct=270, delta=1e-5)
    bound = epsilon_lower_bound(**kwargs, confidence=0.95)
    assert 0.0 < bound
    assert p_value(**kwargs, epsilon=bound) < 0.05 <= p_value(**kwargs, epsilon=bound + 1e-6)
    assert epsilon_lower_bound(**kwargs, confidence=0.99) < bound  # more confidence, weaker bound
    assert epsilon_lower_bound(num_canaries=1000, num_guesses=300, num_correct=150, delta=1e-5) == 0.0


def test_bound_holds_for_randomised_response_at_the_stated_confidence() -> None:
    """Validity by simulation: eps-DP randomised response guesses (each correct w.p. e^eps / (1 + e^eps)) exceed
    eps in at most 1 - confidence of the trials (binomial tolerance: 3 standard deviations over 200 trials)."""
    rng = np.random.default_rng(0)
    eps, m, trials = 1.0, 500, 200
    q = math.exp(eps) / (1 + math.exp(eps))
    exceed = sum(
        epsilon_lower_bound(num_canaries=m, num_guesses=m, num_correct=int(rng.binomial(m, q)), delta=0.0) > eps
        for _ in range(trials)
    )
    allowed = 0.05 * trials + 3 * math.sqrt(0.05 * 0.95 * trials)
    print(f"bound > eps in {exceed}/{trials} trials, allowed {allowed:.1f}")
    assert exceed <= allowed


def test_guesses_take_the_extremes_and_count_correct() -> None:
    scores = np.array([5.0, -1.0, 3.0, 0.0, -4.0, 2.0])
    included = np.array([True, False, False, True, False, True])
    g = guess_from_scores(scores, included, k_in=2, k_out=2)
    np.testing.assert_array_equal(g.guesses, [1, -1, 1, 0, -1, 0])  # in: 5, 3; out: -4, -1
    assert (g.num_guesses, g.num_correct) == (4, 3)  # canary 2 (score 3) is the wrong "in" guess
    with pytest.raises(ValueError, match="k_in \\+ k_out <= m"):
        guess_from_scores(scores, included, k_in=4, k_out=3)


def test_log_likelihood_ratio_matches_gaussian_mixture_reference() -> None:
    """Reference: log prod_t [q N(x; s, tau) + (1 - q) N(x; 0, tau)] / N(x; 0, tau) from the densities, float64,
    with tau = sigma for noisy coordinates and the MAD estimate for a coordinate with 10x less noise (< sigma / 2)."""
    rng = np.random.default_rng(1)
    sigma, q, s, steps = 1.2, 0.05, 0.9, 40
    x = sigma * rng.standard_normal((steps, 3))
    x[:, 2] *= 0.1
    x[[3, 17], 1] += s

    def density(value: np.ndarray, mean: float, tau: float) -> np.ndarray:
        return np.exp(-0.5 * ((value - mean) / tau) ** 2) / (tau * math.sqrt(2 * math.pi))

    col = x[:, 2]
    tau_est = 1.4826 * np.median(np.abs(col - np.median(col)))
    assert tau_est < 0.5 * sigma
    expected = [
        np.sum(np.log((q * density(x[:, j], s, tau) + (1 - q) * density(x[:, j], 0.0, tau)) / density(x[:, j], 0, tau)))
        for j, tau in ((0, sigma), (1, sigma), (2, tau_est))
    ]
    actual = log_likelihood_ratio(x, signal=s, noise_multiplier=sigma, sample_rate=q)
    np.testing.assert_allclose(actual, expected, rtol=1e-10)


def test_best_guess_splits_the_confidence_over_the_attempts() -> None:
    """Each attempt's bound is computed at 1 - 0.05 / (number of attempts); the best one is returned."""
    rng = np.random.default_rng(2)
    included = rng.random(400) < 0.5
    scores = np.where(included, 1.0, 0.0) + rng.standard_normal(400)
    best, attempts = best_guess(scores, included, delta=1e-5, confidence=0.95, guess_fractions=(0.1, 0.25))
    assert [(a.k_in, a.k_out) for a in attempts] == [(40, 0), (40, 40), (100, 0), (100, 100)]
    for a in attempts:
        expected = epsilon_lower_bound(
            num_canaries=400, num_guesses=a.num_guesses, num_correct=a.num_correct, delta=1e-5, confidence=1 - 0.05 / 4
        )
        assert a.epsilon_lower_bound == expected
    assert best.epsilon_lower_bound == max(a.epsilon_lower_bound for a in attempts) > 0


@pytest.mark.parametrize("name", audit.__all__)
def test_every_public_audit_name_exists(name: str) -> None:
    assert getattr(audit, name) is not None
