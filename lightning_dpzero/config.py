"""``PrivacyConfig``: the one validated object that holds every privacy setting, and its enums.

An invalid ``PrivacyConfig`` cannot be built, so nothing downstream re-checks it. It is frozen: the
accountant assumes that σ, q and C do not change under it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

__all__ = ["Accountant", "ClippingFunction", "ClippingStyle", "NonFinitePolicy", "NormMode", "PrivacyConfig"]

# Test-only switch: sigma = 0 (no noise) is how the correctness oracles compare gradients exactly. It is read from
# the environment so that it reaches spawned ranks; it is never set by the library and is not part of the API.
_ZERO_NOISE_ENV = "_LIGHTNING_DPZERO_TESTING_ALLOW_ZERO_NOISE"


class _StrEnum(str, Enum):
    """An enum whose values are the strings users write in YAML and on the command line."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def choices(cls) -> list[str]:
        return [member.value for member in cls]


class ClippingStyle(_StrEnum):
    """How the clip norm C is split into per-group thresholds C_k with sum_k C_k^2 = C^2."""

    ALL_LAYER = "all-layer"  # one group: the whole per-example gradient is clipped to C
    LAYER_WISE = "layer-wise"  # one group per module (weight and bias together)
    PARAM_WISE = "param-wise"  # one group per parameter tensor
    GROUP_WISE = "group-wise"  # groups given by `clipping_groups` (a count or name patterns)


class ClippingFunction(_StrEnum):
    """Per-example scale factor from a per-example (per-group) gradient norm n."""

    ABADI = "abadi"  # min(1, C / n)
    AUTOMATIC = "automatic"  # C / (n + gamma)  (Bu et al. 2206.07136, "AUTO-S")


class Accountant(_StrEnum):
    """dp-accounting accountant used for epsilon and for calibrating sigma."""

    PLD = "pld"  # privacy loss distributions: tight
    RDP = "rdp"  # Renyi DP: a slightly loose upper bound, faster


class NormMode(_StrEnum):
    """How per-example gradient norms are computed for layers with a sequence (or spatial) dimension T."""

    AUTO = "auto"  # per layer and input shape, the cheaper of the two
    GHOST = "ghost"  # Gram matrices of activations and output gradients: ~T^2 (p + d) per example
    INSTANTIATE = "instantiate"  # per-example gradient: ~T p d per example, reused for the clipped sum


