"""Privacy accounting on dp-accounting: epsilon after the logical steps taken, sigma from a target epsilon.

One logical step is one Poisson-sampled Gaussian event ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``;
the run is their composition. The history is run-length encoded ``(noise_multiplier, sample_rate, steps)``,
so a checkpoint stores a few numbers and epsilon can always be recomputed from it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import dp_accounting
import numpy as np
import scipy.optimize
from dp_accounting import pld, rdp
from dp_accounting.rdp import rdp_privacy_accountant

from lightning_dpzero.config import Accountant

__all__ = [
    "TAIL_CUTOFF",
    "TAIL_SHARE",
    "PrivacyAccountant",
    "calibrate_noise_multiplier",
    "dpsgd_event",
    "epsilon_for",
    "tail_delta",
    "tail_noise_multiplier",
]

# PLD discretisation of the privacy-loss values; dp-accounting's default (tight, ~0.2-0.8 s per evaluation).
_PLD_DISCRETIZATION = 1e-4
# Largest sigma calibration will consider; past it the budget is unreachable in any useful sense.
_MAX_NOISE_MULTIPLIER = 1e4
# The integer orders among dp-accounting's default RDP orders. An evaluation on them alone skips the fractional
# orders' series (about 10x cheaper), and with fewer orders to minimise over its epsilon is never below the full
# accountant's: its root is an upper bound of the full root, which calibration then only has to refine.
_INTEGER_ORDERS = tuple(float(a) for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS if float(a).is_integer())


def dpsgd_event(*, noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """``steps`` logical DP-SGD steps: Poisson sampling with rate q, then the Gaussian mechanism with sigma."""
    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _fresh(kind: Accountant, *, coarse: bool = False) -> dp_accounting.PrivacyAccountant:
    """A new accountant. ``coarse`` (only used to search; results use the fine one): PLD on a 10x coarser grid
    (10x faster, epsilon within ~0.01), RDP on the integer orders only (an upper bound of the full epsilon)."""
    if kind is Accountant.PLD:
        return pld.PLDAccountant(
            value_discretization_interval=10 * _PLD_DISCRETIZATION if coarse else _PLD_DISCRETIZATION
        )
    return rdp.RdpAccountant(list(_INTEGER_ORDERS)) if coarse else rdp.RdpAccountant()


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting's RDP logs a convergence warning per excluded order at small sigma; the result is still valid."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=64)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> tuple[tuple[float, ...], np.ndarray]:
    """RDP orders and the RDP of one step; RDP composes additively, so T steps cost T times this vector."""
    accountant = rdp.RdpAccountant()
    with _quiet_absl():
        accountant.compose(dpsgd_event(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=1))
    return tuple(accountant.orders), np.asarray(accountant.rdp, dtype=np.float64)


def epsilon_for(history: Sequence[tuple[float, float, int]], *, delta: float, accountant: Accountant) -> float:
    """Epsilon after the logical steps in ``history`` (``(noise_multiplier, sample_rate, steps)`` runs).

    RDP takes a fast path that is exactly what ``RdpAccountant`` computes (additive composition of the same
    per-step RDP vector, then dp-accounting's own RDP-to-DP conversion); PLD composes with ``PLDAccountant``.
    """
    history = [(float(s), float(q), int(t)) for s, q, t in history if t > 0 and q > 0]
    if not history:
        return 0.0
    if any(s == 0.0 for s, _, _ in history):
        return math.inf
    if accountant is Accountant.RDP:
        total = None
        orders: tuple[float, ...] = ()
        for sigma, q, steps in history:
            orders, one = _rdp_one_step(sigma, q)
            total = one * steps if total is None else total + one * steps
        eps, _ = rdp_privacy_accountant.compute_epsilon(orders, total, delta)
        return float(eps)
    acc = _fresh(accountant)
    for sigma, q, steps in history:
        acc.compose(dpsgd_event(noise_multiplier=sigma, sample_rate=q, steps=steps))
    return float(acc.get_epsilon(delta))


# The noise samplers draw no radius beyond this many standard deviations: the smaller of CUDA's float64 Box-Muller on
# 53-bit uniforms (sqrt(108 ln 2) = 8.65) and the CPU sampler's 63-bit radius uniforms (sqrt(128 ln 2) = 9.42).
TAIL_CUTOFF = math.sqrt(108 * math.log(2))
# The most of delta that the cutoff may take before a run is refused.
TAIL_SHARE = 0.01


def tail_delta(*, noise_multiplier: float, sample_rate: float, steps: int, cutoff: float = TAIL_CUTOFF) -> float:
    """At most what the noise's tail cutoff adds to delta over ``steps`` steps: q T exp(-(R - 1/sigma)^2 / 2).

    In a step that samples an example, its clipped gradient moves the released sum by at most 1/sigma noise standard
    deviations; the outputs that only the neighbouring run can give lie where one pair of coordinates' noise radius
    would exceed R - 1/sigma, which has probability exp(-(R - 1/sigma)^2 / 2) (the tail of a 2-D Gaussian's radius).
    The accountant assumes noise without a cutoff; this bounds the difference (docs/design.md, "What the tail's
    cutoff costs"). Where 1/sigma >= R, every sampled step may reveal the example: q T.
    """
    reach = cutoff - 1.0 / noise_multiplier
    per_step = 1.0 if reach <= 0 else math.exp(-reach * reach / 2)
    return sample_rate * steps * per_step


def tail_noise_multiplier(
    *, sample_rate: float, steps: int, delta: float, share: float = TAIL_SHARE, cutoff: float = TAIL_CUTOFF
) -> float:
    """The smallest sigma whose ``tail_delta`` over ``steps`` steps is at most ``share * delta`` (inf: none is)."""
    allowed = share * delta / (sample_rate * steps)
    if allowed >= 1.0:
        return 0.0
    reach = math.sqrt(-2.0 * math.log(allowed))
    return math.inf if reach >= cutoff else 1.0 / (cutoff - reach)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant,
) -> float:
    """The smallest sigma (to dp-accounting's tolerance) whose epsilon after ``steps`` steps is <= the target.

    Raises:
        ValueError: when even sigma = 1e4 cannot reach ``target_epsilon`` with these steps and sample rate.

    Privacy:
        The returned sigma is checked against the accountant and nudged up until epsilon(steps) <= target, so
        the calibrated run never ends above the budget because of root-finding tolerance.
    """

    def eps(sigma: float) -> float:
        return epsilon_for([(sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    def eps_rdp(sigma: float) -> float:
        return epsilon_for([(sigma, sample_rate, steps)], delta=delta, accountant=Accountant.RDP)

    if eps(_MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise ValueError(
            f"target_epsilon={target_epsilon} cannot be reached with {steps} logical steps at sample rate "
            f"q={sample_rate:.4g} and delta={delta:.3g}, even with noise_multiplier={_MAX_NOISE_MULTIPLIER:g}. "
            "Raise target_epsilon, or train fewer steps, or lower the expected batch size."
        )
    # The integer-order RDP root (cheap evaluations over the whole range) bounds the full RDP root from above; the
    # full accountant then searches just below it.
    upper = _brent(Accountant.RDP, target_epsilon, delta, sample_rate, steps, (0.05, _MAX_NOISE_MULTIPLIER))
    while eps_rdp(upper) > target_epsilon:  # the integer-order root may sit a hair above its own target
        upper *= 1.0 + 1e-3
    lower = max(0.9 * upper, 0.05)
    while lower > 0.05 and eps_rdp(lower) <= target_epsilon:
        upper, lower = lower, max(0.9 * lower, 0.05)
    if eps_rdp(lower) <= target_epsilon:  # 0.05, the smallest sigma calibration considers, already reaches it
        sigma = lower
    else:  # Brent on the cached epsilon: the bracket's ends and the final check cost nothing again
        tol = 1e-6 * upper
        sigma = scipy.optimize.brentq(lambda s: eps_rdp(s) - target_epsilon, lower, upper, xtol=tol)
        if eps_rdp(sigma) > target_epsilon:  # the root lies within tol of Brent's answer, epsilon falls with sigma
            sigma += tol
    # RDP upper-bounds epsilon, so the RDP sigma reaches the target under either accountant: it brackets the
    # PLD search from above, and keeps PLD away from tiny sigmas, whose discretised PLDs do not fit in memory.
    if accountant is Accountant.PLD:
        upper, lower = sigma, max(0.5 * sigma, 0.1)
        while eps(lower) <= target_epsilon and lower > 0.1:  # bracket the PLD root from below
            upper, lower = lower, max(0.5 * lower, 0.1)
        if eps(lower) <= target_epsilon:
            sigma = lower
        else:
            sigma = _brent(Accountant.PLD, target_epsilon, delta, sample_rate, steps, (lower, upper))
    sigma = float(sigma)
    while eps(sigma) > target_epsilon:  # Brent's root may sit a hair above the target
        sigma *= 1.0 + 1e-4
    return sigma


def _brent(
    kind: Accountant,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    bracket: tuple[float, float],
) -> float:
    with _quiet_absl():
        return dp_accounting.calibrate_dp_mechanism(
            lambda: _fresh(kind, coarse=True),
            lambda s: dpsgd_event(noise_multiplier=s, sample_rate=sample_rate, steps=steps),
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(*bracket),
            tol=1e-4,
        )


class PrivacyAccountant:
    """The run's privacy ledger: the logical steps taken and epsilon after them.

    Args:
        kind: which dp-accounting accountant composes the steps.
        delta: the delta of the guarantee.
    """

    def __init__(self, kind: Accountant, *, delta: float) -> None:
        self.kind = Accountant(kind)
        self.delta = float(delta)
        self.history: list[tuple[float, float, int]] = []
        self._cached: tuple[tuple[tuple[float, float, int], ...], float] | None = None

    @property
    def steps(self) -> int:
        """Logical steps taken (noise draws accounted)."""
        return sum(t for _, _, t in self.history)

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one logical step: one Poisson-sampled Gaussian event."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, t = self.history[-1]
            self.history[-1] = (sigma, q, t + 1)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), 1))

    def epsilon(self) -> float:
        """Epsilon after the steps taken, for this accountant's delta."""
        key = tuple(self.history)
        if self._cached is None or self._cached[0] != key:
            self._cached = (
                key,
                epsilon_for(self.history, delta=self.delta, accountant=self.kind),
            )
        return self._cached[1]

    def epsilon_after_next(self, *, noise_multiplier: float, sample_rate: float) -> float:
        """Epsilon if one more step with these parameters were taken."""
        history = [*self.history, (noise_multiplier, sample_rate, 1)]
        return epsilon_for(history, delta=self.delta, accountant=self.kind)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "delta": self.delta,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kind = Accountant(state["kind"])
        self.delta = float(state["delta"])
        self.history = [(float(s), float(q), int(t)) for s, q, t in state["history"]]
        self._cached = None
