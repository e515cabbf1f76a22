"""``"dp_ddp"``: DP-SGD on data-parallel replicas (torch DDP through Lightning's ``DDPStrategy``)."""

from __future__ import annotations

import contextlib
from typing import Any

from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.strategies._mixin import DPStrategyMixin
from lightning_dpzero.zeroth_order.step import ZOStep

__all__ = ["DPDDPStrategy"]


class DPDDPStrategy(DPStrategyMixin, DDPStrategy):
    """DP-SGD on W data-parallel ranks.

    Each rank Poisson-samples its own disjoint shard of the dataset with the same rate q (together: one Poisson
    sample of the whole dataset), clips its examples, and the clipped sums are summed over the ranks in one
    all-reduce per logical step. DDP's own per-backward reduction stays idle (``no_sync``): the clipped sum is
    not in the parameters' autograd gradients, and one flat all-reduce moves the same bytes. Each rank adds the
    noise of its 1/W share of the coordinates before the sum, so noise is drawn once per coordinate.

    Zeroth-order (``PrivacyConfig(method="zeroth_order")``): no DDP wrapper (no gradient buckets); every rank
    perturbs its full replica with the same public z, the P clipped per-example difference sums are all-reduced,
    rank 0 alone adds the noise before that sum, and every rank applies the same in-place update.

    Args:
        privacy: the privacy settings; ``None`` uses ``PrivacyConfig.default()``.
        **kwargs: passed to Lightning's ``DDPStrategy`` unchanged (``process_group_backend``, ``start_method``...).
    """

    strategy_name = "dp_ddp"

    def __init__(self, privacy: PrivacyConfig | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_dp(privacy)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._share_seed_and_set_rank()

    @override
    def _physical_batch_context(self) -> contextlib.AbstractContextManager[Any]:
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    @override
    def configure_ddp(self) -> None:
        if isinstance(self.dp, ZOStep):
            # Zeroth-order: no gradients to reduce, so no DDP wrapper (its reducer would allocate gradient buckets of
            # the model's size); every rank starts from rank 0's weights and applies the same update after.
            assert self.model is not None  # set by the Trainer before configure_ddp, as DDPStrategy asserts too
            _sync_module_states(self.model)
            return
        super().configure_ddp()

    @override
    def _privatize(self, optimizer: Optimizer) -> None:
        # first-order: the clipped sums in one flat buffer; zeroth-order: P numbers, not the gradients
        self.dp.finish_step(
            optimizer, lambda: self._named_optimizer_params(optimizer), all_reduce=self._all_reduce_on_device
        )

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="DP-SGD with data-parallel replicas (Poisson shards, one all-reduce)"
        )
