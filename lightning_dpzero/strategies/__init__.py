"""DP strategies: thin subclasses of Lightning's own, sharing one ``DPStep``."""

from lightning_dpzero.strategies.ddp import DPDDPStrategy
from lightning_dpzero.strategies.deepspeed import DPZeroStrategy
from lightning_dpzero.strategies.fsdp import DPFSDPStrategy
from lightning_dpzero.strategies.query import dp_step, is_private
from lightning_dpzero.strategies.single_device import DPStrategy

__all__ = ["DPDDPStrategy", "DPFSDPStrategy", "DPStrategy", "DPZeroStrategy", "dp_step", "is_private"]
