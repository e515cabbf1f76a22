"""``"dp_ddp"``: DP-SGD on data-parallel replicas (Lightning's ``DDPStrategy``, without torch's DDP wrapper)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from lightning_dpzero._internals import lightning as lightning_internals
from lightning_dpzero._internals.lightning import StrategyRegistry
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.method import Reducer
from lightning_dpzero.strategies._mixin import DPStrategyMixin
from lightning_dpzero.strategies.reducers import ReplicaReducer

__all__ = ["DPDDPStrategy"]


class DPDDPStrategy(DPStrategyMixin, DDPStrategy):
    """DP-SGD on W data-parallel ranks.

    Each rank Poisson-samples its own disjoint shard of the dataset with the same rate q (together: one Poisson
    sample of the whole dataset) and clips its examples; at the end of the logical step a reduce-scatter sums the
    clipped sums over the ranks and hands each rank 1/W of the coordinates, the rank adds their noise and divides
    by B, and an all-gather gives every replica the released gradient (``ReplicaReducer``: the bytes of one
    all-reduce, noise drawn once per coordinate). The model is not wrapped in torch's ``DistributedDataParallel``:
    its gradient buckets (4 bytes per parameter) and per-backward reduction would be idle, since the per-example
    backward produces no parameter gradient. The replicas start from rank 0's weights and apply the same update.

    Zeroth-order (``PrivacyConfig(method="zeroth_order")``): every rank perturbs its full replica with the same
    public z, the P clipped per-example difference sums are all-reduced, rank 0 alone adds the noise and shares the
    released numbers, and every rank applies the same in-place update.

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
    def _make_reducer(self) -> Reducer:
        return ReplicaReducer(self.root_device, type(self).__name__)

    @override
    def configure_ddp(self) -> None:
        # No DistributedDataParallel wrapper: the reduction is the reducer's. Every rank starts from rank 0's weights.
        assert self.model is not None  # set by the Trainer before configure_ddp, as DDPStrategy asserts too
        lightning_internals.sync_module_states(self.model)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="DP-SGD with data-parallel replicas (Poisson shards, one all-reduce)"
        )
