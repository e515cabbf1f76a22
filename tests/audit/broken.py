"""Deliberately broken DP implementations, for testing the audit only (never reachable from the library).

Each is a context manager that monkeypatches one piece of the library for the duration of a run, in the process
that enters it (under torchrun, every rank enters it itself):

- ``scaled_noise(f)``: the noise std is f sigma C instead of sigma C (e.g. a sqrt(B) or B confused in the std).
- ``no_clipping()``: every clip factor is 1 (clipping forgotten): sensitivity is unbounded.
- ``noise_on_rank_zero_only()``: ranks other than 0 add no noise to the coordinates they own (ZeRO / DDP shards).
- ``shuffled_batches()``: fixed-size batches from a shuffle of each rank's shard, still accounted as Poisson.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from lightning_dpzero.clipping import engine as _engine
from lightning_dpzero.ledger import PrivacyLedger
from lightning_dpzero.sampling.poisson import PoissonBatchSampler

__all__ = ["BROKEN", "no_clipping", "noise_on_rank_zero_only", "scaled_noise", "shuffled_batches"]


@contextlib.contextmanager
def _patched(owner: object, name: str, replacement: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def scaled_noise(factor: float = 0.1) -> contextlib.AbstractContextManager[None]:
    original = PrivacyLedger._add_noise

    def add_noise(self: PrivacyLedger, values: torch.Tensor, std: float) -> None:
        before = values.clone()
        original(self, values, std)
        values.copy_(before + factor * (values - before))

    return _patched(PrivacyLedger, "_add_noise", add_noise)


def no_clipping() -> contextlib.AbstractContextManager[None]:
    def clip_factors(norms, mask, *, clip_norm, fn, stability_constant):  # noqa: ANN001, ANN202
        return torch.where(mask.bool(), torch.ones_like(norms), torch.zeros_like(norms))  # [n], or [groups, n]

    return _patched(_engine, "clip_factors", clip_factors)


def noise_on_rank_zero_only() -> contextlib.AbstractContextManager[None]:
    original = PrivacyLedger._add_noise

    def add_noise(self: PrivacyLedger, values: torch.Tensor, std: float) -> None:
        if self.rank == 0:
            original(self, values, std)

    return _patched(PrivacyLedger, "_add_noise", add_noise)


def shuffled_batches() -> contextlib.AbstractContextManager[None]:
    """Each epoch: a permutation of the rank's shard cut into batches of round(q |shard|); no Poisson draw."""

    def sample_step(self: PoissonBatchSampler) -> list[tuple[int, bool]]:
        shard = self.shard_sizes[self.rank]
        size = max(1, round(self.sample_rate * shard))
        queue = getattr(self, "_shuffle_queue", [])
        if len(queue) < size:
            queue = self._key.numpy_generator("shuffle", self.rank, self.position).permutation(shard).tolist()
        self.position += 1
        chosen, self._shuffle_queue = queue[:size], queue[size:]
        num_physical = max(1, math.ceil(size / self.physical_batch_size))
        indices = [i * self.world_size + self.rank for i in chosen]
        return [(i, True) for i in indices] + [(indices[0], False)] * (num_physical * self.physical_batch_size - size)

    return _patched(PoissonBatchSampler, "sample_step", sample_step)


BROKEN = {
    "scaled_noise": scaled_noise,
    "no_clipping": no_clipping,
    "noise_on_rank_zero_only": noise_on_rank_zero_only,
    "shuffled_batches": shuffled_batches,
}
