"""The public surface: every name in ``__all__`` exists, and importing registers the strategy names."""

from __future__ import annotations

import importlib

import pytest
from lightning.pytorch.strategies import StrategyRegistry

import lightning_dpzero


@pytest.mark.parametrize("name", lightning_dpzero.__all__)
def test_public_name_importable(name: str) -> None:
    """Reference: `from lightning_dpzero import <name>` works for each exported name."""
    assert getattr(importlib.import_module("lightning_dpzero"), name) is not None


def test_strategy_names_registered() -> None:
    """Reference: importing the package registers 'dp' with Lightning's registry."""
    assert "dp" in StrategyRegistry.available_strategies()
    assert StrategyRegistry["dp"]["strategy"] is lightning_dpzero.DPStrategy
