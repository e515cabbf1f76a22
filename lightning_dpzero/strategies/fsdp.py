"""``"dp_fsdp"``: DP-SGD with torch FSDP2 (``fully_shard``), on Lightning's ``ModelParallelStrategy``.

Each rank clips its own Poisson shard's examples; per parameter, the clipped sums are reduce-scattered along
dim 0 into the rank's shard (the collective FSDP uses, with the same bytes; FSDP's own per-backward reduction
stays idle because the per-example backward produces no parameter gradient), the rank adds the noise of the
coordinates it owns, divides by B and hands the sharded gradient to the optimizer.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.precision import DPPrecision
from lightning_dpzero.strategies._mixin import DPStrategyMixin

__all__ = ["DPFSDPStrategy"]


class DPFSDPStrategy(DPStrategyMixin, ModelParallelStrategy):
    """DP-SGD with FSDP2 parameter sharding over all ranks (pure data parallelism, no tensor parallelism).

    Args:
        privacy: the privacy settings; ``None`` uses ``PrivacyConfig.default()``.
        **kwargs: passed to Lightning's ``ModelParallelStrategy`` (``data_parallel_size`` defaults to all ranks,
            ``tensor_parallel_size`` to 1). A LightningModule without ``configure_model`` is sharded here: every
            module that owns trainable parameters, then the root.
    """

    strategy_name = "dp_fsdp"

    def __init__(self, privacy: PrivacyConfig | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)
        self._init_dp(privacy)

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.world_size
        super().setup_environment()
        self._share_seed_and_set_rank()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._check_trainer(trainer)
        module = self.lightning_module
        self.dp.attach(module)  # before sharding: rules are looked up by the modules' own types
        if is_overridden("configure_model", module):
            ModelParallelStrategy.setup(self, trainer)
        else:  # ModelParallelStrategy.setup, with the sharding it otherwise asks the user to write
            assert self.accelerator is not None
            self.accelerator.setup(trainer)
            self.model = self.precision_plugin.convert_module(self.model)  # *-true: cast before sharding
            self._shard(module)
            self.model_to_device()
            self.barrier()
            if trainer.state.fn == TrainerFn.FITTING:
                self.setup_optimizers(trainer)
            self.setup_precision_plugin()
            if trainer.state.fn == TrainerFn.FITTING:
                _optimizers_to_device(self.optimizers, self.root_device)
        assert self.dp.engine is not None
        self.dp.engine.refresh_params(module)  # fully_shard replaced the parameters by sharded DTensors
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_optimizers()

    def _shard(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        own = [name for name, _ in module.named_parameters(recurse=False)]
        if own:
            raise ValueError(
                f"DPFSDPStrategy: the LightningModule holds parameters {own[:3]} directly; Lightning calls its "
                "training_step, not its forward, so FSDP2 would never gather them. Move them into a submodule, or "
                "shard the model yourself in configure_model."
            )
        mesh = self.device_mesh["data_parallel"]
        kwargs: dict[str, Any] = {}
        plugin = self.precision_plugin
        if isinstance(plugin, DPPrecision) and plugin.mixed:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            # FSDP2 casts the gathered parameters (and the root's inputs) for compute: autocast is not needed. The
            # DP reduction is ours and stays fp32 (clipped sums, noise), whatever reduce_dtype says.
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=plugin.dtype, reduce_dtype=torch.float32)
            plugin.autocast = False
        owners = [m for m in module.modules() if m is not module and any(True for _ in m.parameters(recurse=False))]
        for m in owners:
            fully_shard(m, mesh=mesh, **kwargs)
        fully_shard(module, mesh=mesh, **kwargs)

    @override
    def _privatize(self, optimizer: Optimizer) -> None:
        from torch.distributed.tensor import DTensor

        named = self._named_optimizer_params(optimizer)
        summed = self.dp.begin_step([name for name, _ in named])
        world = self.world_size
        for name, param in named:
            full = summed.get(name)
            if full is None:
                full = torch.zeros(param.shape, device=self.root_device)
            local = param.to_local() if isinstance(param, DTensor) else param.data
            grad = _reduce_scatter_dim0(full, world, local.shape[0]) if world > 1 else full
            self.dp.add_noise_and_normalise(grad)  # this rank's rows: noise once per coordinate
            grad = grad.to(local.dtype)
            if isinstance(param, DTensor):
                grad = DTensor.from_local(
                    grad, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
                )
            param.grad = grad
        self.dp.account_step()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="DP-SGD with FSDP2 (fully_shard)")


def _reduce_scatter_dim0(full: Tensor, world_size: int, local_rows: int) -> Tensor:
    """Sum ``full`` over the ranks and keep this rank's dim-0 chunk (torch.chunk layout, as FSDP2 shards)."""
    rows = full.shape[0]
    per = -(-rows // world_size)  # ceil
    padded = torch.zeros((per * world_size, *full.shape[1:]), device=full.device, dtype=full.dtype)
    padded[:rows] = full
    out = torch.empty((per, *full.shape[1:]), device=full.device, dtype=full.dtype)
    dist.reduce_scatter_tensor(out, padded, op=dist.ReduceOp.SUM)
    return out[:local_rows].contiguous()
