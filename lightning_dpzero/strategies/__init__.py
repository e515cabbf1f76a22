"""DP strategies: thin subclasses of Lightning's own, each driving one ``PrivateMethod`` through its ``Reducer``."""

from lightning_dpzero.strategies.ddp import DPDDPStrategy
from lightning_dpzero.strategies.deepspeed import DPZeroStrategy
from lightning_dpzero.strategies.fsdp import DPFSDPStrategy
from lightning_dpzero.strategies.query import dp_step, is_private, privacy_ledger
from lightning_dpzero.strategies.single_device import DPStrategy

__all__ = ["DPDDPStrategy", "DPFSDPStrategy", "DPStrategy", "DPZeroStrategy", "dp_step", "is_private", "privacy_ledger"]
