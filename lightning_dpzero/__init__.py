"""lightning_dpzero: differentially private training for PyTorch Lightning.

Importing the package registers the DP strategy names (``"dp"``) with Lightning's strategy registry.
"""

import warnings

from lightning.pytorch.strategies import StrategyRegistry

from lightning_dpzero.accounting import PrivacyAccountant, calibrate_noise_multiplier, epsilon_for
from lightning_dpzero.allocator import retain_freed_memory
from lightning_dpzero.callbacks import PrivacyBudget
from lightning_dpzero.clipping import ClippingRule, UnsupportedLayerError, register_rule
from lightning_dpzero.config import (
    Accountant,
    ClippingFunction,
    ClippingStyle,
    Method,
    NonFinitePolicy,
    NormMode,
    PrivacyConfig,
    PruneSelection,
    ZerothOrderConfig,
)
from lightning_dpzero.layers import DPMultiheadAttention, replace_multihead_attention
from lightning_dpzero.ledger import Binding, PrivacyLedger
from lightning_dpzero.method import PrivateMethod, Reducer
from lightning_dpzero.precision import DPPrecision
from lightning_dpzero.sampling.poisson import LogicalBatch, PoissonBatchSampler
from lightning_dpzero.selfcheck import PerExampleCheckError
from lightning_dpzero.step import DPStep, PrivacyBudgetExhausted
from lightning_dpzero.strategies import DPDDPStrategy, DPFSDPStrategy, DPStrategy, DPZeroStrategy, privacy_ledger
from lightning_dpzero.zeroth_order import ZOStep

__all__ = [
    "Accountant",
    "Binding",
    "ClippingFunction",
    "ClippingRule",
    "ClippingStyle",
    "DPDDPStrategy",
    "DPFSDPStrategy",
    "DPMultiheadAttention",
    "DPPrecision",
    "DPStep",
    "DPStrategy",
    "LogicalBatch",
    "Method",
    "NonFinitePolicy",
    "NormMode",
    "PerExampleCheckError",
    "PoissonBatchSampler",
    "PrivacyAccountant",
    "PrivacyBudget",
    "PrivacyBudgetExhausted",
    "PrivacyConfig",
    "PrivacyLedger",
    "PrivateMethod",
    "PruneSelection",
    "Reducer",
    "DPZeroStrategy",
    "UnsupportedLayerError",
    "ZOStep",
    "ZerothOrderConfig",
    "calibrate_noise_multiplier",
    "epsilon_for",
    "privacy_ledger",
    "register_rule",
    "replace_multihead_attention",
    "retain_freed_memory",
]

__version__ = "0.1.0"

# Lightning 2.6 builds torch's deprecated ``LeafSpec`` each time it moves a batch (FutureWarning from torch >= 2.10,
# raised at lightning/pytorch/utilities/_pytree.py): nothing a user can act on, so it is silenced at that source only.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
# DeepSpeed 0.19 and FSDP2 call torch.distributed's all_gather_into_tensor / reduce_scatter_tensor, deprecated aliases
# since torch 2.13, once per bucket: dozens of identical FutureWarnings per step under dp_zero3 that a user cannot act
# on (our own code calls the new names). Silenced for those two names only.
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    category=FutureWarning,
)

if "dp" not in StrategyRegistry:
    for _strategy in (DPStrategy, DPDDPStrategy, DPZeroStrategy, DPFSDPStrategy):
        _strategy.register_strategies(StrategyRegistry)
