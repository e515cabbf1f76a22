"""Gaussian noise for the summed clipped gradient, drawn from the run's secret key, once per coordinate per step.

Each draw is its own counter-based stream, addressed by (rank, logical step, draw number within the step): under
sharding each rank draws the noise of the coordinates it owns, and streams never repeat across ranks, steps or
resumed runs. There is no generator state: nothing about the noise is checkpointed (``lightning_dpzero.randomness``).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from lightning_dpzero.randomness import SecretKey, gaussian_from_bits

__all__ = ["GaussianNoise", "SecureGaussianNoise"]


class GaussianNoise:
    """N(0, std^2) samples, each from a stream of the run's secret key.

    Args:
        key: the run's secret key (the same on every rank).
        rank: this rank: its streams differ from every other rank's.

    Privacy:
        The noise is as unpredictable as the key: 256 bits from the OS unless ``PrivacyConfig.seed`` fixes it. On
        CPU each draw is AES-256 in counter mode under its stream's 256-bit key, made Gaussian by Box-Muller
        (``randomness.gaussian_from_bits``); on CUDA torch's Philox with 126 bits of seed and offset, in float64.
        Cost on the 2-core CI machine: ~2.8 ns per coordinate on one CPU core (torch's unkeyable Mersenne Twister:
        ~3.5 ns). The tails reach 9.42 (CPU) and 8.65 (CUDA) standard deviations (docs/design.md).
    """

    def __init__(self, key: SecretKey, rank: int = 0) -> None:
        self._key, self.rank = key, rank
        self._step, self._draws = 0, 0

    def start_step(self, step: int) -> None:
        """The draws that follow belong to logical step ``step`` (0-based), numbered from 0."""
        self._step, self._draws = step, 0

    def sample(self, shape: torch.Size, *, std: float, device: torch.device) -> Tensor:
        """A fresh fp32 sample of shape ``shape`` with standard deviation ``std``."""
        if std == 0.0:
            return torch.zeros(shape, device=device, dtype=torch.float32)
        labels = ("noise", self.rank, self._step, self._draws)
        self._draws += 1
        return self._key.standard_normal(shape, device, *labels).mul_(std)


class SecureGaussianNoise:
    """N(0, std^2) samples from the operating system's cryptographically secure generator (``os.urandom``).

    The same Box-Muller as ``GaussianNoise`` (``randomness.gaussian_from_bits``) on bytes from the OS. Nothing to
    seed and nothing to checkpoint: every draw is fresh entropy, so a resumed run can never repeat noise, and no
    state in a checkpoint or in memory predicts it. Cost, measured on the 2-core CI machine: ~17 ns per coordinate
    (reading 6 bytes per coordinate from the OS is most of it) against ~2.8 ns for ``GaussianNoise``.

    Privacy:
        Needs no key: even a key that leaked (or a user's seed that was guessed) would not predict this noise. It
        does not address floating-point attacks on the Gaussian mechanism's low-order bits (Mironov 2012); no
        DP-SGD library does.
    """

    def sample(self, shape: torch.Size, *, std: float, device: torch.device) -> Tensor:
        """A fresh fp32 sample of shape ``shape`` with standard deviation ``std``."""
        if std == 0.0:
            return torch.zeros(shape, device=device, dtype=torch.float32)
        normal = torch.from_numpy(gaussian_from_bits(math.prod(shape), os.urandom))
        return normal.mul_(std).view(shape).to(device)

    def start_step(self, step: int) -> None:
        """Nothing to position: every draw is fresh OS entropy."""
