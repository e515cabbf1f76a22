"""``python -m lightning_dpzero.audit``: configs/audit.yaml composes over the train groups and audits a GPT task."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import lightning_dpzero
from lightning_dpzero.accounting import epsilon_for
from lightning_dpzero.audit import AuditConfig
from lightning_dpzero.audit.__main__ import audit_from_config
from lightning_dpzero.config import Accountant

CONFIGS = Path(lightning_dpzero.__file__).resolve().parent / "configs"
SMALL = [
    "trainer.max_steps=3",
    "task.data.num_train=96",
    "task.data.batch_size=16",
    "privacy.physical_batch_size=16",
    "+trainer.enable_progress_bar=false",
    "audit.num_canaries=40",
    "privacy=sigma1",
    "privacy.delta=1e-5",
]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="audit", overrides=overrides, return_hydra_config=False)


def test_audit_config_composes_over_train_and_audits_the_gpt_task() -> None:
    """The train groups and the audit node compose; the GPT task (dict output with per_example_loss, self.log
    calls) runs under the audit; the claim is the run's epsilon (dp-accounting through epsilon_for)."""
    cfg = _compose(SMALL)
    assert cfg.task.model._target_.endswith("GPTTask") and cfg.privacy.noise_multiplier == 1.0
    assert AuditConfig(**cfg.audit).guess_fractions == (0.05, 0.1, 0.2)
    result, trainer = audit_from_config(cfg)
    assert trainer.global_step == 3 and result.steps == 3
    assert result.num_canaries == 40 and result.scores.shape == (40,)
    expected = epsilon_for([(1.0, result.sample_rate, 3)], delta=1e-5, accountant=Accountant.RDP)
    assert result.claimed_epsilon == pytest.approx(expected, rel=1e-9)
    assert result.sample_rate == pytest.approx(16 / (96 + result.num_included))
    assert 0.0 <= result.epsilon_lower_bound < result.claimed_epsilon


def test_audit_refuses_a_non_private_strategy() -> None:
    with pytest.raises(ValueError, match="is not private"):
        audit_from_config(_compose([*SMALL, "strategy=nonprivate"]))
