"""``"dp_fsdp"``: DP-SGD with torch FSDP2 (``fully_shard``), on Lightning's ``ModelParallelStrategy``.

Each rank clips its own Poisson shard's examples; per physical batch, the parameters' clipped sums are
reduce-scattered along dim 0 into the rank's shards as soon as they are clipped, coalesced into buckets of up to 4M
elements (the collective FSDP uses, with the same bytes; FSDP's own per-backward reduction stays idle because the
per-example backward produces no parameter gradient), the rank adds the noise of the coordinates it owns, divides
by B and hands the sharded gradient to the optimizer.

Zeroth-order (``PrivacyConfig(method="zeroth_order")``): forward passes only. Each module's gathered parameters are
perturbed (the same public z on every rank) between FSDP2's gather and release; the P clipped sums are all-reduced
(noise drawn by rank 0 alone) and each rank updates its own shard in place, regenerating only its rows' slice of z.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
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
from lightning_dpzero.zeroth_order.step import ZOStep

__all__ = ["DPFSDPStrategy", "FSDP2Strategy", "shard_lightning_module"]


class DPFSDPStrategy(DPStrategyMixin, ModelParallelStrategy):
    """DP-SGD with FSDP2 parameter sharding over all ranks (pure data parallelism, no tensor parallelism).

    Args:
        privacy: the privacy settings; ``None`` uses ``PrivacyConfig.default()``.
        stream_clipped_sums: ``True`` (default): each physical batch's clipped sum of each parameter is
            reduce-scattered as soon as it is clipped and accumulated in this rank's shard, as FSDP2 does with
            gradient accumulation: no full-size gradient buffer on any rank (a bucket of at most 4M elements in
            flight), one coalesced reduce-scatter per bucket per physical batch. ``False``: summed over the
            physical batches in a full-size fp32 buffer first, then reduce-scattered once per logical step (less
            communication, 4 bytes per parameter more memory).
        cpu_offload: FSDP2's ``CPUOffloadPolicy`` for the groups sharded here (``True``: with pinned memory on a
            GPU, without on a CPU): the parameter and gradient shards live in host memory and the optimizer steps
            there; the noise is added to the rank's gradient shard on the host. A model sharded in its own
            ``configure_model`` chooses its policy itself.
        **kwargs: passed to Lightning's ``ModelParallelStrategy`` (``data_parallel_size`` defaults to all ranks,
            ``tensor_parallel_size`` to 1). A LightningModule without ``configure_model`` is sharded here: every
            module that owns trainable parameters, then the root.
    """

    strategy_name = "dp_fsdp"

    def __init__(
        self,
        privacy: PrivacyConfig | None = None,
        stream_clipped_sums: bool = True,
        cpu_offload: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)
        self._init_dp(privacy)
        self.cpu_offload = cpu_offload
        self.stream_clipped_sums = stream_clipped_sums
        self._shard_sums: dict[str, Tensor] = {}  # this rank's rows of the step's clipped sums
        self._bucket = _ReduceScatterBucket()

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.world_size
        super().setup_environment()
        self._share_seed_and_set_rank()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._check_trainer(trainer)
        module = self._connected_module()
        zeroth_order = isinstance(self.dp, ZOStep)
        if isinstance(self.dp, ZOStep):  # zeroth_order
            self.dp.select_before_sharding(module)  # pruning: SynFlow on the full weights
        else:
            self.dp.attach(module)  # before sharding: rules are looked up by the modules' own types
        if is_overridden("configure_model", module):
            ModelParallelStrategy.setup(self, trainer)
        else:
            _setup_and_shard(self, trainer, self._shard)
        if zeroth_order:
            # After sharding: the direction coordinates of each rank's shard come from its DTensor placement, and
            # the perturbation pre-hooks run after FSDP2's gather (its own are prepended) and restore before its
            # release (ours are prepended to its post-forward hooks).
            self.dp.attach(module)
            self._check_selection_agrees()
        else:
            assert self.dp.engine is not None
            self.dp.engine.refresh_params(module)  # fully_shard replaced the parameters by sharded DTensors
            self.dp.engine.sink = self._reduce_clipped_sum if self.stream_clipped_sums else None
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_optimizers()

    def _shard(self, module: nn.Module) -> None:
        kwargs = _offload_policy(self.cpu_offload, self.root_device)
        plugin = self.precision_plugin
        if isinstance(plugin, DPPrecision) and plugin.mixed:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            # FSDP2 casts the gathered parameters (and the root's inputs) for compute: autocast is not needed. The
            # DP reduction is ours and stays fp32 (clipped sums, noise), whatever reduce_dtype says.
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=plugin.dtype, reduce_dtype=torch.float32)
            plugin.autocast = False
        shard_lightning_module(module, self.device_mesh["data_parallel"], owner=type(self).__name__, **kwargs)

    @override
    def _privatize(self, optimizer: Optimizer) -> None:
        from torch.distributed.tensor import DTensor

        if isinstance(self.dp, ZOStep):
            # Each rank updates its own shard in place. A group left gathered after its forward (FSDP2 keeps the
            # root's, or reshard_after_forward=False) would then be stale: release every gathered copy first.
            from torch.distributed.fsdp import FSDPModule

            for sub in self._connected_module().modules():
                if isinstance(sub, FSDPModule):
                    sub.reshard()
            self.dp.update(optimizer, all_reduce=self._all_reduce_on_device)  # P numbers summed over the ranks
            return

        named = self._named_optimizer_params(optimizer)
        summed = self.dp.begin_step([name for name, _ in named])
        if not self.stream_clipped_sums:  # the step's full-size sums, reduce-scattered now
            for name, _ in named:
                self._reduce_clipped_sum(name, summed.pop(name, None))
            self._flush_clipped_sums()
        shard_sums, self._shard_sums = self._shard_sums, {}
        for name, param in named:
            local = param.to_local() if isinstance(param, DTensor) else param.data
            grad = shard_sums.pop(name, None)
            if grad is None:
                grad = torch.zeros(local.shape, device=self.root_device)
            self.dp.add_noise_and_normalise(grad)  # this rank's rows: noise once per coordinate
            grad = grad.to(local.device, local.dtype)  # the host, under CPU offload
            if isinstance(param, DTensor):
                grad = DTensor.from_local(
                    grad, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
                )
            param.grad = grad
        self.dp.account_step()

    @property
    @override
    def _whole_parameters(self) -> bool:
        return False  # DTensor shards

    @override
    @contextlib.contextmanager
    def _physical_batch_context(self) -> Iterator[None]:
        yield
        if self.stream_clipped_sums and not isinstance(self.dp, ZOStep):
            self._flush_clipped_sums()  # this physical batch's last bucket

    def _reduce_clipped_sum(self, name: str, full: Tensor | None) -> None:
        """The engine's sink (streaming): one parameter's clipped sum of one physical batch (``None``: zeros), into
        the reduce-scatter bucket; reduced as soon as the bucket is full, and at the end of the physical batch."""
        from torch.distributed.tensor import DTensor

        assert self.dp.engine is not None
        param = self.dp.engine.params[name]
        local = param.to_local() if isinstance(param, DTensor) else param.data
        if self.world_size == 1:
            self._add_shard(name, torch.zeros(local.shape, device=self.root_device) if full is None else full)
        elif self._bucket.add(name, full, tuple(param.shape), local.shape[0]):
            self._flush_clipped_sums()

    def _flush_clipped_sums(self) -> None:
        for name, shard in self._bucket.reduce_scatter(self.world_size, self.root_device):
            self._add_shard(name, shard)

    def _add_shard(self, name: str, shard: Tensor) -> None:
        if name in self._shard_sums:
            self._shard_sums[name] += shard
        else:
            self._shard_sums[name] = shard

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="DP-SGD with FSDP2 (fully_shard)")


class FSDP2Strategy(ModelParallelStrategy):
    """The non-private counterpart of ``dp_fsdp``: Lightning's ``ModelParallelStrategy`` (FSDP2, pure data
    parallelism) sharding a LightningModule without ``configure_model`` the way ``DPFSDPStrategy`` does. For
    like-for-like comparisons (Hydra ``strategy=fsdp``, the benchmarks); not registered by name.

    Args:
        cpu_offload: FSDP2's ``CPUOffloadPolicy`` for the groups sharded here, as in ``DPFSDPStrategy``.
        **kwargs: passed to ``ModelParallelStrategy`` (``data_parallel_size`` defaults to all ranks,
            ``tensor_parallel_size`` to 1).
    """

    def __init__(self, cpu_offload: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)
        self.cpu_offload = cpu_offload

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.world_size
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if is_overridden("configure_model", self.lightning_module):
            return super().setup(trainer)
        mesh, kwargs = self.device_mesh["data_parallel"], _offload_policy(self.cpu_offload, self.root_device)
        _setup_and_shard(
            self, trainer, lambda module: shard_lightning_module(module, mesh, owner=type(self).__name__, **kwargs)
        )

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        pass  # a baseline, selected by class path


def _offload_policy(cpu_offload: bool, device: torch.device) -> dict[str, Any]:
    """``fully_shard``'s ``offload_policy`` keyword for ``cpu_offload`` (pinned host memory only next to a GPU)."""
    if not cpu_offload:
        return {}
    from torch.distributed.fsdp import CPUOffloadPolicy

    return {"offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda")}


