"""``"dp_zero1"``, ``"dp_zero2"``, ``"dp_zero3"``: DP-SGD inside DeepSpeed ZeRO (Lightning's ``DeepSpeedStrategy``).

Per logical step, on each rank:
1. the physical batches run forward and the per-example backward of the clipping engine, which computes the
   clipped sums without any parameter gradient (so DeepSpeed's gradient hooks stay idle: no wasted reduction);
2. the clipped sums enter DeepSpeed's own reduction: at ZeRO-1/2 through autograd at the end of the logical step
   (``p.backward(g)`` fires the same hooks a loss backward does); at ZeRO-3 straight into its reduce-scatter
   buckets (no parameter gather), by default each physical batch's sums as soon as they are clipped, accumulating
   in the gradient partitions as DeepSpeed's micro-steps do; then the engine's backward epilogue runs;
3. at ``engine.step()`` DeepSpeed hands the client optimizer this rank's flat fp32 partition of the averaged
   gradient: a wrapper undoes the averaging (x W), adds this rank's noise to the coordinates it owns, divides by
   B = qN and steps. Every coordinate is owned by exactly one rank: noise once per coordinate, shard-local.

Runs on CPU (gloo) as well as on GPUs: Lightning refuses DeepSpeed on CPU; this subclass does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dpzero._internals import deepspeed as ds_internals
from lightning_dpzero._internals import lightning as lightning_internals
from lightning_dpzero._internals.lightning import StrategyRegistry
from lightning_dpzero.clipping.contributions import full_shape
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.ledger import PrivacyLedger, StepRelease
from lightning_dpzero.method import Reducer
from lightning_dpzero.precision import dp_precision_for
from lightning_dpzero.strategies._mixin import DPStrategyMixin
from lightning_dpzero.strategies._noisy_optimizer import _NoisyPartitionOptimizer
from lightning_dpzero.strategies.deepspeed_cpu import DeepSpeedCPUStrategy
from lightning_dpzero.strategies.reducers import ReducerBase

__all__ = ["DPZeroStrategy", "DeepSpeedCPUStrategy", "PartitionReducer"]


class PartitionReducer(ReducerBase):
    """DeepSpeed ZeRO's partitions: the clipped sums enter DeepSpeed's own reduction, and DeepSpeed hands each rank
    its partition of the (averaged) sums at ``engine.step()``, where the noise wrapper releases it.

    ``add``: at ZeRO-1/2 through autograd (``p.backward(g)`` fires the hooks a loss backward does); at ZeRO-3 straight
    into the reduce-scatter bucket, without gathering the parameter. ``flush``: DeepSpeed's backward epilogue.

    Args:
        device: the rank's root device.
        owner: the strategy's class name, for messages.
        engine: returns the ``DeepSpeedEngine`` (built after the reducer).
        streams: stage 3: each physical batch's sums as soon as they are clipped (micro-steps accumulate them).
        world_size: W (DeepSpeed averages over the ranks; the release multiplies by W).
    """

    def __init__(
        self, device: torch.device, owner: str, *, engine: Callable[[], Any], streams: bool, world_size: int
    ) -> None:
        super().__init__(device, owner)
        self.streams, self.world_size = streams, world_size
        self._engine = engine
        self._release: StepRelease | None = None

    def select(self, params: dict[str, nn.Parameter], optimizer: Optimizer | None) -> list[tuple[str, nn.Parameter]]:
        return list(params.items())  # DeepSpeed's optimizer holds flat partitions, not the parameters

    def start(self, physical_index: int) -> None:
        if self.streams:  # the first physical batch of the step overwrites the gradient partitions, the next ones add
            ds_internals.set_micro_step(self._engine().optimizer, physical_index)

    def add(self, name: str, clipped_sum: Tensor | None) -> None:
        param = self.params[name]
        grad = torch.zeros(full_shape(param), device=self.device) if clipped_sum is None else clipped_sum
        grad = grad.to(param.dtype)
        if ds_internals.is_partitioned(param):
            ds_internals.reduce_partitioned(self._engine().optimizer, param, grad)
        else:
            param.backward(grad)  # fires DeepSpeed's reduce hooks, as a loss backward would

    def flush(self) -> None:
        self._engine().allreduce_gradients()

    def release(self, ledger: PrivacyLedger, named: list[tuple[str, nn.Parameter]]) -> None:
        """The sums are in DeepSpeed's partitions: they are released as ``engine.step()`` hands them to the optimizer
        (once per ZeRO-3 sub-group), and the step is accounted by ``close`` after that."""
        self.close()  # a step DeepSpeed never took: accounted all the same (its batch was sampled)
        self._release = ledger.begin_release()

    def release_partitions(self, grads: list[Tensor]) -> None:
        """Called by the noise wrapper with this rank's gradient partitions (the mean over W ranks)."""
        if self._release is None or self._release.closed:
            raise RuntimeError(
                "DeepSpeed stepped the optimizer without a logical step to release (an optimizer step outside "
                "Lightning's training loop?); refusing to hand it un-noised gradients."
            )
        self._release.add(grads, scale=self.world_size)

    def close(self) -> None:
        """After ``engine.step()``: the step's accounting event, once every partition got its noise."""
        if self._release is not None:
            self._release.close()
            self._release = None


