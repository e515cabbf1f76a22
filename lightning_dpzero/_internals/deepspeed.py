"""DeepSpeed internals (0.19): ZeRO's gradient accumulation counter and reduce-scatter entry point, ZeRO-3's
parameter partitions and release, its ``F.linear`` replacement, and ``deepspeed.initialize``'s device rank."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PROBES",
    "device_rank_for_initialize",
    "partition",
    "partition_range",
    "partitioned_away",
    "reduce_partitioned",
    "release_gathered",
    "restore_torch_linear",
    "set_micro_step",
]


def set_micro_step(zero_optimizer: Any, index: int) -> None:
    """ZeRO-3's gradient accumulation counter: micro-step 0 overwrites the gradient partitions, later ones add."""
    zero_optimizer.micro_step_id = index


def reduce_partitioned(zero_optimizer: Any, param: torch.nn.Parameter, grad: Tensor) -> None:
    """ZeRO-3: hand ``grad`` (full shape) to DeepSpeed's reduce-scatter bucket for a partitioned ``param``.

    What DeepSpeed's gradient hook does after a loss backward, without gathering the parameter first (a loss
    backward finds it gathered; here it is partitioned, with ``data`` of shape (0,)). ``param.grad`` must have the
    parameter's shape when assigned, so ``data`` is swapped for a zero-stride full-shape view of one element (no
    memory, no communication) for the assignment only. DeepSpeed copies the gradient into its bucket, reduce-scatters
    it into each rank's partition and drops ``param.grad``, as for any gradient.
    """
    held = param.data
    param.data = grad.new_empty(()).expand(grad.shape)
    try:
        param.grad = grad
    finally:
        param.data = held
    zero_optimizer.reduce_ready_partitions_and_remove_grads(param)


def is_partitioned(param: Tensor) -> bool:
    """Whether ZeRO-3 partitions ``param`` (``deepspeed.zero.Init`` or ``deepspeed.initialize`` at stage 3)."""
    return hasattr(param, "ds_id") or hasattr(param, "ds_tensor")


def partitioned_away(params: Iterable[Tensor]) -> list[Tensor]:
    """The ZeRO-3 parameters among ``params`` whose full values this rank does not hold now (``ds_status``
    NOT_AVAILABLE); gathered ones (a module's during its forward and backward) are left out."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]


def partition(param: Tensor) -> Tensor:
    """This rank's partition of a ZeRO-3 parameter: the flat full parameter's slice, padding included."""
    return param.ds_tensor  # type: ignore[attr-defined]


def partition_range(param: Tensor) -> tuple[int, int, int]:
    """(lo, hi, total): the coordinates of the flat full parameter this rank's partition holds (padding excluded)."""
    import torch.distributed as dist

    part = partition(param)
    total = int(param.ds_numel)  # type: ignore[attr-defined]
    rank = dist.get_rank(group=param.ds_process_group)  # type: ignore[attr-defined]
    lo = min(total, rank * part.numel())
    return lo, min(total, lo + part.numel()), total


def numel(param: Tensor) -> int:
    """The full size of a parameter, partitioned or not."""
    return int(getattr(param, "ds_numel", param.numel()))


def release_gathered(engine: Any) -> None:
    """ZeRO-3: release every gathered parameter (the per-example backward stops at the lowest tap, so the lowest
    modules' backward, which releases them, never runs)."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is not None:
        offload.partition_all_parameters()


def restore_torch_linear() -> None:
    """Undo the ``F.linear`` replacement an earlier ``zero.Init`` of this process left behind (DeepSpeed keeps it
    "unless manually reset"; e.g. a non-private ZeRO-3 run before this one in a Hydra multirun)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if torch.nn.functional.linear is zero3_linear_wrap and original is not None:
        torch.nn.functional.linear = original


@contextlib.contextmanager
def device_rank_for_initialize(local_rank: int) -> Iterator[None]:
    """``deepspeed.initialize`` wants an integer device rank; Lightning passes CPU devices' index, None."""
    import deepspeed

    original = deepspeed.initialize

    def initialize(*args: Any, **kwargs: Any) -> Any:
        ns = kwargs.get("args")
        if ns is not None and getattr(ns, "device_rank", 0) is None:
            kwargs["args"] = argparse.Namespace(**{**vars(ns), "device_rank": local_rank})
        return original(*args, **kwargs)

    deepspeed.initialize = initialize
    try:
        yield
    finally:
        deepspeed.initialize = original


def _probe_zero_optimizers() -> None:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert callable(DeepSpeedZeroOptimizer_Stage3.reduce_ready_partitions_and_remove_grads)
    import inspect

    source = inspect.getsource(DeepSpeedZeroOptimizer_Stage3)
    assert "micro_step_id" in source and "parameter_offload" in source
    assert "micro_step_id" in inspect.getsource(DeepSpeedZeroOptimizer)


def _probe_offload() -> None:
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    assert callable(DeepSpeedZeRoOffload.partition_all_parameters)


def _probe_linear() -> None:
    from deepspeed.runtime.zero.linear import zero3_linear_wrap  # noqa: F401
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses  # noqa: F401

    restore_torch_linear()
    assert torch.nn.functional.linear.__module__.startswith("torch")


def _probe_partition_attributes() -> None:
    import inspect

    from deepspeed.runtime.zero import partition_parameters

    source = inspect.getsource(partition_parameters)
    for name in ("ds_tensor", "ds_numel", "ds_process_group", "ds_id", "ds_status"):
        assert f"param.{name}" in source, name
    assert partition_parameters.ZeroParamStatus.NOT_AVAILABLE is not None


PROBES: dict[str, Callable[[], None]] = {
    "ZeRO optimizers: micro_step_id, reduce_ready_partitions_and_remove_grads": _probe_zero_optimizers,
    "ZeRO-3 parameter_offload.partition_all_parameters": _probe_offload,
    "ZeRO-3 F.linear replacement (zero3_linear_wrap, linear_bk)": _probe_linear,
    "ZeRO-3 parameter attributes ds_tensor, ds_numel, ds_process_group, ds_id, ds_status": _probe_partition_attributes,
}
