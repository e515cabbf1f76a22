"""Zeroth-order DP inside DeepSpeed ZeRO-3: ``DPZeroStrategy`` with ``PrivacyConfig(method="zeroth_order")``.

DeepSpeed partitions the parameters but builds no optimizer (no fp32 master copy, no gradient partitions). Each
module's gathered parameters are perturbed (the same public z on every rank) after ZeRO-3's gather and restored
before its release; the P clipped sums are all-reduced, rank 0 releases them, and each rank updates its own
partition ``param.ds_tensor`` in place, regenerating only its slice of z. Pruning selects on the full weights before
DeepSpeed partitions them. Checkpoints: each rank saves its own partitions (``zo_partitions_rank<r>.pt``) beside the
Lightning state.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dpzero._internals import deepspeed as ds_internals
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.method import Reducer
from lightning_dpzero.strategies.deepspeed import DPZeroStrategy
from lightning_dpzero.strategies.reducers import ReplicaReducer

__all__ = ["DPZeroZerothOrderStrategy"]

_ZO_CHECKPOINT = "checkpoint.pt"  # the Lightning state, next to one partition file per rank


def _zo_partition_file(rank: int) -> str:
    return f"zo_partitions_rank{rank}.pt"


class DPZeroZerothOrderStrategy(DPZeroStrategy):
    """Zeroth-order DP at ZeRO stage 3 (what ``DPZeroStrategy(privacy=...)`` builds for ``method="zeroth_order"``)."""

    def __init__(
        self,
        stage: int = 3,
        privacy: PrivacyConfig | None = None,
        stream_clipped_sums: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if stage != 3:
            raise ValueError(
                f"DPZeroStrategy(stage={stage}): zeroth-order DP runs at ZeRO stage 3 (each rank updates its own "
                "parameter partition); at stages 1 and 2 the parameters are replicated: use strategy 'dp_ddp'."
            )
        super().__init__(stage, privacy, stream_clipped_sums=False, **kwargs)
        if self.privacy.zeroth_order is None:
            raise ValueError(
                "DPZeroZerothOrderStrategy: the PrivacyConfig has method='first_order'; use DPZeroStrategy (it builds "
                "this class itself for method='zeroth_order')."
            )

    @override
    def _make_reducer(self) -> Reducer:
        return ReplicaReducer(self.root_device, type(self).__name__)  # its collectives only: the P numbers

    @override
    def _check_deepspeed_config(self) -> None:
        super()._check_deepspeed_config()
        assert isinstance(self.config, dict)
        if "optimizer" in self.config:
            raise ValueError(
                "DPZeroStrategy: zeroth-order DP updates the parameters itself; remove the optimizer from the "
                "DeepSpeed config (the learning rate is the ZO method's)."
            )

    @override
    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        """ZeRO-3 parameter partitioning without a DeepSpeed optimizer: no fp32 master copy, no gradient buffers.

        DeepSpeed builds its parameter offload only (inference-style): the weights live in each rank's partition
        ``param.ds_tensor``, which ``ZOStep`` updates in place, so nothing can overwrite them or go stale. The
        client optimizer is returned as Lightning's optimizer: it never steps, only its learning rates are read.
        """
        import deepspeed

        self._check_deepspeed_config()
        config = self.config
        assert isinstance(config, dict)
        # Persistent (never released) small parameters would keep a gathered copy that the in-place update of
        # the partitions leaves stale: every parameter is gathered for each use instead.
        config.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = 0
        with ds_internals.device_rank_for_initialize(self.local_rank):
            engine, *_ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank),
                config=config,
                model=model,
                dist_init_required=False,
            )
        return engine, optimizer

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        out = closure()  # the forward passes (training_step) and Lightning's bookkeeping; no backward
        if self._dp_step_pending:
            self._dp_step_pending = False
            self._privatize(optimizer)  # the update, in place on the partitions; DeepSpeed's engine never steps
        return out

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        # No DeepSpeed optimizer, so DeepSpeed's checkpoint (whose ZeRO-3 weights live in the optimizer states) would
        # hold none. Each rank writes its own parameter partitions (padding included, as DeepSpeed holds them), rank 0
        # the Lightning state with every rank's DP state.
        self._add_dp_state(checkpoint)
        directory = Path(self.broadcast(str(filepath)))
        if self.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
        self.barrier()
        module = self._connected_module()
        partitions = {name: ds_internals.partition(p).detach().cpu().clone() for name, p in module.named_parameters()}
        torch.save(partitions, directory / _zo_partition_file(self.global_rank))
        if self.is_global_zero:
            kept = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
            kept["buffers"] = {name: b.detach().cpu() for name, b in module.named_buffers()}
            torch.save(kept, directory / _ZO_CHECKPOINT)
        self.barrier()

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        directory = Path(self.broadcast(str(checkpoint_path)))
        partition_file = directory / _zo_partition_file(self.global_rank)
        if not (directory / _ZO_CHECKPOINT).is_file() or not partition_file.is_file():
            raise ValueError(
                f"DPZeroStrategy: {directory} is not a zeroth-order ZeRO-3 checkpoint of this run's rank "
                f"{self.global_rank} (it needs {_ZO_CHECKPOINT} and {partition_file.name}); resume a zeroth-order run "
                "from a checkpoint it wrote, with the same number of ranks."
            )
        checkpoint = torch.load(directory / _ZO_CHECKPOINT, map_location="cpu", weights_only=False)
        partitions = torch.load(partition_file, map_location="cpu", weights_only=True)
        module = self._connected_module()
        with torch.no_grad():
            for name, param in module.named_parameters():
                partition = ds_internals.partition(param)
                if partitions[name].shape != partition.shape:
                    raise ValueError(
                        f"DPZeroStrategy: the checkpoint's partition of {name!r} has shape "
                        f"{tuple(partitions[name].shape)}, this run's {tuple(partition.shape)}: the model or the "
                        "number of ranks changed."
                    )
                partition.copy_(partitions[name])
            buffers = dict(module.named_buffers())
            for name, value in checkpoint.pop("buffers").items():
                buffers[name].copy_(value)
        self._restore_dp_state(checkpoint, checkpoint_path)
        return checkpoint
