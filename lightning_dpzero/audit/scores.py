"""Canary scores from per-step observations of u, and the auditor's best guess among a fixed set of attempts.

Notation: T logical steps, m canaries; x[t, j] is u_j's movement in step t in units of C / B (times the learning
rate), so under a correct implementation x[t, j] = (s / C) 1[j sampled at t] + sigma z, z ~ N(0, 1), with
s = the clipped canary norm and q the sampling rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_dpzero.audit.bound import epsilon_lower_bound, guess_from_scores

__all__ = ["GuessAttempt", "best_guess", "log_likelihood_ratio"]


def log_likelihood_ratio(x: np.ndarray, *, signal: float, noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Per-canary log-likelihood ratio of "included" against "excluded" from the per-step movements.

    Included: each step is q N(signal, tau_j^2) + (1 - q) N(0, tau_j^2); excluded: N(0, tau_j^2). tau_j is the
    claimed sigma, unless a robust estimate from the canary's own steps (1.4826 times the median absolute deviation)
    is below half of it: a coordinate that visibly got less noise than claimed is scored with the noise it got, so
    missing or scaled-down noise makes its membership stand out. Under a correct implementation the estimate is
    within ~3 standard errors of sigma for T >= 50 steps, so sigma is used: the Neyman-Pearson test for one canary.
    Any score function gives a valid bound; only its power depends on the choice.

    Args:
        x: shape [T, m], movements in units of C / B.
        signal: s / C, the clipped canary gradient norm in units of C (about 1 for a correct clipping).
        noise_multiplier: the claimed sigma.
        sample_rate: the claimed q.
    Returns:
        Scores of shape [m], float64; higher means "more likely included".
    """
    x = np.asarray(x, dtype=np.float64)
    mad = 1.4826 * np.median(np.abs(x - np.median(x, axis=0)), axis=0)  # [m]
    tau = np.where(mad < 0.5 * noise_multiplier, np.maximum(mad, 1e-3 * noise_multiplier), noise_multiplier)  # [m]
    exponent = (signal * x - 0.5 * signal**2) / tau**2  # [T, m]: log N(x; s, tau) - log N(x; 0, tau)
    per_step = np.logaddexp(np.log1p(-sample_rate), np.log(sample_rate) + exponent)  # [T, m]
    return per_step.sum(axis=0)


@dataclass(frozen=True)
class GuessAttempt:
    """One pre-registered way of guessing: k_in "in" guesses and k_out "out" guesses, and the bound it gives.

    Attributes:
        k_in: guesses "in" (highest scores).
        k_out: guesses "out" (lowest scores).
        num_guesses: r.
        num_correct: v.
        epsilon_lower_bound: the bound at the per-attempt confidence.
    """

    k_in: int
    k_out: int
    num_guesses: int
    num_correct: int
    epsilon_lower_bound: float


def best_guess(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float,
    guess_fractions: tuple[float, ...],
) -> tuple[GuessAttempt, list[GuessAttempt]]:
    """Try each (k_in, k_out) in {(k, 0), (k, k) : k = fraction * m}, keep the largest bound.

    The failure probability 1 - ``confidence`` is split evenly over the attempts (Bonferroni), so the maximum over
    them is a lower bound at ``confidence``, although the attempt was chosen after seeing the truth.

    Args:
        scores: shape [m].
        included: shape [m] bool.
        delta: the claimed delta.
        confidence: the overall confidence.
        guess_fractions: the fractions of m tried as k.
    Returns:
        The best attempt and all attempts.
    """
    m = scores.shape[0]
    shapes = []
    for fraction in guess_fractions:
        k = max(1, int(fraction * m))
        shapes += [(k, 0), (k, k)]
    per_attempt = 1.0 - (1.0 - confidence) / len(shapes)
    attempts = []
    for k_in, k_out in shapes:
        guesses = guess_from_scores(scores, included, k_in=k_in, k_out=k_out)
        bound = epsilon_lower_bound(
            num_canaries=m,
            num_guesses=guesses.num_guesses,
            num_correct=guesses.num_correct,
            delta=delta,
            confidence=per_attempt,
        )
        attempts.append(GuessAttempt(k_in, k_out, guesses.num_guesses, guesses.num_correct, bound))
    return max(attempts, key=lambda a: a.epsilon_lower_bound), attempts
