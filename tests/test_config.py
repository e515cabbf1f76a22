"""PrivacyConfig is validated at construction (STYLE.md section 4, DESIGN.md section 6)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lightning_dpzero.config import (
    _ZERO_NOISE_ENV,
    Accountant,
    ClippingFunction,
    ClippingStyle,
    NormMode,
    PrivacyConfig,
)


@pytest.fixture(autouse=True)
def _no_test_only_zero_noise(monkeypatch):
    monkeypatch.delenv(_ZERO_NOISE_ENV, raising=False)


@pytest.mark.parametrize("kwargs", [{}, {"target_epsilon": 3.0, "noise_multiplier": 1.0}], ids=["neither", "both"])
def test_exactly_one_of_target_epsilon_and_noise_multiplier(kwargs):
    """Reference: PrivacyConfig docstring ('Exactly one of target_epsilon and noise_multiplier')."""
    with pytest.raises(ValueError, match="exactly one of `target_epsilon`.*`noise_multiplier`"):
        PrivacyConfig(**kwargs)


def test_either_one_alone_is_accepted():
    """Reference: PrivacyConfig docstring (sigma given, or calibrated from a target epsilon)."""
    assert PrivacyConfig(target_epsilon=3.0).noise_multiplier is None
    assert PrivacyConfig(noise_multiplier=1.0).target_epsilon is None
    assert PrivacyConfig.default().target_epsilon == 8.0


@pytest.mark.parametrize("value", [-1.0, 0.0, math.inf, math.nan, True])
def test_clip_norm_must_be_positive_finite(value):
    """Reference: PrivacyConfig docstring (C is an L2 bound: a positive number)."""
    with pytest.raises(ValueError, match="`clip_norm` must be a positive finite number"):
        PrivacyConfig(noise_multiplier=1.0, clip_norm=value)


@pytest.mark.parametrize("value", [0.0, -0.5, math.inf])
def test_noise_multiplier_must_be_positive(value):
    """Reference: DESIGN.md section 6 (nothing weakens privacy silently): sigma = 0 means no guarantee."""
    with pytest.raises(ValueError, match="no privacy guarantee"):
        PrivacyConfig(noise_multiplier=value)


def test_zero_noise_only_with_the_test_switch(monkeypatch):
    """Reference: config._ZERO_NOISE_ENV comment (sigma = 0 is a test-only path for the oracles)."""
    monkeypatch.setenv(_ZERO_NOISE_ENV, "1")
    assert PrivacyConfig(noise_multiplier=0.0).noise_multiplier == 0.0
    with pytest.raises(ValueError):
        PrivacyConfig(noise_multiplier=-1.0)


def test_strings_are_coerced_to_enums():
    """Reference: STYLE.md section 3 (registries and enums, never magic strings): YAML strings become enums."""
    cfg = PrivacyConfig(
        noise_multiplier=1.0,
        clipping_style="layer-wise",
        clipping_function="ABADI",
        accountant="pld",
        norm_mode="ghost",
        group_clip_norms=[0.6, 0.8],
    )
    assert cfg.clipping_style is ClippingStyle.LAYER_WISE
    assert cfg.clipping_function is ClippingFunction.ABADI
    assert cfg.accountant is Accountant.PLD
    assert cfg.norm_mode is NormMode.GHOST
    assert cfg.group_clip_norms == (0.6, 0.8)  # lists (Hydra, CLI) become tuples


@pytest.mark.parametrize(
    ("field", "enum"),
    [
        ("clipping_style", ClippingStyle),
        ("clipping_function", ClippingFunction),
        ("accountant", Accountant),
        ("norm_mode", NormMode),
    ],
)
def test_bad_enum_string_lists_the_choices(field, enum):
    """Reference: STYLE.md section 7 (errors say what is allowed)."""
    with pytest.raises(ValueError) as info:
        PrivacyConfig(noise_multiplier=1.0, **{field: "layerwise-typo"})
    message = str(info.value)
    assert field in message and "layerwise-typo" in message
    assert str(enum.choices()) in message


def test_group_wise_needs_clipping_groups():
    """Reference: PrivacyConfig docstring (clipping_groups: for group-wise, a count or name prefixes)."""
    with pytest.raises(ValueError, match="group-wise.*needs `clipping_groups`"):
        PrivacyConfig(noise_multiplier=1.0, clipping_style="group-wise")
    assert PrivacyConfig(noise_multiplier=1.0, clipping_style="group-wise", clipping_groups=3).clipping_groups == 3
    cfg = PrivacyConfig(noise_multiplier=1.0, clipping_style="group-wise", clipping_groups=["enc", "dec"])
    assert cfg.clipping_groups == ("enc", "dec")


@pytest.mark.parametrize("groups", [0, -2, True, (), ("enc", "")])
def test_bad_clipping_groups_are_refused(groups):
    """Reference: PrivacyConfig docstring (a number M >= 1, or non-empty name prefixes)."""
    with pytest.raises(ValueError, match="clipping_groups"):
        PrivacyConfig(noise_multiplier=1.0, clipping_style="group-wise", clipping_groups=groups)


def test_clipping_groups_without_group_wise_is_refused():
    """Reference: PrivacyConfig docstring (clipping_groups is for group-wise only)."""
    with pytest.raises(ValueError, match="only used with clipping_style='group-wise'"):
        PrivacyConfig(noise_multiplier=1.0, clipping_style="layer-wise", clipping_groups=2)


def test_group_clip_norms_must_square_sum_to_clip_norm():
    """Reference: DESIGN.md section 2.3 (sum_k C_k^2 = C^2 so that ||clipped g_i|| <= C)."""
    ok = PrivacyConfig(noise_multiplier=1.0, clip_norm=2.0, clipping_style="param-wise", group_clip_norms=(1.2, 1.6))
    assert ok.group_clip_norms == (1.2, 1.6)
    with pytest.raises(ValueError, match=r"sum_k C_k\^2 = C\^2.*clip_norm=2.0") as info:
        PrivacyConfig(noise_multiplier=1.0, clip_norm=2.0, clipping_style="param-wise", group_clip_norms=(1.0, 1.0))
    assert "1.41421" in str(info.value)
    with pytest.raises(ValueError, match="positive"):
        PrivacyConfig(noise_multiplier=1.0, clip_norm=1.0, clipping_style="param-wise", group_clip_norms=(-0.6, 0.8))
    with pytest.raises(ValueError, match="several groups"):
        PrivacyConfig(noise_multiplier=1.0, clip_norm=1.0, group_clip_norms=(1.0,))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"delta": 0.0}, "`delta` must be in"),
        ({"delta": 1.0}, "`delta` must be in"),
        ({"sample_rate": 0.0}, "`sample_rate` must be in"),
        ({"sample_rate": 1.5}, "`sample_rate` must be in"),
        ({"expected_batch_size": 256, "sample_rate": 0.01}, "at most one of `expected_batch_size`"),
        ({"expected_batch_size": 0}, "`expected_batch_size` must be a positive integer"),
        ({"physical_batch_size": 2.5}, "`physical_batch_size` must be a positive integer"),
        ({"stability_constant": 0.0}, "`stability_constant`"),
        ({"target_epsilon": -1.0, "noise_multiplier": None}, "`target_epsilon`"),
    ],
)
def test_other_fields_are_validated(kwargs, needle):
    """Reference: PrivacyConfig docstring (ranges of delta, q, B, p, gamma, epsilon)."""
    values = {"noise_multiplier": 1.0, **kwargs}
    with pytest.raises(ValueError, match=needle):
        PrivacyConfig(**values)


def test_config_is_frozen():
    """Reference: config.py module docstring (frozen: the accountant assumes sigma, q and C do not change)."""
    cfg = PrivacyConfig(noise_multiplier=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.clip_norm = 2.0  # type: ignore[misc]
    assert cfg.clip_norm == 1.0


def test_replace_validates_again():
    """Reference: PrivacyConfig.replace docstring (a copy with the changes, validated again)."""
    cfg = PrivacyConfig(noise_multiplier=1.0)
    changed = cfg.replace(clipping_style="param-wise", clip_norm=0.5)
    assert changed.clipping_style is ClippingStyle.PARAM_WISE and changed.clip_norm == 0.5
    assert cfg.clipping_style is ClippingStyle.ALL_LAYER and cfg.clip_norm == 1.0
    with pytest.raises(ValueError, match="clip_norm"):
        cfg.replace(clip_norm=-1.0)
    with pytest.raises(ValueError, match="exactly one"):
        cfg.replace(target_epsilon=2.0)
    with pytest.raises(TypeError, match="no field"):
        cfg.replace(clip=2.0)
