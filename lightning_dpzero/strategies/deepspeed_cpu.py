"""Lightning's ``DeepSpeedStrategy`` on CPU too (gloo), unchanged on GPUs: the base of ``DPZeroStrategy`` and the
non-private baselines."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from typing_extensions import override

from lightning_dpzero._internals import deepspeed as ds_internals
from lightning_dpzero._internals.lightning import StrategyRegistry

__all__ = ["DeepSpeedCPUStrategy"]


class DeepSpeedCPUStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy``, also on CPU (gloo); on GPUs it is the parent unchanged.

    Lightning refuses CPU in three places: the CUDA check in ``setup_environment``, the device-index check in
    ``setup_distributed`` (CPU devices have no index) and ``deepspeed.initialize(args=Namespace(device_rank=None))``.
    DeepSpeed itself runs ZeRO 1/2/3 on CPU. ``DPZeroStrategy`` builds on this; it is public so that non-private
    baselines run on the same path (``examples/benchmarks/zero_step_time.py``).
    """

    @override
    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            super().setup_environment()
        else:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            return super().setup_distributed()
        reset_seed()  # as the parent, minus its CUDA device-index check
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _device_rank(self) -> contextlib.AbstractContextManager[None]:
        """deepspeed.initialize wants an integer device rank; CPU devices have index None."""
        return ds_internals.device_rank_for_initialize(self.local_rank)

    @override
    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        with self._device_rank():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    @override
    def _initialize_deepspeed_inference(self, model: Any) -> None:
        with self._device_rank():
            super()._initialize_deepspeed_inference(model)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        pass  # not registered by name: Lightning's "deepspeed*" names stay Lightning's
