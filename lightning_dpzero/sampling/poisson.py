"""Poisson logical batches cut into fixed-shape physical batches with a padding mask (DESIGN.md section 2).

Each logical step, every example of the rank's shard is included independently with probability q. The draw is
done as L ~ Binomial(|shard|, q) followed by a uniform L-subset, which has exactly the Poisson distribution
(Beltran et al. 2406.17298, Lemma 1) at the cost of one permutation. With W ranks, rank r owns the disjoint
shard r, r+W, r+2W, ...; the union of the W per-rank samples is a Poisson sample of the whole dataset.

All ranks must run the same number of physical batches per logical step. The per-rank sizes are drawn from a
generator that every rank seeds identically, so each rank knows all W sizes and the maximum without any
communication; which examples are drawn comes from each rank's own generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

__all__ = ["LogicalBatch", "PoissonBatchSampler", "make_dp_dataloader"]


@dataclass
class LogicalBatch:
    """One logical step's data on one rank: fixed-shape physical batches and their 0/1 masks.

    ``physical_batches[j]`` is whatever the user's ``collate_fn`` makes of p examples; ``masks[j]`` has shape
    [p], 1 for sampled examples and 0 for padding rows, which are copies of a real example and contribute
    exactly zero to the gradient.

    Privacy:
        The number of real rows is the realised (private) batch size: it is used to mask, never logged.
    """

    physical_batches: list[Any]
    masks: list[Tensor]

    def __len__(self) -> int:
        return len(self.physical_batches)

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        return iter(zip(self.physical_batches, self.masks))


class PoissonBatchSampler:
    """Yields, per logical step, the rank's sampled indices padded to ``num_physical * p`` entries.

    Each entry is ``(dataset_index, is_real)``. Always yields, also for an empty sample (then one fully masked
    physical batch), so every rank takes the same number of logical steps.

    Args:
        num_examples: N, the size of the whole dataset.
        sample_rate: q.
        physical_batch_size: p.
        steps_per_epoch: logical steps per ``len()``: what Lightning calls the number of training batches.
        sample_seed: seeds this rank's choice of examples (must differ across ranks and stay secret).
        size_seed: seeds the per-rank sample sizes (must be equal on every rank).
        rank, world_size: this rank's shard is ``range(rank, N, world_size)``.

    Privacy:
        Sampling is Poisson with rate q over the whole dataset, as the accountant assumes; the seeds must be
        unpredictable to an adversary (they are drawn from the OS unless the user fixes ``PrivacyConfig.seed``).
    """

    def __init__(
        self,
        *,
        num_examples: int,
        sample_rate: float,
        physical_batch_size: int,
        steps_per_epoch: int,
        sample_seed: int,
        size_seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_examples < 1:
            raise ValueError("PoissonBatchSampler: the training dataset is empty; there is nothing to sample.")
        self.num_examples = num_examples
        self.sample_rate = sample_rate
        self.physical_batch_size = physical_batch_size
        self.steps_per_epoch = steps_per_epoch
        self.rank, self.world_size = rank, world_size
        self.shard_sizes = [len(range(r, num_examples, world_size)) for r in range(world_size)]
        self._sample_gen = torch.Generator().manual_seed(sample_seed)
        self._size_gen = torch.Generator().manual_seed(size_seed)
        # Lightning calls set_epoch on `batch_sampler.sampler`; the stream simply continues across epochs.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        """No-op: every logical step is a fresh, independent Poisson draw whatever the epoch."""

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for _ in range(self.steps_per_epoch):
            yield self.sample_step()

    def sample_step(self) -> list[tuple[int, bool]]:
        """The next logical step's padded index list for this rank."""
        shard_sizes = torch.tensor(self.shard_sizes, dtype=torch.float64)
        sizes = torch.binomial(shard_sizes, torch.full_like(shard_sizes, self.sample_rate), generator=self._size_gen)
        sizes = sizes.long().tolist()
        num_physical = max(1, max(math.ceil(s / self.physical_batch_size) for s in sizes))
        own = sizes[self.rank]
        chosen = torch.randperm(self.shard_sizes[self.rank], generator=self._sample_gen)[:own]
        indices = (chosen * self.world_size + self.rank).tolist()
        filler = indices[0] if indices else 0  # any valid index: padding rows are masked out
        padding = num_physical * self.physical_batch_size - own
        return [(i, True) for i in indices] + [(filler, False)] * padding

    def state_dict(self) -> dict[str, Any]:
        return {"sample": self._sample_gen.get_state(), "size": self._size_gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sample_gen.set_state(state["sample"])
        self._size_gen.set_state(state["size"])


class _IndexedDataset(Dataset):
    """Reads ``(index, is_real)`` keys: returns ``(dataset[index], is_real)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, bool]) -> tuple[Any, bool]:
        index, real = key
        return self.dataset[index], real

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class _LogicalCollate:
    """Cuts the padded example list into physical batches of p, collated by the user's ``collate_fn``."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], physical_batch_size: int) -> None:
        self.collate_fn = collate_fn
        self.physical_batch_size = physical_batch_size

    def __call__(self, items: Sequence[tuple[Any, bool]]) -> LogicalBatch:
        p = self.physical_batch_size
        batches, masks = [], []
        for start in range(0, len(items), p):
            chunk = items[start : start + p]
            batches.append(self.collate_fn([example for example, _ in chunk]))
            masks.append(torch.tensor([real for _, real in chunk], dtype=torch.bool))
        return LogicalBatch(batches, masks)


_REPLACEABLE_SAMPLERS = (RandomSampler, SequentialSampler, DistributedSampler)


def check_replaceable(dataloader: DataLoader, owner: str) -> None:
    """Refuse loaders whose sampling we cannot replace without changing what the user asked for.

    ``shuffle=True/False`` with a ``batch_size`` (and a ``DistributedSampler`` added by Lightning) are replaced by
    Poisson sampling; a custom sampler or batch sampler, or an iterable dataset, is refused.
    """
    if not isinstance(dataloader, DataLoader):
        raise TypeError(
            f"{owner}: the training dataloader must be a torch DataLoader over a map-style dataset, got "
            f"{type(dataloader).__name__}; DP-SGD needs random access to sample each example independently."
        )
    if isinstance(dataloader.dataset, IterableDataset) or not hasattr(dataloader.dataset, "__len__"):
        raise TypeError(
            f"{owner}: the training dataset ({type(dataloader.dataset).__name__}) is iterable-style; Poisson "
            "sampling needs a map-style dataset with __len__ and __getitem__."
        )
    if dataloader.batch_size is None or type(dataloader.batch_sampler) is not BatchSampler:
        raise ValueError(
            f"{owner}: the training DataLoader uses a custom batch sampler "
            f"({type(dataloader.batch_sampler).__name__}); DP-SGD replaces batching by Poisson sampling, so pass "
            "DataLoader(dataset, batch_size=...) and let the strategy sample."
        )
    if type(dataloader.sampler) not in _REPLACEABLE_SAMPLERS:
        raise ValueError(
            f"{owner}: the training DataLoader uses a custom sampler ({type(dataloader.sampler).__name__}); its "
            "batches are not Poisson samples, so the privacy accounting would not hold for them. Pass "
            "DataLoader(dataset, batch_size=..., shuffle=...) and let the strategy sample."
        )


def make_dp_dataloader(dataloader: DataLoader, sampler: PoissonBatchSampler) -> DataLoader:
    """The user's loader with its sampling replaced by ``sampler``; workers, pinning and collation are kept."""
    kwargs: dict[str, Any] = {
        "num_workers": dataloader.num_workers,
        "pin_memory": dataloader.pin_memory,
        "timeout": dataloader.timeout,
        "worker_init_fn": dataloader.worker_init_fn,
        "multiprocessing_context": dataloader.multiprocessing_context,
        "persistent_workers": dataloader.persistent_workers,
    }
    if dataloader.num_workers > 0:
        kwargs["prefetch_factor"] = dataloader.prefetch_factor
    return DataLoader(
        _IndexedDataset(dataloader.dataset),
        batch_sampler=sampler,
        collate_fn=_LogicalCollate(dataloader.collate_fn, sampler.physical_batch_size),
        **kwargs,
    )
