"""The one-run audit statistics of Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run"
(NeurIPS 2023, arXiv 2305.08846): turn membership guesses on m canaries into a lower bound on epsilon.

Notation: m canaries, each included independently with probability 1/2; the auditor guesses "in" or "out" for r of
them (abstaining on the others) and v guesses are correct. Under (epsilon, delta)-DP (their Theorem 5.2 and
Corollary 5.4, with the numerical procedure of their Appendix D)

    P[W >= v] <= P[Binomial(r, p) >= v] + 2 m delta max_{i = 1..v} P[v - i <= Binomial(r, p) < v] / i,

with p = e^eps / (1 + e^eps), the accuracy of eps-DP randomised response. The lower bound is the largest epsilon
whose p-value is still below 1 - confidence: a mechanism that were (epsilon, delta)-DP would give that many correct
guesses with probability at most 1 - confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["AuditGuesses", "epsilon_lower_bound", "guess_from_scores", "p_value"]


def p_value(*, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``num_correct`` correct guesses out of ``num_guesses`` under (epsilon, delta)-DP.

    Args:
        num_canaries: m, canaries each included with probability 1/2 (abstentions included).
        num_guesses: r <= m, the guesses that were not abstentions.
        num_correct: v <= r, the correct ones.
        epsilon: the epsilon of the null hypothesis, >= 0.
        delta: the delta of the null hypothesis, in [0, 1].
    Returns:
        An upper bound on P[W >= v] (Steinke et al. 2023, Corollary 5.4), clipped to 1.
    Raises:
        ValueError: counts out of order (0 <= v <= r <= m) or parameters out of range.
    """
    m, r, v = num_canaries, num_guesses, num_correct
    if not 0 <= v <= r <= m:
        raise ValueError(f"p_value: need 0 <= num_correct <= num_guesses <= num_canaries, got v={v}, r={r}, m={m}.")
    if not (math.isfinite(epsilon) and epsilon >= 0) or not 0.0 <= delta <= 1.0:
        raise ValueError(f"p_value: need epsilon >= 0 and 0 <= delta <= 1, got epsilon={epsilon}, delta={delta}.")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(beta, 1.0)
    # P[v - i <= Binomial(r, q) < v] for i = 1..v: cumulative sums of the pmf at v-1, v-2, ..., 0.
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(
    *, num_canaries: int, num_guesses: int, num_correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest epsilon rejected at level 1 - ``confidence``: the empirical lower bound.

    Bisection on epsilon (the p-value grows with epsilon), returning the low end of the final bracket, so the result
    is conservative by at most 2^-40 times the bracket.

    Args:
        num_canaries: m.
        num_guesses: r.
        num_correct: v.
        delta: the delta of the claim being audited.
        confidence: e.g. 0.95: if the mechanism were (epsilon, delta)-DP for the returned epsilon, guesses this
            good would happen with probability at most 5%.
    Returns:
        The lower bound on epsilon (0.0 when the guesses are no better than chance).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"epsilon_lower_bound: confidence must be in (0, 1), got {confidence}.")
    level = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return (
            p_value(
                num_canaries=num_canaries, num_guesses=num_guesses, num_correct=num_correct, epsilon=eps, delta=delta
            )
            < level
        )

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, hi * 2.0
        if hi > 1e3:  # v = r with delta = 0 and huge r: no finite epsilon is consistent; report the bracket
            return lo
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditGuesses:
    """The auditor's guesses: +1 "in", -1 "out", 0 abstain, and how they score against the truth.

    Attributes:
        guesses: shape [m], values in {-1, 0, +1}.
        num_guesses: r, the non-abstentions.
        num_correct: v.
    """

    guesses: np.ndarray
    num_guesses: int
    num_correct: int


def guess_from_scores(scores: np.ndarray, included: np.ndarray, *, k_in: int, k_out: int) -> AuditGuesses:
    """Guess "in" for the ``k_in`` highest scores, "out" for the ``k_out`` lowest, abstain on the rest.

    Ties are broken by canary index (the order is fixed before the truth is looked at).

    Args:
        scores: shape [m]; higher means "more likely included".
        included: shape [m] bool, the truth (which canaries were in the training set).
        k_in: k+, the number of "in" guesses.
        k_out: k-, the number of "out" guesses; ``k_in + k_out <= m``.
    Returns:
        The guesses and their counts.
    """
    m = scores.shape[0]
    if k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise ValueError(f"guess_from_scores: need k_in, k_out >= 0 and k_in + k_out <= m = {m}, got {k_in}, {k_out}.")
    order = np.argsort(-scores, kind="stable")  # descending
    guesses = np.zeros(m, dtype=np.int64)
    guesses[order[:k_in]] = 1
    if k_out:
        guesses[order[m - k_out :]] = -1
    truth = np.where(included, 1, -1)
    correct = int(np.sum(guesses == truth))
    return AuditGuesses(guesses, int(np.count_nonzero(guesses)), correct)
