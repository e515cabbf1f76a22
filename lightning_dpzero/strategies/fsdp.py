"""``"dp_fsdp"``: DP-SGD with torch FSDP2 (``fully_shard``), on Lightning's ``ModelParallelStrategy``.

Each rank clips its own Poisson shard's examples; per physical batch, the parameters' clipped sums are
reduce-scattered along dim 0 into the rank's shards as soon as they are clipped, coalesced into buckets of up to 4M
elements (the collective FSDP uses, with the same bytes; FSDP's own per-backward reduction stays idle because the
per-example backward produces no parameter gradient), the rank adds the noise of the coordinates it owns, divides
by B and hands the sharded gradient to the optimizer.

Zeroth-order (``PrivacyConfig(method="zeroth_order")``): forward passes only. Each module's gathered parameters are
perturbed (the same public z on every rank) between FSDP2's gather and release; the P clipped sums are all-reduced
(released by rank 0 alone) and each rank updates its own shard in place, regenerating only its rows' slice of z.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dpzero._internals import lightning as lightning_internals
from lightning_dpzero._internals import torch as torch_internals
from lightning_dpzero._internals.lightning import StrategyRegistry, optimizers_to_device
from lightning_dpzero.clipping.engine import takes_fallback
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.ledger import PrivacyLedger
from lightning_dpzero.method import Reducer
from lightning_dpzero.precision import DPPrecision
from lightning_dpzero.strategies._mixin import DPStrategyMixin
from lightning_dpzero.strategies.reducers import ReducerBase

__all__ = ["DPFSDPStrategy", "FSDP2Strategy", "ShardReducer", "shard_lightning_module"]


class ShardReducer(ReducerBase):
    """FSDP2's dim-0 shards: each rank owns its rows of every parameter. The clipped sums are reduce-scattered in
    coalesced buckets (``_ReduceScatterBucket``) into the rank's rows, which it releases and hands the optimizer as
    sharded gradients.

    Args:
        device: the rank's root device.
        owner: the strategy's class name, for messages.
        streams: each physical batch's sums as soon as they are clipped (else the step's, once).
        world_size: W.
    """

    def __init__(self, device: torch.device, owner: str, *, streams: bool, world_size: int) -> None:
        super().__init__(device, owner)
        self.streams, self.world_size = streams, world_size
        self._shards: dict[str, Tensor] = {}  # this rank's rows of the step's clipped sums
        self._bucket = _ReduceScatterBucket()

    def add(self, name: str, clipped_sum: Tensor | None) -> None:
        """One parameter's clipped sum (``None``: zeros) into the bucket, reduced as soon as the bucket is full."""
        param = self.params[name]
        local = _local(param)
        if self.world_size == 1:
            self._add_shard(name, torch.zeros(local.shape, device=self.device) if clipped_sum is None else clipped_sum)
        elif self._bucket.add(name, clipped_sum, tuple(param.shape), local.shape[0]):
            self.flush()

    def flush(self) -> None:
        for name, shard in self._bucket.reduce_scatter(self.world_size, self.device):
            self._add_shard(name, shard)

    def _add_shard(self, name: str, shard: Tensor) -> None:
        if name in self._shards:
            self._shards[name] += shard
        else:
            self._shards[name] = shard

    def release(self, ledger: PrivacyLedger, named: list[tuple[str, nn.Parameter]]) -> None:
        from torch.distributed.tensor import DTensor

        shards, self._shards = self._shards, {}
        owned = []
        for name, param in named:
            grad = shards.pop(name, None)
            owned.append(torch.zeros(_local(param).shape, device=self.device) if grad is None else grad)
        ledger.release(owned)  # this rank's rows: noise once per coordinate, / B, and the accounting event
        for (_, param), grad in zip(named, owned):
            local = _local(param)
            grad = grad.to(local.device, local.dtype)  # the host, under CPU offload
            if isinstance(param, DTensor):
                grad = DTensor.from_local(
                    grad, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
                )
            param.grad = grad


def _local(param: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param.data


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

    @override
    def _make_reducer(self) -> Reducer:
        return ShardReducer(
            self.root_device, type(self).__name__, streams=self.stream_clipped_sums, world_size=self.world_size
        )

    @override
    def setup_environment(self) -> None:
        lightning_internals.data_parallel_over_all_ranks(self)
        super().setup_environment()
        self._share_seed_and_set_rank()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._check_trainer(trainer)
        module = self._connected_module()
        # First-order: the engine hooks the model as written (rules by the modules' own types); zeroth-order: pruning
        # scores the full weights.
        self.dp.before_sharding(module)
        if is_overridden("configure_model", module):
            ModelParallelStrategy.setup(self, trainer)
        else:
            _setup_and_shard(self, trainer, self._shard)
        # After sharding: the engine re-reads the sharded DTensor parameters and streams into the reducer; zeroth-order
        # takes each rank's direction coordinates from its DTensor placement, and its perturbation pre-hooks run after
        # FSDP2's gather (its own are prepended) and restore before its release.
        self.dp.attach(module, self.reducer)
        self._check_selection_agrees()
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
        # A group left gathered after its forward (FSDP2 keeps the root's, or reshard_after_forward=False) is released
        # first: zeroth-order updates the shards in place, which would leave a gathered copy stale.
        from torch.distributed.fsdp import FSDPModule

        for sub in self._connected_module().modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()
        super()._privatize(optimizer)

    @property
    @override
    def _whole_parameters(self) -> bool:
        return False  # DTensor shards

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
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
        lightning_internals.data_parallel_over_all_ranks(self)
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
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
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
        optimizers_to_device(strategy.optimizers, strategy.root_device)


def shard_lightning_module(module: nn.Module, mesh: Any, *, owner: str, **kwargs: Any) -> None:
    """``fully_shard`` a LightningModule that has no ``configure_model``, as its ``training_step`` will use it.

    Every module that owns parameters becomes an FSDP2 group, children before their parents (a group holds the
    parameters no group below it holds), except:

    - modules sharing a parameter (a tied embedding and output head): FSDP2 refuses a parameter in two groups, so
      those are grouped at the LightningModule's child that contains them (Lightning calls ``training_step``, never
      the LightningModule's own forward, so the root group's hooks would never gather them);
    - the submodules of a module that takes the engine's torch.func fallback (``ViTEmbeddings``,
      ``nn.MultiheadAttention``): the fallback recomputes its forward per example under ``vmap``, where a nested
      group's hooks cannot run (and ``nn.MultiheadAttention`` reads ``out_proj``'s parameters without calling it, so
      a group of its own would never be gathered): the whole subtree is one group.

    Then the root. A module sharded by an earlier ``fit`` is left as is.

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
    inside_fallback = {
        id(sub)
        for m in module.modules()
        if m is not module and takes_fallback(m)
        for sub in m.modules()
        if sub is not m
    }
    owners = [
        m
        for m in module.modules()
        if m is not module and id(m) not in inside_fallback and any(True for _ in m.parameters(recurse=False))
    ]
    for m in reversed(owners):  # module.modules() lists a parent before its children
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
        torch_internals.reduce_scatter(out, send.view(-1))
        return [
            (name, out[start : start + per * width].view(per, width)[:local_rows].reshape(local_rows, *shape[1:]))
            for (name, _, shape, local_rows), (start, per, width) in zip(entries, layout)
        ]
