"""Reducers: where each strategy sums a logical step's clipped sums and which coordinates each rank owns.

A strategy picks one (``lightning_dpzero.method.Reducer``): ``LocalReducer`` (one device), ``ReplicaReducer``
(data-parallel replicas: a reduce-scatter hands each rank 1/W of the coordinates, which it releases, and an
all-gather gives every replica the released gradient: the bytes of one all-reduce); the sharded strategies define
theirs next to them (``dp_fsdp``: FSDP2's dim-0 shards; ``dp_zero*``: DeepSpeed's partitions).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_dpzero._internals import torch as torch_internals
from lightning_dpzero.ledger import PrivacyLedger

__all__ = ["LocalReducer", "ReducerBase", "ReplicaReducer"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ReducerBase:
    """What every reducer shares: the parameter selection from the optimizer, and small collectives.

    Args:
        device: the rank's root device: collectives run there (NCCL reduces device tensors only).
        owner: the strategy's class name, for messages.
    """

    streams = False
    communicates = True  # False: the collectives are no-ops (one device owns everything)

    def __init__(self, device: torch.device, owner: str) -> None:
        self.device, self.owner = device, owner
        self.params: dict[str, nn.Parameter] = {}

    def select(self, params: dict[str, nn.Parameter], optimizer: Optimizer | None) -> list[tuple[str, nn.Parameter]]:
        """The parameters ``optimizer`` updates, with their names in ``params``, in the optimizer's order (frozen
        parameters in the optimizer are skipped: they receive no gradient, so the optimizer leaves them as they are)."""
        if optimizer is None:
            return list(params.items())
        names = {id(p): name for name, p in params.items()}
        named = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if id(p) not in names:
                    raise ValueError(
                        f"{self.owner}: the optimizer holds a parameter of shape {tuple(p.shape)} that is not one of "
                        "the LightningModule's parameters trained under DP: a parameter of another module, or one "
                        "made trainable after training started (gradual unfreezing, e.g. BackboneFinetuning; the "
                        "per-example clipping covers the parameters trainable when fit starts). DP cannot bound its "
                        "sensitivity."
                    )
                named.append((names[id(p)], p))
        return named

    def bind(self, params: dict[str, nn.Parameter]) -> None:
        self.params = params

    def start(self, physical_index: int) -> None:
        pass

    def all_reduce(self, values: Tensor) -> None:
        self._on_device(values, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))

    def broadcast(self, values: Tensor, src: int = 0) -> None:
        self._on_device(values, lambda t: dist.broadcast(t, src=src))

    def _on_device(self, values: Tensor, collective: Callable[[Tensor], object]) -> None:
        if not (self.communicates and _distributed()):
            return
        on_device = values.to(self.device)
        collective(on_device)
        if on_device is not values:
            values.copy_(on_device.to(values.device))


class LocalReducer(ReducerBase):
    """One device owns every coordinate: the step's clipped sums, released as one flat fp32 buffer. It never
    communicates (a single-device run inside a process group stays on its own)."""

    communicates = False

    def __init__(self, device: torch.device, owner: str) -> None:
        super().__init__(device, owner)
        self._sums: dict[str, Tensor] = {}

    def add(self, name: str, clipped_sum: Tensor | None) -> None:
        if clipped_sum is None:
            return
        if name in self._sums:
            self._sums[name] = self._sums[name] + clipped_sum
        else:
            self._sums[name] = clipped_sum

    def flush(self) -> None:
        pass

    def _flat(self, named: list[tuple[str, nn.Parameter]]) -> Tensor:
        """The step's clipped sums of ``named`` in one flat fp32 buffer (zeros where nothing was added)."""
        sums, self._sums = self._sums, {}
        device = named[0][1].device
        return torch.cat(
            [
                sums[name].flatten().float() if name in sums else torch.zeros(p.numel(), device=device)
                for name, p in named
            ]
        )

    def release(self, ledger: PrivacyLedger, named: list[tuple[str, nn.Parameter]]) -> None:
        if not named:
            ledger.release([])
            return
        flat = self._flat(named)
        ledger.release([flat])
        _write_gradients(flat, named)


class ReplicaReducer(LocalReducer):
    """Data-parallel replicas (``dp_ddp``): rank r owns the r-th 1/W of the flat clipped sums.

    A reduce-scatter sums the ranks' flat buffers and hands rank r its piece, the ledger releases that piece (noise
    drawn once per coordinate, by its owner), and an all-gather gives every replica the whole released gradient:
    the same bytes as one all-reduce (which is a reduce-scatter and an all-gather), one noise draw per coordinate.
    """

    communicates = True

    def release(self, ledger: PrivacyLedger, named: list[tuple[str, nn.Parameter]]) -> None:
        if not named or not _distributed():
            super().release(ledger, named)
            return
        world = dist.get_world_size()
        flat = self._flat(named)
        size = flat.numel()
        piece = math.ceil(size / world)
        padded = torch.zeros(piece * world, device=self.device)
        padded[:size] = flat
        owned = torch.empty(piece, device=self.device)
        torch_internals.reduce_scatter(owned, padded)
        ledger.release([owned[: max(0, min(piece, size - dist.get_rank() * piece))]])
        torch_internals.all_gather(padded, owned)
        _write_gradients(padded[:size].to(flat.device), named)


def _write_gradients(flat: Tensor, named: list[tuple[str, nn.Parameter]]) -> None:
    offset = 0
    for _, param in named:
        param.grad = flat[offset : offset + param.numel()].view_as(param).to(param.dtype)
        offset += param.numel()