class DPZeroStrategy(DPStrategyMixin, DeepSpeedCPUStrategy):
    """DP-SGD with DeepSpeed ZeRO stage 1, 2 or 3.

    Args:
        stage: the ZeRO stage.
        privacy: the privacy settings; ``None`` uses ``PrivacyConfig.default()``. With ``method="zeroth_order"``
            the strategy is a ``DPZeroZerothOrderStrategy`` (stage 3; ``strategies/deepspeed_zo.py``).
        stream_clipped_sums: stage 3 only (its default): each physical batch's clipped sum of each parameter
            enters DeepSpeed's reduce-scatter bucket as soon as it is clipped, and accumulates in this rank's
            gradient partition, as non-private ZeRO-3 does with gradient accumulation: no full-size gradient buffer
            on any rank, one reduce-scatter per physical batch. ``False``: the clipped sums of all physical batches
            are summed in a full-size fp32 buffer on each rank and reduce-scattered once per logical step (less
            communication when there are many physical batches, 4 bytes per parameter more memory).
        **kwargs: passed to Lightning's ``DeepSpeedStrategy`` (``config=`` for your own DeepSpeed config,
            offload settings, bucket sizes...). Settings that would break the guarantee are refused: gradient
            clipping (DeepSpeed clips the aggregated gradient, not each example's), dynamic fp16 loss scaling.
            At stage 3, ``zero_optimization.memory_efficient_linear`` defaults to ``false`` (DeepSpeed's linear
            would compute weight gradients the per-example backward discards).

    Privacy:
        Same step as ``DPStrategy``: Poisson shards per rank, per-example clipping, noise N(0, sigma^2 C^2) once per
        coordinate per logical step (drawn by the rank that owns the coordinate's partition), division by B.
    """

    strategy_name = "dp_zero"

    def __new__(
        cls,
        stage: int = 3,
        privacy: PrivacyConfig | None = None,
        stream_clipped_sums: bool | None = None,
        **kwargs: Any,
    ) -> DPZeroStrategy:
        # The method is chosen once, from the config: zeroth-order at ZeRO-3 is its own strategy class. (The same
        # signature as __init__: Lightning's registry, Hydra and jsonargparse read the class's signature.)
        if cls is DPZeroStrategy and isinstance(privacy, PrivacyConfig) and privacy.zeroth_order is not None:
            from lightning_dpzero.strategies.deepspeed_zo import DPZeroZerothOrderStrategy

            cls = DPZeroZerothOrderStrategy
        return super().__new__(cls)

    def __init__(
        self,
        stage: int = 3,
        privacy: PrivacyConfig | None = None,
        stream_clipped_sums: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"DPZeroStrategy: stage must be 1, 2 or 3, got {stage!r}.")
        if stream_clipped_sums and stage != 3:
            raise ValueError(
                f"DPZeroStrategy(stage={stage}, stream_clipped_sums=True): streaming the clipped sums into the "
                "gradient partitions is implemented at stage 3 only; use stage=3 or stream_clipped_sums=None."
            )
        kwargs.setdefault("loss_scale", 1.0)  # fp16: a static scale of 1; per-example clipping already scales
        super().__init__(stage=stage, **kwargs)
        self._init_dp(privacy)
        if stage == 3 and isinstance(self.config, dict):
            self._use_torch_linear(self.config.setdefault("zero_optimization", {}))
        self.stream_clipped_sums = stage == 3 if stream_clipped_sums is None else stream_clipped_sums

    @staticmethod
    def _use_torch_linear(zero: dict[str, Any]) -> None:
        """ZeRO-3 replaces ``F.linear`` by its own autograd Function (``memory_efficient_linear``, on by default),
        whose backward computes the weight gradient whenever the weight requires grad. The per-example backward
        asks autograd for output gradients only, so torch's own linear skips the weight-gradient matmul, which
        DP replaces by its per-example clipped sums; DeepSpeed's would compute it and throw it away (one wasted
        matmul per linear layer per physical batch, ~15-20% of a transformer's step). In fp32 and DeepSpeed's
        bf16/fp16 modes (the model is cast, no autocast) both save the same tensors for the backward."""
        if zero.get("memory_efficient_linear"):
            rank_zero_warn(
                "DPZeroStrategy: the DeepSpeed config sets zero_optimization.memory_efficient_linear=true; its "
                "linear backward computes every weight gradient, which DP-SGD discards (it sums clipped per-example "
                "gradients instead): one wasted matmul per linear layer per physical batch. Remove the key to let "
                "the strategy turn it off."
            )
        zero.setdefault("memory_efficient_linear", False)

    @override
    def _make_reducer(self) -> Reducer:
        return PartitionReducer(
            self.root_device,
            type(self).__name__,
            engine=lambda: self.model,
            streams=self.stream_clipped_sums,
            world_size=self.world_size,
        )

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._share_seed_and_set_rank()

    @override
    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        self._check_deepspeed_config()
        reducer = self.reducer
        assert isinstance(reducer, PartitionReducer)
        if optimizer is not None:
            self._allow_offload_with(optimizer)
            optimizer = _NoisyPartitionOptimizer(optimizer, reducer)
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        # The optimizer is in the DeepSpeed config: DeepSpeed builds it (DeepSpeedCPUAdam under ZeRO-Offload) and its
        # ZeRO optimizer steps it on the rank's fp32 partitions; the noise wrapper goes between the two.
        engine, zero_optimizer = super()._setup_model_and_optimizer(model, None, lr_scheduler)
        inner = getattr(zero_optimizer, "optimizer", None)
        if not isinstance(inner, Optimizer):
            raise ValueError(
                f"DPZeroStrategy: DeepSpeed's {type(zero_optimizer).__name__} does not expose the optimizer it steps, "
                "so the noise cannot be added before it: define the optimizer in configure_optimizers instead of the "
                "DeepSpeed config."
            )
        zero_optimizer.optimizer = _NoisyPartitionOptimizer(inner, reducer)
        return engine, zero_optimizer

    def _allow_offload_with(self, optimizer: Optimizer) -> None:
        """ZeRO-Offload: DeepSpeed refuses a client optimizer that is not its own CPU Adam/Lion, checking the class of
        what it is handed, which is the noise wrapper. The wrapper steps the user's optimizer on the offloaded fp32
        partitions after adding their noise, so the check is lifted (``zero_force_ds_cpu_optimizer``), with
        DeepSpeed's own advice repeated when the user's optimizer is not a DeepSpeed CPU optimizer."""
        config = self.config
        assert isinstance(config, dict)
        offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
        if offload.get("device", "none") in (None, "none") or "zero_force_ds_cpu_optimizer" in config:
            return
        config["zero_force_ds_cpu_optimizer"] = False
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if not isinstance(optimizer, DeepSpeedCPUAdam):
            rank_zero_warn(
                f"DPZeroStrategy: ZeRO-Offload steps your {type(optimizer).__name__} on the CPU; DeepSpeed's "
                "DeepSpeedCPUAdam (deepspeed.ops.adam) is much faster there. The noise is added either way."
            )

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
        offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
        bypass = {
            "zero_optimization.offload_optimizer.ratio < 1 (partial offload)": offload.get("ratio", 1.0) < 1.0,
            "zero_optimization.offload_optimizer.super_offload": bool(offload.get("super_offload")),
            "zero_optimization.zenflow": bool(config.get("zero_optimization", {}).get("zenflow")),
        }
        for setting, used in bypass.items():
            if used:
                raise ValueError(
                    f"DPZeroStrategy: the DeepSpeed config sets {setting}: DeepSpeed then steps part of the partitions "
                    "with an optimizer of its own, which the noise cannot reach. Remove it (plain ZeRO-Offload, "
                    "offload_optimizer with the default ratio 1, is supported)."
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
        module = self._connected_module()
        # First-order: the engine hooks the modules before deepspeed.initialize, so ZeRO-3 wraps hooked modules.
        # Zeroth-order: pruning scores the full weights before DeepSpeed partitions them.
        self.dp.before_sharding(module)
        config = self.config
        assert isinstance(config, dict)  # DeepSpeedStrategy.__init__ always builds one
        if self.zero_stage_3 and not config["zero_optimization"].get("memory_efficient_linear", True):
            ds_internals.restore_torch_linear()
        DeepSpeedStrategy.setup(self, trainer)
        # After deepspeed.initialize: the reducer streams into DeepSpeed's buckets; zeroth-order's perturbation
        # pre-hooks run after ZeRO-3's gather, and its restoring post-hooks (prepended) before its release.
        self.dp.attach(module, self.reducer)
        self._check_selection_agrees()
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_optimizers()

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)  # the closure, then engine.step()
        reducer = self.reducer
        assert isinstance(reducer, PartitionReducer)
        reducer.close()
        return out

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
        module = self._connected_module()
        with self.precision_plugin.train_step_context():
            return lightning_internals.call_through_wrapper(self, module, module, "training_step", *args, **kwargs)

    @override
    @contextlib.contextmanager
    def _physical_batch_context(self) -> Iterator[None]:
        yield
        ds_internals.release_gathered(self.model)

    @property
    @override
    def _whole_parameters(self) -> bool:
        return not self.zero_stage_3

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        for stage in (1, 2, 3):
            strategy_registry.register(
                f"dp_zero{stage}", cls, description=f"DP-SGD in DeepSpeed ZeRO stage {stage}", stage=stage
            )
