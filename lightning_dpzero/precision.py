"""``DPPrecision``: mixed and half precision for DP training, without loss scaling.

Per-example clipping already puts every example's gradient on the scale of C, so the loss scaling of fp16 training
is not needed (2311.11822 §3.4), and it would be harmful: with Abadi clipping a scaled gradient is clipped as if it
were larger, and a dynamic scaler skips steps depending on whether some example overflowed, which the accountant
does not cover. ``DPPrecision`` therefore never scales the loss (static scale 1, no ``GradScaler``).

Whatever the compute dtype, the clipping engine computes per-example norms and clip factors and accumulates the
clipped sums in fp32, and the noise is drawn in fp32 (``PrivacyLedger``); the engines' own mechanisms do the rest:

=============  ==========================================================================================
strategy       what ``DPPrecision(p)`` becomes
=============  ==========================================================================================
``dp``,        this plugin: ``torch.autocast`` for ``*-mixed`` (the parameters stay fp32), the module and
``dp_ddp``     floating inputs cast for ``*-true``
``dp_zero*``   DeepSpeed's ``bf16`` / ``fp16`` config sections (fp16 with a static ``loss_scale`` of 1; fp32
               master weights and gradient partitions, where the noise is added)
``dp_fsdp``    FSDP2's ``MixedPrecisionPolicy(param_dtype=p, reduce_dtype=fp32)`` on the modules the strategy
               shards (with your own ``configure_model``: autocast, your policy is left alone)
=============  ==========================================================================================

Per-example gradients that are not finite (an fp16 overflow) follow ``PrivacyConfig.non_finite``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import Precision
from lightning_utilities import apply_to_collection
from torch import Tensor, nn
from typing_extensions import override

from lightning_dpzero._internals.lightning import DtypeContext, convert_fp_tensor

__all__ = ["DPPrecision"]

_DPPrecisionInput = Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]
_DTYPES = {
    "32-true": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
}


class DPPrecision(Precision):
    """Precision plugin for DP strategies: autocast or half precision, never a loss scaler.

    Args:
        precision: Lightning's spelling: ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ``"bf16-true"`` or
            ``"16-true"``.
        device: the autocast device type (``"cpu"`` or ``"cuda"``); ``None``: set by the strategy from its root
            device.

    Example::

        trainer = L.Trainer(strategy="dp_zero3", plugins=[DPPrecision("bf16-mixed")])

    A DP strategy given Lightning's ``precision=...`` argument instead uses ``DPPrecision`` of the same value.
    """

    precision: _DPPrecisionInput  # narrower than Precision's: the values DeepSpeedPrecision also accepts

    def __init__(self, precision: _DPPrecisionInput = "32-true", device: str | None = None) -> None:
        if precision not in _DTYPES:
            raise ValueError(f"DPPrecision: precision={precision!r} is not supported; use one of {list(_DTYPES)}.")
        self.precision = precision
        self.device = device
        self.dtype = _DTYPES[precision]
        self.autocast = precision.endswith("-mixed")  # dp_fsdp turns it off when FSDP2's policy casts instead
        self.scaler = None  # the strategies check that no scaler is present

    @property
    def mixed(self) -> bool:
        return self.precision.endswith("-mixed")

    @property
    def half(self) -> bool:
        return self.precision in ("bf16-true", "16-true")

    # ------------------------------------------------------------------------------------------- module
    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.to(dtype=self.dtype) if self.half else module

    @override
    def tensor_init_context(self) -> AbstractContextManager:
        return DtypeContext(self.dtype) if self.half else contextlib.nullcontext()

    @override
    def module_init_context(self) -> AbstractContextManager:
        return self.tensor_init_context()

    @override
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        if self.autocast:
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            with torch.autocast(device, dtype=self.dtype, cache_enabled=False):
                yield
        elif self.half:
            with DtypeContext(self.dtype):
                yield
        else:
            yield

    @override
    def convert_input(self, data: Any) -> Any:
        if not self.half:
            return data
        return apply_to_collection(data, function=convert_fp_tensor, dtype=Tensor, dst_type=self.dtype)

    @override
    def convert_output(self, data: Any) -> Any:
        if not self.half:
            return data
        return apply_to_collection(data, function=convert_fp_tensor, dtype=Tensor, dst_type=torch.get_default_dtype())

    # --------------------------------------------------------------------------------------- no scaling
    @override
    def state_dict(self) -> dict[str, Any]:
        return {}  # no scaler state: the loss scale is 1, always

    def __repr__(self) -> str:
        return f"DPPrecision({self.precision!r})"


def dp_precision_for(plugin: Precision, owner: str) -> DPPrecision:
    """The ``DPPrecision`` a DP strategy uses in place of ``plugin`` (built by Lightning from ``precision=``).

    Raises:
        ValueError: ``plugin`` scales the loss (a ``GradScaler``) or its precision has no DP counterpart.
    """
    if isinstance(plugin, DPPrecision):
        return plugin
    precision = getattr(plugin, "precision", "32-true")
    if precision not in _DTYPES:
        raise ValueError(
            f"{owner}: precision={precision!r} is not supported under DP; use DPPrecision with one of {list(_DTYPES)}."
        )
    return DPPrecision(precision)  # type: ignore[arg-type]


def refuse_loss_scaler(plugin: Precision | None, owner: str) -> None:
    """Refuse a precision plugin that the user built with a loss scaler."""
    scaler = getattr(plugin, "scaler", None)
    if scaler is not None:
        raise ValueError(
            f"{owner}: the precision plugin {type(plugin).__name__} scales the loss with {type(scaler).__name__}; "
            "per-example clipping already scales each gradient to at most C, and a loss scaler would clip scaled "
            "gradients and skip steps depending on the data. Use plugins=[lightning_dpzero.DPPrecision('16-mixed')] "
            "(no loss scaling) or precision='bf16-mixed'."
        )
