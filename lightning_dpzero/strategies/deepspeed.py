"""``"dp_zero1"``, ``"dp_zero2"``, ``"dp_zero3"``: DP-SGD inside DeepSpeed ZeRO (Lightning's ``DeepSpeedStrategy``).

Per logical step, on each rank:
1. the physical batches run forward and the per-example backward of the clipping engine, which computes the
   clipped sums without any parameter gradient (so DeepSpeed's gradient hooks stay idle: no wasted reduction);
2. the clipped sums enter DeepSpeed's own reduction through autograd (``p.backward(g)`` fires the same hooks a
   loss backward does; at ZeRO-3 each parameter is gathered for it), then the engine's backward epilogue runs;
3. at ``engine.step()`` DeepSpeed hands the client optimizer this rank's flat fp32 partition of the averaged
   gradient: a wrapper undoes the averaging (x W), adds this rank's noise to the coordinates it owns, divides by
   B = qN and steps. Every coordinate is owned by exactly one rank: noise once per coordinate, shard-local.

Runs on CPU (gloo) as well as on GPUs: Lightning refuses DeepSpeed on CPU; this subclass does not.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dpzero.clipping.contributions import full_shape
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.precision import dp_precision_for
from lightning_dpzero.step import DPStep
from lightning_dpzero.strategies._mixin import DPStrategyMixin

__all__ = ["DPZeroStrategy", "DeepSpeedCPUStrategy"]


class _NoisyPartitionOptimizer(Optimizer):
    """Wraps the client optimizer: noise and normalisation on the rank's gradient partition, then the step.

    DeepSpeed calls ``step()`` with ``param_groups`` holding this rank's flat fp32 partition(s), whose ``.grad``
    is the mean over the W ranks of the clipped sums.
    """

    def __init__(self, inner: Optimizer, dp: DPStep, world_size: int) -> None:
        self.inner, self.dp, self.world_size = inner, dp, world_size  # no super().__init__: all state is inner's

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.inner.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self.inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.inner.defaults = value

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.inner.add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.inner.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.dp.add_noise_and_normalise(p.grad, scale=self.world_size)
        return self.inner.step(closure)

    def __repr__(self) -> str:
        return f"DPNoise({self.inner!r})"


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

    @contextlib.contextmanager
    def _device_rank(self) -> Iterator[None]:
        """deepspeed.initialize wants an integer device rank; CPU devices have index None."""
        import deepspeed

        original, local_rank = deepspeed.initialize, self.local_rank

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
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        pass  # not registered by name: Lightning's "deepspeed*" names stay Lightning's


class DPZeroStrategy(DPStrategyMixin, DeepSpeedCPUStrategy):
    """DP-SGD with DeepSpeed ZeRO stage 1, 2 or 3.

    Args:
        stage: the ZeRO stage.
        privacy: the privacy settings; ``None`` uses ``PrivacyConfig.default()``.
        **kwargs: passed to Lightning's ``DeepSpeedStrategy`` (``config=`` for your own DeepSpeed config,
            offload settings, bucket sizes...). Settings that would break the guarantee are refused: gradient
            clipping (DeepSpeed clips the aggregated gradient, not each example's), dynamic fp16 loss scaling.

    Privacy:
        Same step as ``DPStrategy``: Poisson shards per rank, per-example clipping, noise N(0, sigma^2 C^2) once per
        coordinate per logical step (drawn by the rank that owns the coordinate's partition), division by B.
    """

    strategy_name = "dp_zero"

    def __init__(self, stage: int = 3, privacy: PrivacyConfig | None = None, **kwargs: Any) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"DPZeroStrategy: stage must be 1, 2 or 3, got {stage!r}.")
        kwargs.setdefault("loss_scale", 1.0)  # fp16: a static scale of 1; per-example clipping already scales
        super().__init__(stage=stage, **kwargs)
        self._init_dp(privacy)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._share_seed_and_set_rank()

    @override
    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        self._check_deepspeed_config()
        if optimizer is not None:
            optimizer = _NoisyPartitionOptimizer(optimizer, self.dp, self.world_size)
        return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    def _check_deepspeed_config(self) -> None:
        config = self.config
        assert isinstance(config, dict)
        if config.get("gradient_clipping", 0.0):
            raise ValueError(
                f"DPZeroStrategy: the DeepSpeed config sets gradient_clipping={config['gradient_clipping']}; it clips "
                "the aggregated gradient, which is not per-example clipping and would also read the un-noised "
                "gradient norm. Remove it (DP clipping is PrivacyConfig.clip_norm)."
            )
        config["gradient_clipping"] = 0.0  # DeepSpeed >= 0.19 defaults it to 1.0 when the key is absent
        fp16 = config.get("fp16", {})
        if fp16.get("enabled") and fp16.get("loss_scale", 0) != 1:
            kind = "dynamic" if fp16.get("loss_scale", 0) == 0 else f"a static scale of {fp16['loss_scale']}"
            raise ValueError(
                f"DPZeroStrategy: the DeepSpeed config scales the fp16 loss ({kind}); under DP the loss scale must be "
                "1 (fp16.loss_scale=1): per-example clipping already scales each gradient, a dynamic scaler skips "
                "steps depending on the data, and the clipped sums enter DeepSpeed unscaled. Use fp16.loss_scale=1 "
                "or bf16 (DPPrecision('bf16-mixed'))."
            )
        if "optimizer" in config:
            raise ValueError(
                "DPZeroStrategy: define the optimizer in configure_optimizers, not in the DeepSpeed config: the "
                "strategy wraps the client optimizer to add the noise."
            )

    @override
    def _dp_precision(self, plugin: Any) -> Any:
        """DeepSpeed's own plugin (its bf16 / fp16 config sections; fp16 with the static loss scale of 1)."""
        from lightning.pytorch.plugins.precision import DeepSpeedPrecision

        if isinstance(plugin, DeepSpeedPrecision):
            return plugin
        return DeepSpeedPrecision(dp_precision_for(plugin, type(self).__name__).precision)

    # ------------------------------------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._check_trainer(trainer)
        self.dp.attach(self.lightning_module)  # before deepspeed.initialize: ZeRO-3 then wraps hooked modules
        DeepSpeedStrategy.setup(self, trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_optimizers()

    @override
    def _check_optimizers(self) -> None:
        if len(self.optimizers) != 1:
            super()._check_optimizers()

    # ------------------------------------------------------------------------------------------ the step
    @override
    def _physical_training_step(self, *args: Any, **kwargs: Any) -> Any:
        # Through the LightningModule's own __call__ (ZeRO-3's module hooks gather parameters as usual), not the
        # engine's forward: that would register DeepSpeed's loss hooks, whose epilogue reduces gradients at the end
        # of every backward, including the per-example backward that produces none.
        module = self.lightning_module
        with self.precision_plugin.train_step_context():
            return self._forward_redirection(module, module, "training_step", *args, **kwargs)

    @override
    @contextlib.contextmanager
    def _physical_batch_context(self) -> Iterator[None]:
        yield
        offload = getattr(getattr(self.model, "optimizer", None), "parameter_offload", None)
        if offload is not None:
            # ZeRO-3 releases a module's gathered parameters in its backward; the per-example backward stops at the
            # lowest tap, so the lowest modules' backward never runs: release their parameters here.
            offload.partition_all_parameters()

    @override
    def _privatize(self, optimizer: Optimizer) -> None:
        """Feed the clipped sums into DeepSpeed's reduction; noise is added in the client optimizer's step."""
        import deepspeed

        engine = self.model
        assert isinstance(engine, deepspeed.DeepSpeedEngine)
        named = list(self.dp.engine.params.items())  # type: ignore[union-attr]
        summed = self.dp.begin_step([name for name, _ in named])
        for name, param in named:
            grad = summed.get(name)
            if grad is None:
                grad = torch.zeros(full_shape(param), device=self.root_device)
            gather = deepspeed.zero.GatheredParameters([param]) if hasattr(param, "ds_id") else contextlib.nullcontext()
            with gather:
                param.backward(grad.to(param.dtype))  # fires DeepSpeed's reduce hooks, as a loss backward would
        engine.allreduce_gradients()
        self.dp.account_step()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for stage in (1, 2, 3):
            strategy_registry.register(
                f"dp_zero{stage}", cls, description=f"DP-SGD in DeepSpeed ZeRO stage {stage}", stage=stage
            )
