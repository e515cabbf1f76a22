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


def test_one_answer_to_whether_a_run_is_private() -> None:
    """Reference: lightning_dpzero.strategies.query; the CLI, the tasks, the callbacks, the audit and the summary all
    ask it. Registered names, strategy objects and Trainers; zeroth-order is private too."""
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_dpzero.strategies import dp_step, is_private

    for name in ("dp", "dp_ddp", "dp_zero1", "dp_zero2", "dp_zero3", "dp_fsdp"):
        assert is_private(name), name
    for name in ("ddp", "deepspeed_stage_3", "fsdp", "auto", "not-a-strategy"):
        assert not is_private(name), name
    dpz = lightning_dpzero
    config = dpz.PrivacyConfig(noise_multiplier=1.0)
    strategy = dpz.DPStrategy(config)
    assert is_private(strategy) and dp_step(strategy) is strategy.dp
    trainer = L.Trainer(strategy=strategy, logger=False, enable_progress_bar=False)
    assert is_private(trainer) and dp_step(trainer) is strategy.dp
    zeroth = dpz.DPStrategy(dpz.PrivacyConfig(noise_multiplier=1.0, method="zeroth_order"))
    assert is_private(zeroth) and dp_step(zeroth) is zeroth.dp
    assert not is_private(DDPStrategy()) and dp_step(DDPStrategy()) is None
    assert not is_private(L.Trainer(logger=False, enable_progress_bar=False))