class NonFinitePolicy(_StrEnum):
    """What happens to an example whose gradient (in a clipping group) has a non-finite norm (inf or NaN).

    Both keep the guarantee: each example still contributes at most C. There is deliberately no "skip the step"
    policy: whether a step is skipped would depend on one example, beyond what the noise covers.
    """

    ZERO = "zero"  # its clipped contribution (to that group) is exactly 0; training continues
    RAISE = "raise"  # stop with FloatingPointError (debugging; the crash itself reveals that one example overflowed)


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Every setting of DP-SGD, validated when built.

    Args:
        target_epsilon: the epsilon to reach after the planned number of logical steps; sigma is calibrated
            from it. Exactly one of ``target_epsilon`` and ``noise_multiplier``.
        noise_multiplier: sigma: the Gaussian noise std in units of ``clip_norm``.
        delta: the delta of the (epsilon, delta) guarantee. ``None`` means 1 / N^1.1 for N training examples.
        clip_norm: C, the L2 bound on one example's (clipped) gradient.
        clipping_style: how C splits into per-group thresholds.
        clipping_function: how a per-example norm becomes a scale factor: ``abadi``, ``automatic``, or a name
            registered with ``lightning_dpzero.clipping.register_clipping_function``.
        stability_constant: gamma of automatic clipping, in the units of the gradient norm.
        clipping_groups: for ``group-wise``: a number M of contiguous groups of modules (in registration order),
            or a tuple of parameter-name prefixes, one per group (a parameter joins the first group whose prefix
            it starts with; parameters matching none form a last group).
        group_clip_norms: per-group thresholds C_k, whose squares must sum to C^2. ``None``: C / sqrt(K) each.
        expected_batch_size: B = qN, the expected logical batch size. At most one of ``expected_batch_size``
            and ``sample_rate``; with neither, B is the training DataLoader's ``batch_size``.
        sample_rate: q, the probability that each example is in a logical batch.
        physical_batch_size: p, examples per forward/backward on one rank (memory only; it does not change
            epsilon). ``None``: the training DataLoader's ``batch_size``.
        accountant: ``rdp`` (default: fast, a slightly loose upper bound) or ``pld`` (tight; calibration takes
            seconds to tens of seconds, and per-step epsilon costs ~0.2-0.8 s).
        norm_mode: per-example norm computation for layers with a sequence dimension (``auto`` picks the cheaper).
        functorch_fallback: trainable modules without a clipping rule get per-example gradients from
            ``torch.func`` (slower, instantiates them) instead of being refused. BatchNorm is refused regardless.
        non_finite: per-example gradients whose norm is inf or NaN (fp16 overflow, log(0), ...): ``zero`` (the
            default) drops that example's contribution to the clipping group and counts it; ``raise`` stops.
        seed: seeds Poisson sampling and noise. ``None`` (the default) draws it from the OS entropy pool: sampling
            and noise must be unpredictable to an adversary; fix it only for reproducible research runs.

    Privacy:
        The guarantee is example-level (add/remove one example) (epsilon, delta)-DP for the Poisson-sampled
        Gaussian mechanism with rate q and noise multiplier sigma, composed over the logical steps taken.

    Example::

        PrivacyConfig(target_epsilon=3.0, clip_norm=1.0, expected_batch_size=256, physical_batch_size=32)
    """

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    clip_norm: float = 1.0
    clipping_style: ClippingStyle = ClippingStyle.ALL_LAYER
    clipping_function: ClippingFunction | str = ClippingFunction.AUTOMATIC
    stability_constant: float = 0.01
    clipping_groups: int | tuple[str, ...] | None = None
    group_clip_norms: tuple[float, ...] | None = None
    expected_batch_size: int | None = None
    sample_rate: float | None = None
    physical_batch_size: int | None = None
    accountant: Accountant = Accountant.RDP
    norm_mode: NormMode = NormMode.AUTO
    functorch_fallback: bool = False
    non_finite: NonFinitePolicy = NonFinitePolicy.ZERO
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_registered_function(self.clipping_function):
            _coerce_enum(self, "clipping_function", ClippingFunction)
        for name, enum in (
            ("clipping_style", ClippingStyle),
            ("accountant", Accountant),
            ("norm_mode", NormMode),
            ("non_finite", NonFinitePolicy),
        ):
            _coerce_enum(self, name, enum)
        for name in ("clipping_groups", "group_clip_norms"):
            value = getattr(self, name)
            if isinstance(value, list):  # Hydra and the CLI pass lists
                object.__setattr__(self, name, tuple(value))

        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "PrivacyConfig: set exactly one of `target_epsilon` (sigma is then calibrated) and "
                f"`noise_multiplier`; got target_epsilon={self.target_epsilon!r}, "
                f"noise_multiplier={self.noise_multiplier!r}."
            )
        if self.target_epsilon is not None:
            _require_positive_finite(self, "target_epsilon")
        if self.noise_multiplier is not None:
            allow_zero = os.environ.get(_ZERO_NOISE_ENV) == "1"
            if (
                not math.isfinite(self.noise_multiplier)
                or self.noise_multiplier < 0
                or (self.noise_multiplier == 0 and not allow_zero)
            ):
                raise ValueError(
                    f"PrivacyConfig: `noise_multiplier` must be a positive number, got {self.noise_multiplier!r}. "
                    "Without noise there is no privacy guarantee."
                )
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise ValueError(f"PrivacyConfig: `delta` must be in (0, 1), got {self.delta!r}.")
        _require_positive_finite(self, "clip_norm")
        _require_positive_finite(self, "stability_constant")
        if self.expected_batch_size is not None and self.sample_rate is not None:
            raise ValueError(
                "PrivacyConfig: set at most one of `expected_batch_size` (B = qN) and `sample_rate` (q); "
                f"got expected_batch_size={self.expected_batch_size!r}, sample_rate={self.sample_rate!r}."
            )
        for name in ("expected_batch_size", "physical_batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"PrivacyConfig: `{name}` must be a positive integer, got {value!r}.")
        if self.sample_rate is not None and not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"PrivacyConfig: `sample_rate` must be in (0, 1], got {self.sample_rate!r}.")
        self._check_groups()

    def _check_groups(self) -> None:
        groups = self.clipping_groups
        if self.clipping_style is ClippingStyle.GROUP_WISE:
            if groups is None:
                raise ValueError(
                    "PrivacyConfig: clipping_style='group-wise' needs `clipping_groups`: a number of groups, "
                    "or a list of parameter-name prefixes, one per group."
                )
            if isinstance(groups, int) and (isinstance(groups, bool) or groups < 1):
                raise ValueError(f"PrivacyConfig: `clipping_groups` must be >= 1, got {groups!r}.")
            if isinstance(groups, tuple) and (not groups or not all(isinstance(g, str) and g for g in groups)):
                raise ValueError(f"PrivacyConfig: `clipping_groups` must be non-empty name prefixes, got {groups!r}.")
        elif groups is not None:
            raise ValueError(
                f"PrivacyConfig: `clipping_groups` is only used with clipping_style='group-wise', "
                f"not {self.clipping_style.value!r}."
            )
        norms = self.group_clip_norms
        if norms is not None:
            if self.clipping_style is ClippingStyle.ALL_LAYER:
                raise ValueError("PrivacyConfig: `group_clip_norms` needs a clipping style with several groups.")
            if any(not math.isfinite(c) or c <= 0 for c in norms):
                raise ValueError(f"PrivacyConfig: `group_clip_norms` must be positive, got {norms!r}.")
            total = math.sqrt(sum(c * c for c in norms))
            if not math.isclose(total, self.clip_norm, rel_tol=1e-6):
                raise ValueError(
                    f"PrivacyConfig: the group thresholds must satisfy sum_k C_k^2 = C^2 so that each example's "
                    f"gradient stays within clip_norm={self.clip_norm}; sqrt(sum C_k^2) = {total:.6g}."
                )

    @classmethod
    def default(cls) -> PrivacyConfig:
        """Safe defaults: sigma calibrated for epsilon = 8, delta = 1/N^1.1, all-layer automatic clipping."""
        return cls(target_epsilon=8.0)

    def replace(self, **changes: Any) -> PrivacyConfig:
        """A copy with ``changes`` applied, validated again."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            raise TypeError(f"PrivacyConfig has no field(s) {sorted(unknown)}; fields: {sorted(values)}.")
        values.update(changes)
        return PrivacyConfig(**values)


def _is_registered_function(value: object) -> bool:
    if isinstance(value, ClippingFunction) or not isinstance(value, str):
        return False
    from lightning_dpzero.clipping.functions import registered_clipping_functions

    return value.lower() in registered_clipping_functions() and value.lower() not in ClippingFunction.choices()


def _coerce_enum(config: PrivacyConfig, name: str, enum: type[_StrEnum]) -> None:
    value = getattr(config, name)
    if isinstance(value, enum):
        return
    try:
        object.__setattr__(config, name, enum(str(value).lower()))
    except ValueError:
        raise ValueError(f"PrivacyConfig: `{name}`={value!r} is not one of {enum.choices()}.") from None


def _require_positive_finite(config: PrivacyConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"PrivacyConfig: `{name}` must be a positive finite number, got {value!r}.")
