"""Gaussian noise for the summed clipped gradient, from seeded per-rank generator streams.

One stream per rank (and per device type): under sharding each rank draws the noise of the coordinates it owns,
and streams never repeat across ranks, steps or resumed runs (generator states are checkpointed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["GaussianNoise"]


class GaussianNoise:
    """N(0, std^2) samples from this rank's stream.

    Args:
        seed: this rank's stream seed; derive it from a secret base seed (see ``DPStep``).

    Privacy:
        The noise must be unpredictable to an adversary: a seed known to them removes it entirely. Seeds come
        from the OS entropy pool unless the user fixes ``PrivacyConfig.seed`` for a reproducible research run.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, Tensor] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = device.type
        if key not in self._generators:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            if key in self._pending:
                gen.set_state(self._pending.pop(key))
            self._generators[key] = gen
        return self._generators[key]

    def sample(self, shape: torch.Size, *, std: float, device: torch.device) -> Tensor:
        """A fresh fp32 sample of shape ``shape`` with standard deviation ``std``."""
        noise = torch.empty(shape, device=device, dtype=torch.float32)
        if std == 0.0:
            return noise.zero_()
        return noise.normal_(0.0, std, generator=self._generator(device))

    def state_dict(self) -> dict[str, Any]:
        states = {key: gen.get_state() for key, gen in self._generators.items()}
        return {"seed": self.seed, "states": {**self._pending, **states}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._generators.clear()
        self._pending = dict(state["states"])
