"""``PrivacyConfig``: the one validated object that holds every privacy setting, and its enums.

An invalid ``PrivacyConfig`` cannot be built, so nothing downstream re-checks it. It is frozen: the
accountant assumes that σ, q and C do not change under it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

__all__ = [
    "Accountant",
    "ClippingFunction",
    "ClippingStyle",
    "Method",
    "NonFinitePolicy",
    "NormMode",
    "PrivacyConfig",
    "PruneSelection",
    "ZerothOrderConfig",
]

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

    AUTO = "auto"  # per call: instantiated where the block fits in memory (docs/design.md), else the ghost norm
    GHOST = "ghost"  # Gram matrices of activations and output gradients: ~T^2 (p + d) per example
    INSTANTIATE = "instantiate"  # per-example gradient: ~T p d per example, reused for the clipped sum


class NonFinitePolicy(_StrEnum):
    """What happens to an example whose gradient (in a clipping group) has a non-finite norm (inf or NaN).

    Both keep the guarantee: each example still contributes at most C. There is deliberately no "skip the step"
    policy: whether a step is skipped would depend on one example, beyond what the noise covers.
    """

    ZERO = "zero"  # its clipped contribution (to that group) is exactly 0; training continues
    RAISE = "raise"  # stop with FloatingPointError (debugging; the crash itself reveals that one example overflowed)


class Method(_StrEnum):
    """How the per-example signal of a logical step is computed."""

    FIRST_ORDER = "first_order"  # DP-SGD: per-example gradients by backpropagation, clipped, noised
    ZEROTH_ORDER = "zeroth_order"  # DP-ZO / DPZero / DP-ZOSO: per-example finite differences along public directions


class PruneSelection(_StrEnum):
    """Which coordinates data-free pruning keeps trainable, by SynFlow score |theta * dR/dtheta|."""

    LOWEST = "lowest"  # the least salient (DP-ZOPO's choice: ZO noise hurts large weights most)
    HIGHEST = "highest"  # the most salient (SynFlow's own use: the weights that carry the synaptic flow)


_StageValue = float | tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class ZerothOrderConfig:
    """Settings of the zeroth-order DP step (``PrivacyConfig(method="zeroth_order", zeroth_order=...)``).

    Values marked "per stage" are a number (the same in every stage) or a list of ``num_stages`` numbers.
    ``num_stages=1`` is the constant schedule of DPZero; ``num_stages > 1`` the stagewise schedule of DP-ZOSO.

    Args:
        perturbation_scale: beta, per stage: parameters are evaluated at theta +- beta z, z ~ N(0, I).
        learning_rate: eta, per stage: theta <- theta - eta (g z + lambda (theta - theta_stage)). ``None``: the
            learning rate of each parameter's optimizer group, read at every logical step (LR schedulers apply).
        proximal_weight: lambda, per stage: pull towards the weights at the start of the stage. Any lambda > 0 keeps
            one copy of the trainable parameters (only the pruned subset when pruning).
        num_directions: P directions per logical step (2P forward passes per physical batch); the P differences of
            one example are clipped jointly to ``clip_norm``.
        num_stages: S stages; stage s lasts ``stage_length * 2**s`` logical steps, the last one until the end.
        stage_length: T0, the length of stage 0 in logical steps (needed when ``num_stages > 1``).
        prune_keep_fraction: with a value, SynFlow scores on an all-ones input (no data, no privacy cost) select
            this fraction of the trainable coordinates, the only ones perturbed and updated.
        prune_select: keep the ``lowest`` (DP-ZOPO) or the ``highest`` (SynFlow) scores.

    Privacy:
        Directions and pruning are data-independent; only the clipped per-example differences touch the data, and
        they are released through one Gaussian mechanism of dimension P per logical step (sensitivity C).
    """

    perturbation_scale: _StageValue = 1e-3
    learning_rate: _StageValue | None = None
    proximal_weight: _StageValue = 0.0
    num_directions: int = 1
    num_stages: int = 1
    stage_length: int | None = None
    prune_keep_fraction: float | None = None
    prune_select: PruneSelection = PruneSelection.LOWEST

    def __post_init__(self) -> None:
        _coerce_enum(self, "prune_select", PruneSelection, owner="ZerothOrderConfig")
        for name in ("num_directions", "num_stages", "stage_length"):
            value = getattr(self, name)
            if (value is not None or name != "stage_length") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"ZerothOrderConfig: `{name}` must be a positive integer, got {value!r}.")
        if self.num_stages > 1 and self.stage_length is None:
            raise ValueError(
                f"ZerothOrderConfig: num_stages={self.num_stages} needs `stage_length` (T0, the logical steps of "
                "stage 0; stage s lasts T0 * 2**s)."
            )
        for name, allow_zero in (("perturbation_scale", False), ("learning_rate", False), ("proximal_weight", True)):
            value = getattr(self, name)
            if value is None and name == "learning_rate":
                continue
            is_list = isinstance(value, Sequence) and not isinstance(value, str)  # lists from YAML / the CLI
            values = tuple(value) if is_list else (value,)
            if is_list:
                if len(values) != self.num_stages:
                    raise ValueError(
                        f"ZerothOrderConfig: `{name}` has {len(values)} values, one per stage is "
                        f"num_stages={self.num_stages}; give one number or {self.num_stages}."
                    )
                object.__setattr__(self, name, tuple(float(v) for v in values))
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"ZerothOrderConfig: `{name}` must be finite numbers, got {value!r}.")
                if v < 0 or (v == 0 and not allow_zero):
                    kind = "non-negative" if allow_zero else "positive"
                    raise ValueError(f"ZerothOrderConfig: `{name}` must be {kind}, got {value!r}.")
        fraction = self.prune_keep_fraction
        if fraction is not None and (
            isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0
        ):
            raise ValueError(f"ZerothOrderConfig: `prune_keep_fraction` must be in (0, 1], got {fraction!r}.")

    def stage_value(self, name: str, stage: int) -> float | None:
        """The value of the per-stage setting ``name`` in stage ``stage`` (0-based)."""
        value = getattr(self, name)
        return value[stage] if isinstance(value, tuple) else value


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
        physical_batch_shapes: ``few`` (default): the last physical batch of each rank (and a rank's fully masked
            ones) takes the smallest of p, p/2, p/4 and p/8 rows (rounded up) that holds its rows: at most four
            shapes, and about p/16 padding rows per step instead of p/2 (the main job, B = p = 128: 7% of the real
            rows instead of 41%, and 20% less time per step). ``fixed``: every physical batch has p rows, the last
            one of a step padded: one shape, for CUDA graphs or a compiler that should see a single shape. Compute
            only: the sample, the clipped sum and epsilon are the same. The shapes follow the realised batch size,
            which the threat model leaves outside (like the number of physical batches under ``fixed``).
        accountant: ``rdp`` (default: fast, a slightly loose upper bound) or ``pld`` (tight; calibration takes
            seconds to tens of seconds, and per-step epsilon costs ~0.2-0.8 s).
        norm_mode: per-example norm computation for layers with a sequence dimension (``auto``: instantiated, the
            faster way, where the block fits without raising the step's peak of memory; the ghost norm elsewhere).
        functorch_fallback: the parameters that a module without a clipping rule owns directly (custom norms such as
            ``LlamaRMSNorm``, raw parameters such as a ViT's class token) get per-example gradients from
            ``torch.func`` (slower: instantiates them), while registered layers inside keep their rules. ``False``
            refuses such modules instead. BatchNorm and ``nn.MultiheadAttention`` are refused regardless.
        non_finite: per-example gradients whose norm is inf or NaN (fp16 overflow, log(0), ...): ``zero`` (the
            default) drops that example's contribution to the clipping group and counts it; ``raise`` stops.
        seed: rebuilds the run's secret key (SHA-256 of the integer) for a reproducible research run: a resumed run
            then continues bit-identically. ``None`` (the default): 256 bits from the OS, a new key on every start
            (a resumed run draws fresh noise and samples, which is valid DP). Whoever knows the seed can regenerate
            all noise; the library never writes it to checkpoints, logs or Hydra/CLI outputs.
        secure_rng: draw the noise from the OS's cryptographically secure generator instead of the key's AES
            streams (~17 ns instead of ~2.8 ns per coordinate on a 2-core CPU; not reproducible, needs no key).
            Poisson sampling stays on the key's streams.
        method: ``first_order`` (DP-SGD) or ``zeroth_order`` (forward passes only, at inference memory; see
            ``ZerothOrderConfig``). Zeroth-order clips the vector of an example's P finite differences with
            ``clipping_function`` (``abadi`` is the literature's min(1, C/|g|)); it needs ``all-layer`` style.
        zeroth_order: the zeroth-order settings (a ``ZerothOrderConfig`` or a dict of its fields); ``None`` with
            ``method="zeroth_order"`` uses its defaults.
        self_check_every: the per-example self-check (``lightning_dpzero.selfcheck``) runs on the first physical
            batch of every run and again every this many logical steps (``None``: the first only). It refuses models
            and losses that are not per-example; it cannot be switched off.

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
    physical_batch_shapes: str = "few"
    accountant: Accountant = Accountant.RDP
    norm_mode: NormMode = NormMode.AUTO
    functorch_fallback: bool = True
    non_finite: NonFinitePolicy = NonFinitePolicy.ZERO
    seed: int | None = None
    secure_rng: bool = False
    method: Method = Method.FIRST_ORDER
    zeroth_order: ZerothOrderConfig | None = None
    self_check_every: int | None = 100

    def __post_init__(self) -> None:
        self._check_method()
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
        if self.physical_batch_shapes not in ("fixed", "few"):
            raise ValueError(
                f"PrivacyConfig: `physical_batch_shapes` must be 'fixed' (p rows each) or 'few' (the last physical "
                f"batch shrinks to p/2, p/4 or p/8 rows when that holds it), got {self.physical_batch_shapes!r}."
            )
        if self.sample_rate is not None and not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"PrivacyConfig: `sample_rate` must be in (0, 1], got {self.sample_rate!r}.")
        every = self.self_check_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(
                f"PrivacyConfig: `self_check_every` must be a positive integer (logical steps) or None (the first "
                f"step only), got {every!r}; the first-step check cannot be switched off."
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"PrivacyConfig: `seed` must be an integer or None, got {self.seed!r}.")
        if self.secure_rng and self.seed is not None:
            raise ValueError(
                "PrivacyConfig: secure_rng=True draws the noise from the OS and cannot be seeded; got "
                f"seed={self.seed}. Drop `seed` (or set secure_rng=False for a reproducible research run)."
            )
        self._check_groups()

    def _check_method(self) -> None:
        _coerce_enum(self, "method", Method)
        zo = self.zeroth_order
        if isinstance(zo, dict) or (zo is not None and hasattr(zo, "items") and not isinstance(zo, ZerothOrderConfig)):
            object.__setattr__(self, "zeroth_order", ZerothOrderConfig(**dict(zo.items())))  # Hydra / CLI dicts
        elif zo is not None and not isinstance(zo, ZerothOrderConfig):
            raise TypeError(f"PrivacyConfig: `zeroth_order` must be a ZerothOrderConfig, got {type(zo).__name__}.")
        if self.method is Method.FIRST_ORDER:
            if self.zeroth_order is not None:
                raise ValueError(
                    "PrivacyConfig: `zeroth_order` settings are given but method='first_order'; set "
                    "method='zeroth_order' to use them, or remove them."
                )
            return
        if self.zeroth_order is None:
            object.__setattr__(self, "zeroth_order", ZerothOrderConfig())
        if str(self.clipping_style).lower() != ClippingStyle.ALL_LAYER.value:
            raise ValueError(
                f"PrivacyConfig: method='zeroth_order' clips each example's P finite differences as one vector; "
                f"clipping_style={str(self.clipping_style)!r} is a first-order setting. Use clipping_style='all-layer'."
            )

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


def _coerce_enum(config: Any, name: str, enum: type[_StrEnum], owner: str = "PrivacyConfig") -> None:
    value = getattr(config, name)
    if isinstance(value, enum):
        return
    try:
        object.__setattr__(config, name, enum(str(value).lower()))
    except ValueError:
        raise ValueError(f"{owner}: `{name}`={value!r} is not one of {enum.choices()}.") from None


def _require_positive_finite(config: PrivacyConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"PrivacyConfig: `{name}` must be a positive finite number, got {value!r}.")
