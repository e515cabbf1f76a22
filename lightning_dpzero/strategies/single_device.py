"""``"dp"``: DP-SGD on one device (CPU or one GPU)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from typing_extensions import override

from lightning_dpzero._internals import lightning as lightning_internals
from lightning_dpzero._internals.lightning import StrategyRegistry
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.strategies._mixin import DPStrategyMixin

__all__ = ["DPStrategy"]


class DPStrategy(DPStrategyMixin, SingleDeviceStrategy):
    """DP-SGD on a single device: Poisson logical batches, per-example clipping, noise once per logical step.

    Args:
        privacy: the privacy settings; ``None`` uses ``PrivacyConfig.default()``.
        device: the device to train on; ``None`` picks the Trainer's accelerator's first device.
        **kwargs: passed to Lightning's ``SingleDeviceStrategy`` unchanged.

    Example::

        trainer = L.Trainer(strategy=DPStrategy(PrivacyConfig(target_epsilon=3.0)), max_steps=1000)
    """

    strategy_name = "dp"

    def __init__(self, privacy: PrivacyConfig | None = None, device: Any = None, **kwargs: Any) -> None:
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        self._device_given = device is not None
        self._init_dp(privacy)

    @override
    def setup(self, trainer: Any) -> None:
        # Lightning's connector silently gives a single-device strategy one of the devices the user asked for.
        requested = lightning_internals.requested_devices(trainer)
        if _device_count(requested) > 1:
            raise ValueError(
                f"DPStrategy runs on one device, but the Trainer asks for devices={requested!r}; it would train on one "
                "and ignore the others. Use strategy='dp_ddp' (data parallel), 'dp_zero1/2/3' (DeepSpeed ZeRO) or "
                "'dp_fsdp' (FSDP2) for several devices, or Trainer(devices=1)."
            )
        super().setup(trainer)

    @override
    def setup_environment(self) -> None:
        if not self._device_given and self.accelerator is not None:
            kind = type(self.accelerator).__name__
            if kind == "CUDAAccelerator":
                self._root_device = torch.device("cuda", torch.cuda.current_device())
            elif kind == "MPSAccelerator":
                self._root_device = torch.device("mps")
        super().setup_environment()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="DP-SGD on one device (Poisson sampling, clipping, noise)"
        )


def _device_count(flag: Any) -> int:
    """How many devices a Trainer ``devices=`` value asks for (``"auto"``: 1, as far as this strategy cares)."""
    if isinstance(flag, int):
        return flag
    if isinstance(flag, (list, tuple)):
        return len(flag)
    if isinstance(flag, str):
        text = flag.strip()
        if text.isdigit():
            return int(text)
        if "," in text:
            return len([part for part in text.split(",") if part.strip()])
    return 1
