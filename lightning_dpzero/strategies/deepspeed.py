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

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, cast

import lightning.pytorch as pl
import torch
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dpzero.clipping.contributions import full_shape
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.precision import dp_precision_for
from lightning_dpzero.strategies._mixin import DPStrategyMixin
from lightning_dpzero.strategies._noisy_optimizer import _NoisyPartitionOptimizer
from lightning_dpzero.strategies.deepspeed_cpu import DeepSpeedCPUStrategy
from lightning_dpzero.zeroth_order.step import ZOStep

__all__ = ["DPZeroStrategy", "DeepSpeedCPUStrategy"]

_ZO_CHECKPOINT = "checkpoint.pt"  # zeroth-order at ZeRO-3: the Lightning state, next to one partition file per rank


class _ZeRO3Parameter(Protocol):
    """What DeepSpeed ZeRO-3 adds to a parameter it partitions (deepspeed ships no type information)."""

    ds_tensor: torch.Tensor  # this rank's partition of the flat parameter, padding included


def _zo_partition_file(rank: int) -> str:
    return f"zo_partitions_rank{rank}.pt"


class DPZeroStrategy(DPStrategyMixin, DeepSpeedCPUStrategy):
    """DP-SGD with DeepSpeed ZeRO stage 1, 2 or 3.

    Args:
        stage: the ZeRO stage.
        privacy: the privacy settings; ``None`` uses ``PrivacyConfig.default()``.
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

    Zeroth-order (``PrivacyConfig(method="zeroth_order")``, stage 3 only): DeepSpeed partitions the parameters
    but builds no optimizer (no fp32 master copy, no gradient partitions). Each module's gathered parameters are
    perturbed (same public z on every rank) after ZeRO-3's gather and restored before its release; the P clipped
    sums are all-reduced (noise from rank 0 only) and each rank updates its own partition ``param.ds_tensor`` in
    place, regenerating only its slice of z. Pruning selects on the full weights before DeepSpeed partitions them.
    Checkpoints: each rank saves its own partitions (``zo_partitions_rank<r>.pt``) beside the Lightning state.
    """

    strategy_name = "dp_zero"

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
        if isinstance(self.dp, ZOStep) and stage != 3:
            raise ValueError(
                f"DPZeroStrategy(stage={stage}): zeroth-order DP runs at ZeRO stage 3 (each rank updates its own "
                "parameter partition); at stages 1 and 2 the parameters are replicated: use strategy 'dp_ddp'."
            )

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
    def setup_environment(self) -> None:
        super().setup_environment()
        self._share_seed_and_set_rank()

    @override
    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        self._check_deepspeed_config()
        if isinstance(self.dp, ZOStep):
            return self._setup_zeroth_order(model, optimizer)
        if optimizer is not None:
            self._allow_offload_with(optimizer)
            optimizer = _NoisyPartitionOptimizer(optimizer, self.dp, self.world_size)
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
        zero_optimizer.optimizer = _NoisyPartitionOptimizer(inner, self.dp, self.world_size)
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
        if "optimizer" in config and isinstance(self.dp, ZOStep):
            raise ValueError(
                "DPZeroStrategy: zeroth-order DP updates the parameters itself; remove the optimizer from the "
                "DeepSpeed config (the learning rate is the ZO method's)."
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
        if isinstance(self.dp, ZOStep):
            DeepSpeedStrategy.setup(self, trainer)
            # After deepspeed.initialize: the perturbation pre-hooks then run after ZeRO-3's gather, and the restoring
            # post-hooks (prepended) before its release.
            self.dp.attach(self._connected_module())
            self._check_selection_agrees()
            if trainer.state.fn == TrainerFn.FITTING:
                self._check_optimizers()
            return
        self.dp.attach(self._connected_module())  # before deepspeed.initialize: ZeRO-3 then wraps hooked modules
        config = self.config
        assert isinstance(config, dict)  # DeepSpeedStrategy.__init__ always builds one
        if self.zero_stage_3 and not config["zero_optimization"].get("memory_efficient_linear", True):
            _restore_torch_linear()
        DeepSpeedStrategy.setup(self, trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_optimizers()
        assert self.dp.engine is not None
        self.dp.engine.sink = self._reduce_clipped_sum if self.stream_clipped_sums else None

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
            return self._forward_redirection(module, module, "training_step", *args, **kwargs)

    @override
    @contextlib.contextmanager
    def _physical_batch_context(self) -> Iterator[None]:
        streaming = self.stream_clipped_sums and not isinstance(self.dp, ZOStep)
        engine: Any = self.model  # the DeepSpeedEngine (deepspeed ships no type information)
        if streaming:
            # The first physical batch of the step overwrites the gradient partitions, the next ones add to them.
            engine.optimizer.micro_step_id = self._physical_index
        yield
        if streaming:
            engine.allreduce_gradients()  # flush the bucket: this physical batch's reduce-scatters are done
        offload = getattr(getattr(self.model, "optimizer", None), "parameter_offload", None)
        if offload is not None:
            # ZeRO-3 releases a module's gathered parameters in its backward; the per-example backward stops at the
            # lowest tap, so the lowest modules' backward never runs: release their parameters here.
            offload.partition_all_parameters()

    @property
    @override
    def _whole_parameters(self) -> bool:
        return not self.zero_stage_3

    @override
    @contextlib.contextmanager
    def _probe_context(self) -> Iterator[None]:
        # No gradient accumulation state to set and nothing to flush; ZeRO-3's gathered parameters are released.
        yield
        offload = getattr(getattr(self.model, "optimizer", None), "parameter_offload", None)
        if offload is not None:
            offload.partition_all_parameters()

    @override
    def _privatize(self, optimizer: Optimizer) -> None:
        """Feed the clipped sums into DeepSpeed's reduction; noise is added in the client optimizer's step."""
        import deepspeed

        if isinstance(self.dp, ZOStep):  # P numbers summed over the ranks; each rank updates its own partitions
            self.dp.update(optimizer, all_reduce=self._all_reduce_on_device)
            return

        engine = self.model
        assert isinstance(engine, deepspeed.DeepSpeedEngine)
        assert self.dp.engine is not None  # first-order: attached in setup
        named = list(self.dp.engine.params.items())
        summed = self.dp.begin_step([name for name, _ in named])
        if self.stream_clipped_sums:  # already in the gradient partitions, physical batch by physical batch
            self.dp.account_step()
            return
        for name, param in named:
            grad = summed.pop(name, None)
            if grad is None:
                grad = torch.zeros(full_shape(param), device=self.root_device)
            grad = grad.to(param.dtype)
            if hasattr(param, "ds_id"):
                _reduce_partitioned(engine.optimizer, param, grad)
            else:
                param.backward(grad)  # fires DeepSpeed's reduce hooks, as a loss backward would
            del grad  # the fp32 clipped sum of this parameter is freed as soon as it is in a bucket
        engine.allreduce_gradients()
        self.dp.account_step()

    def _reduce_clipped_sum(self, name: str, grad: torch.Tensor | None) -> None:
        """The engine's sink (streaming, stage 3): one parameter's clipped sum of one physical batch, into
        DeepSpeed's reduce-scatter bucket; a parameter nothing reached sends zeros (every rank, the same calls)."""
        assert self.dp.engine is not None
        param = self.dp.engine.params[name]
        if grad is None:
            grad = torch.zeros(full_shape(param), device=self.root_device)
        engine: Any = self.model  # the DeepSpeedEngine (deepspeed ships no type information)
        _reduce_partitioned(engine.optimizer, param, grad.to(param.dtype))

    # ------------------------------------------------------------------------------------- zeroth-order
    def _setup_zeroth_order(self, model: Any, optimizer: Optimizer | None) -> Any:
        """ZeRO-3 parameter partitioning without a DeepSpeed optimizer: no fp32 master copy, no gradient buffers.

        DeepSpeed builds its parameter offload only (inference-style): the weights live in each rank's partition
        ``param.ds_tensor``, which ``ZOStep`` updates in place, so nothing can overwrite them or go stale. The
        client optimizer is returned as Lightning's optimizer: it never steps, only its learning rates are read.
        """
        import deepspeed

        config = self.config
        assert isinstance(config, dict)
        # Persistent (never released) small parameters would keep a gathered copy that the in-place update of
        # the partitions leaves stale: every parameter is gathered for each use instead.
        config.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = 0
        assert isinstance(self.dp, ZOStep)
        self.dp.select_before_sharding(self._connected_module())  # pruning: SynFlow on the full weights
        with self._device_rank():
            engine, *_ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank),
                config=config,
                model=model,
                dist_init_required=False,
            )
        return engine, optimizer

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not isinstance(self.dp, ZOStep):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # Zeroth-order: no DeepSpeed optimizer, so DeepSpeed's checkpoint (whose ZeRO-3 weights live in the optimizer
        # states) would hold none. Each rank writes its own parameter partitions (padding included, as DeepSpeed
        # holds them), rank 0 the Lightning state with every rank's DP state.
        self._add_dp_state(checkpoint)
        directory = Path(self.broadcast(str(filepath)))
        if self.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
        self.barrier()
        module = self._connected_module()
        partitions = {
            name: cast(_ZeRO3Parameter, p).ds_tensor.detach().cpu().clone() for name, p in module.named_parameters()
        }
        torch.save(partitions, directory / _zo_partition_file(self.global_rank))
        if self.is_global_zero:
            kept = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
            kept["buffers"] = {name: b.detach().cpu() for name, b in module.named_buffers()}
            torch.save(kept, directory / _ZO_CHECKPOINT)
        self.barrier()

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not isinstance(self.dp, ZOStep):
            return super().load_checkpoint(checkpoint_path, *args, **kwargs)
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
                partition = cast(_ZeRO3Parameter, param).ds_tensor
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

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if not isinstance(self.dp, ZOStep):
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        out = closure()  # the forward passes (training_step) and Lightning's bookkeeping; no backward
        if self._dp_step_pending:
            self._dp_step_pending = False
            self._privatize(optimizer)  # the update, in place on the partitions; DeepSpeed's engine never steps
        return out

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for stage in (1, 2, 3):
            strategy_registry.register(
                f"dp_zero{stage}", cls, description=f"DP-SGD in DeepSpeed ZeRO stage {stage}", stage=stage
            )


def _restore_torch_linear() -> None:
    """Undo the ``F.linear`` replacement an earlier ``zero.Init`` of this process left behind (DeepSpeed keeps it
    "unless manually reset"; e.g. a non-private ZeRO-3 run before this one in a Hydra multirun)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if torch.nn.functional.linear is zero3_linear_wrap and original is not None:
        torch.nn.functional.linear = original


def _reduce_partitioned(optimizer: Any, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    """ZeRO-3: hand ``grad`` (full shape) to DeepSpeed's reduce-scatter bucket for a partitioned ``param``.

    What DeepSpeed's gradient hook does after a loss backward, without gathering the parameter first (a loss
    backward finds it gathered; here it is partitioned, with ``data`` of shape (0,)). ``param.grad`` must have the
    parameter's shape when assigned, so ``data`` is swapped for a zero-stride full-shape view of one element (no
    memory, no communication) for the assignment only. DeepSpeed copies the gradient into its bucket, reduce-scatters
    it into each rank's partition and drops ``param.grad``, as for any gradient.
    """
    partition = param.data
    param.data = grad.new_empty(()).expand(grad.shape)
    try:
        param.grad = grad
    finally:
        param.data = partition
    optimizer.reduce_ready_partitions_and_remove_grads(param)
