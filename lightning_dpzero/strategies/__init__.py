"""DP strategies: thin subclasses of Lightning's own, sharing one ``DPStep``."""

from lightning_dpzero.strategies.single_device import DPStrategy

__all__ = ["DPStrategy"]
