"""Poisson logical batches cut into masked physical batches of p rows (docs/design.md).

Each logical step, every example of the rank's shard is included independently with probability q. The draw is
done as L ~ Binomial(|shard|, q) followed by a uniform L-subset, which has exactly the Poisson distribution
(Beltran et al. 2406.17298, Lemma 1) at the cost of O(L) random numbers. With W ranks, rank r owns the disjoint
shard r, r+W, r+2W, ...; the union of the W per-rank samples is a Poisson sample of the whole dataset.

All ranks must run the same number of physical batches per logical step. The per-rank sizes are drawn from a
stream of the run's key that every rank shares, so each rank knows all W sizes and the maximum without any
communication; which examples are drawn comes from each rank's own stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from lightning_dpzero.randomness import SecretKey

__all__ = ["LogicalBatch", "PoissonBatchSampler", "make_dp_dataloader"]


@dataclass
class LogicalBatch:
    """One logical step's data on one rank: fixed-shape physical batches and their 0/1 masks.

    ``physical_batches[j]`` is whatever the user's ``collate_fn`` makes of p examples; ``masks[j]`` has shape
    [p], 1 for sampled examples and 0 for padding rows, which are copies of a real example and contribute
    exactly zero to the gradient. ``indices[j]`` are the dataset indices of its p rows (the per-example self-check
    fetches them again); ``sample_index`` numbers the Poisson draw (0, 1, 2, ...) and ``sample_rate`` is the q it
    was drawn with, which the accountant must record.

    Privacy:
        The number of real rows is the realised (private) batch size, and ``indices`` the sampled examples: both are
        used in memory only, never logged.
    """

    physical_batches: list[Any]
    masks: list[Tensor]
    indices: list[list[int]] = field(default_factory=list)
    sample_index: int = 0
    sample_rate: float | None = None

    def __len__(self) -> int:
        return len(self.physical_batches)

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        return iter(zip(self.physical_batches, self.masks))


@dataclass(frozen=True)
class _StepHeader:
    """The first key of a logical step's key list: which Poisson draw it is, its q, and the rows of each of its
    physical batches (read by the collate)."""

    sample_index: int
    sample_rate: float
    sizes: tuple[int, ...]


def physical_sizes(rows: int, p: int, num_physical: int, shapes: str = "fixed") -> list[int]:
    """The row counts of a rank's ``num_physical`` physical batches holding its ``rows`` sampled examples.

    ``fixed``: p each. ``few``: full batches of p, then the last partly filled one and any fully masked ones take
    the smallest of p, ceil(p/2), ceil(p/4), ceil(p/8) that holds their rows.
    """
    if shapes == "fixed":
        return [p] * num_physical
    choices = sorted({math.ceil(p / 2**k) for k in range(4)})
    sizes = []
    for _ in range(num_physical):
        need = min(rows, p)
        sizes.append(next(c for c in choices if c >= need) if need < p else p)
        rows -= need
    return sizes


class PoissonBatchSampler:
    """Yields, per logical step, the rank's sampled indices padded to fill its physical batches (``physical_sizes``).

    Each entry is ``(dataset_index, is_real)``, after a header naming the draw. Always yields, also for an empty
    sample (then one fully masked physical batch), so every rank takes the same number of logical steps.

    Args:
        num_examples: N, the size of the whole dataset.
        sample_rate: q.
        physical_batch_size: p.
        shapes: ``fixed`` (every physical batch p rows) or ``few`` (``PrivacyConfig.physical_batch_shapes``).
        steps_per_epoch: logical steps per ``len()``: what Lightning calls the number of training batches.
        key: the run's secret key (the same on every rank).
        rank, world_size: this rank's shard is ``range(rank, N, world_size)``.

    Privacy:
        Sampling is Poisson with rate q over the whole dataset, as the accountant assumes. Draw s comes from the
        key's streams ("size", s) (the per-rank sizes, identical on every rank) and ("sample", rank, s) (which
        examples): nothing but the public counter ``position`` is kept, so nothing about past or future samples is
        checkpointed.
    """

    def __init__(
        self,
        *,
        num_examples: int,
        sample_rate: float,
        physical_batch_size: int,
        steps_per_epoch: int,
        key: SecretKey,
        rank: int = 0,
        world_size: int = 1,
        shapes: str = "fixed",
    ) -> None:
        if num_examples < 1:
            raise ValueError("PoissonBatchSampler: the training dataset is empty; there is nothing to sample.")
        self.num_examples = num_examples
        self.sample_rate = sample_rate
        self.physical_batch_size = physical_batch_size
        self.shapes = shapes
        self.steps_per_epoch = steps_per_epoch
        self.rank, self.world_size = rank, world_size
        self.shard_sizes = [len(range(r, num_examples, world_size)) for r in range(world_size)]
        self._key = key
        self.position = 0  # the index of the next draw: a public counter
        # Lightning calls set_epoch on `batch_sampler.sampler`; the draws simply continue across epochs.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        """No-op: every logical step is a fresh, independent Poisson draw whatever the epoch."""

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[Any]]:
        for _ in range(self.steps_per_epoch):
            index = self.position
            keys, sizes = self.sample_step()
            yield [_StepHeader(index, self.sample_rate, tuple(sizes)), *keys]

    def sample_step(self) -> tuple[list[tuple[int, bool]], list[int]]:
        """The next logical step's padded index list for this rank, and the rows of each of its physical batches
        (the same number of batches on every rank)."""
        position, self.position = self.position, self.position + 1
        sizes = self._key.numpy_generator("size", position).binomial(self.shard_sizes, self.sample_rate).tolist()
        p = self.physical_batch_size
        num_physical = max(1, max(math.ceil(s / p) for s in sizes))
        own = sizes[self.rank]
        picker = self._key.numpy_generator("sample", self.rank, position)
        chosen = picker.choice(self.shard_sizes[self.rank], size=own, replace=False)  # a uniform own-subset
        indices = [int(i) * self.world_size + self.rank for i in chosen]
        filler = indices[0] if indices else 0  # any valid index: padding rows are masked out
        rows = physical_sizes(own, p, num_physical, self.shapes)
        return [(i, True) for i in indices] + [(filler, False)] * (sum(rows) - own), rows

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class _IndexedDataset(Dataset):
    """Reads ``(index, is_real)`` keys: returns ``(dataset[index], is_real)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, bool] | _StepHeader) -> Any:
        if isinstance(key, _StepHeader):
            return key
        index, real = key
        return (index, self.dataset[index]), real

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class _LogicalCollate:
    """Cuts the padded example list into the header's physical batches, collated by the user's ``collate_fn``."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: Sequence[Any]) -> LogicalBatch:
        header, rows = items[0], items[1:]
        assert isinstance(header, _StepHeader), "the Poisson sampler's key list starts with its header"
        assert sum(header.sizes) == len(rows), "the physical batches hold every row of the step"
        batches, masks, indices = [], [], []
        start = 0
        for size in header.sizes:
            chunk, start = rows[start : start + size], start + size
            batches.append(self.collate_fn([example for (_, example), _ in chunk]))
            masks.append(torch.tensor([real for _, real in chunk], dtype=torch.bool))
            indices.append([index for (index, _), _ in chunk])
        return LogicalBatch(batches, masks, indices, header.sample_index, header.sample_rate)


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
        what = (
            "batch_size=None (each item is taken as a batch)"
            if dataloader.batch_sampler is None
            else f"a custom batch sampler ({type(dataloader.batch_sampler).__name__})"
        )
        raise ValueError(
            f"{owner}: the training DataLoader has {what}; DP-SGD replaces batching by Poisson sampling of single "
            "examples, so pass DataLoader(dataset, batch_size=...) and let the strategy sample."
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
        collate_fn=_LogicalCollate(dataloader.collate_fn),
        **kwargs,
    )