def _setup_and_shard(strategy: ModelParallelStrategy, trainer: pl.Trainer, shard: Callable[[nn.Module], None]) -> None:
    """``ModelParallelStrategy.setup`` for a LightningModule without ``configure_model``: the same steps, with
    ``shard(lightning_module)`` where Lightning would expect the user's own sharding."""
    assert strategy.accelerator is not None
    assert strategy.model is not None and strategy.lightning_module is not None  # connected by the Trainer
    strategy.accelerator.setup(trainer)
    strategy.model = strategy.precision_plugin.convert_module(strategy.model)  # *-true: cast before sharding
    shard(strategy.lightning_module)
    strategy.model_to_device()
    strategy.barrier()
    if trainer.state.fn == TrainerFn.FITTING:
        strategy.setup_optimizers(trainer)
    strategy.setup_precision_plugin()
    if trainer.state.fn == TrainerFn.FITTING:
        _optimizers_to_device(strategy.optimizers, strategy.root_device)


def shard_lightning_module(module: nn.Module, mesh: Any, *, owner: str, **kwargs: Any) -> None:
    """``fully_shard`` a LightningModule that has no ``configure_model``, as its ``training_step`` will use it.

    Every module that owns parameters becomes an FSDP2 group, except modules sharing a parameter (a tied embedding
    and output head): FSDP2 refuses a parameter in two groups, so those are grouped at the LightningModule's child
    that contains them (Lightning calls ``training_step``, never the LightningModule's own forward, so the root
    group's hooks would never gather them). Then the root. A module sharded by an earlier ``fit`` is left as is.

    Raises:
        ValueError: the LightningModule owns parameters directly (they would never be gathered).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(module, FSDPModule):
        return
    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:
        raise ValueError(
            f"{owner}: the LightningModule holds parameters {own[:3]} directly; Lightning calls its training_step, "
            "not its forward, so FSDP2 would never gather them. Move them into a submodule, or shard the model "
            "yourself in configure_model."
        )
    holders: dict[int, list[nn.Module]] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), []).append(m)
    tied = {id(m) for ms in holders.values() if len(ms) > 1 for m in ms}
    owners = [m for m in module.modules() if m is not module and any(True for _ in m.parameters(recurse=False))]
    for m in owners:
        if id(m) not in tied:
            fully_shard(m, mesh=mesh, **kwargs)
    for child in module.children():
        if tied & {id(m) for m in child.modules()} and id(child) not in tied:
            fully_shard(child, mesh=mesh, **kwargs)  # the tied parameters' group
        elif id(child) in tied:
            raise ValueError(
                f"{owner}: the LightningModule's direct submodule {type(child).__name__} shares a parameter with "
                "another direct submodule; group them in one child module (e.g. self.net = GPT(...)) or shard the "
                "model yourself in configure_model."
            )
    fully_shard(module, mesh=mesh, **kwargs)


class _ReduceScatterBucket:
    """Full-shape clipped sums waiting for one coalesced reduce-scatter (FSDP2 reduces a whole parameter group per
    collective; one collective per parameter costs a latency each, which dominates on small layers).

    Each parameter is split along dim 0 as FSDP2 shards it (torch.chunk: ceil(rows / W) rows per rank, the last
    ranks' chunks padded); rank r's chunks of all the bucket's parameters are laid out side by side in row r of a
    [W, total] buffer, so that the reduce-scatter hands every rank exactly its rows of every parameter, summed.
    """

    capacity = 1 << 22  # elements (16 MB of fp32) per collective, at most: bounds the transient buffer

    def __init__(self) -> None:
        self.entries: list[tuple[str, Tensor | None, tuple[int, ...], int]] = []
        self.elements = 0

    def add(self, name: str, full: Tensor | None, shape: tuple[int, ...], local_rows: int) -> bool:
        """Queue ``full`` (a parameter of ``shape`` whose shard here has ``local_rows`` rows); True once full."""
        self.entries.append((name, full, shape, local_rows))
        self.elements += math.prod(shape)
        return self.elements >= self.capacity

    def reduce_scatter(self, world_size: int, device: torch.device) -> list[tuple[str, Tensor]]:
        """Sum the queued tensors over the ranks; this rank's shard of each, fp32, in the order queued."""
        entries, self.entries, self.elements = self.entries, [], 0
        if not entries:
            return []
        layout = []  # (offset in a rank's row, rows per rank, elements per row)
        offset = 0
        for _, _, shape, _ in entries:
            per, width = -(-shape[0] // world_size), math.prod(shape[1:])
            layout.append((offset, per, width))
            offset += per * width
        send = torch.zeros(world_size, offset, device=device)
        for (_, full, shape, _), (start, per, width) in zip(entries, layout):
            if full is None:
                continue  # zeros already
            rows = full.reshape(shape[0], width)
            for rank in range(world_size):
                chunk = rows[rank * per : (rank + 1) * per]
                send[rank, start : start + chunk.shape[0] * width] = chunk.reshape(-1)
        out = torch.empty(offset, device=device)
        _reduce_scatter(out, send.view(-1), op=dist.ReduceOp.SUM)
        return [
            (name, out[start : start + per * width].view(per, width)[:local_rows].reshape(local_rows, *shape[1:]))
            for (name, _, shape, local_rows), (start, per, width) in zip(entries, layout)
        ]


def _reduce_scatter(output: Tensor, input: Tensor, op: Any) -> None:
    """torch 2.13 renamed reduce_scatter_tensor (now a deprecated alias) to reduce_scatter_single; older releases
    have only the former."""
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(output, input, op=op)
