"""The one-run audit end to end under the single-device strategy ``dp``: the canary plumbing against a float64
reference, the bound below the claim on the correct implementation, above it on deliberately broken ones."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.callbacks import Callback

import lightning_dpzero as dpz
from lightning_dpzero.accounting import epsilon_for
from lightning_dpzero.audit import AuditConfig, CanaryModule, CanaryObserver, plot_scores, run_audit
from lightning_dpzero.audit.canaries import canary_dataloader, draw_inclusion
from lightning_dpzero.config import _ZERO_NOISE_ENV
from tests.audit.broken import BROKEN
from tests.audit.task import TinyRegression

# Claim ~2.05 at delta = 1e-5 over T = 50 steps with q ~ 30 / 700: broken runs reach the ~3.6 the m = 1000 canaries
# can certify (all 200 "in" guesses right), correct ones stay near 0.1 (one-run audits are loose).
STEPS, SIGMA, CANARIES = 50, 1.15, 1000


def _trainer(privacy: dpz.PrivacyConfig, steps: int, callbacks: list[Callback] | None = None) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        strategy=dpz.DPStrategy(privacy),
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _privacy(seed: int, sigma: float = SIGMA, **kwargs) -> dpz.PrivacyConfig:
    return dpz.PrivacyConfig(
        noise_multiplier=sigma, delta=1e-5, expected_batch_size=30, physical_batch_size=64, seed=seed, **kwargs
    )


class _RecordCanaries(Callback):
    """The real canary rows of every logical step (their ids, one entry per sampled occurrence)."""

    def __init__(self) -> None:
        self.steps: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ids = [int(j) for (_, pids), mask in batch for j, real in zip(pids, mask) if real and j >= 0]
        self.steps.append(ids)


@pytest.mark.parametrize("function", ["automatic", "abadi"])
def test_canary_movements_match_float64_reference_without_noise(monkeypatch, function) -> None:
    """sigma = 0: step t moves u_j by lr * s * (times j was sampled at t) / B, s = C w / (w + gamma) (automatic) or C
    (abadi), computed here in float64 from the formulas; canaries that are not in the dataset never move."""
    monkeypatch.setenv(_ZERO_NOISE_ENV, "1")
    m, w, lr, clip = 40, 50.0, 0.5, 0.7
    privacy = _privacy(3, sigma=0.0, clip_norm=clip, clipping_function=function, stability_constant=0.01)
    included = draw_inclusion(m, seed=5)
    model = TinyRegression(n=30)
    module = CanaryModule(model, num_canaries=m, canary_gradient_norm=w, canary_lr=lr)
    observer, record = CanaryObserver(), _RecordCanaries()
    trainer = _trainer(privacy, 6, [observer, record])
    trainer.fit(module, train_dataloaders=canary_dataloader(model.train_dataloader(batch_size=8), included))
    s = clip * w / (w + 0.01) if function == "automatic" else clip
    big_b = trainer.strategy.dp.ledger.expected_batch_size
    assert big_b == pytest.approx(30.0)
    assert sum(len(ids) for ids in record.steps) > 0, "the seed should sample some canaries"
    for increments, ids in zip(observer.increments, record.steps, strict=True):
        expected = np.zeros(m)
        for j in ids:
            expected[j] += lr * s / big_b
        np.testing.assert_allclose(increments.double().numpy(), expected, rtol=1e-5, atol=1e-7)
    assert not any(set(ids) - set(np.flatnonzero(included)) for ids in record.steps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_dp_bound_stays_below_the_claim(seed, tmp_path) -> None:
    """The claim is the library's epsilon for the run (checked against dp-accounting through epsilon_for); the
    audit's lower bound stays below it, as the theorem guarantees with probability 0.95 for a correct run."""
    result = run_audit(
        TinyRegression(),
        TinyRegression().train_dataloader(),
        trainer=_trainer(_privacy(seed), STEPS),
        config=AuditConfig(num_canaries=CANARIES, seed=seed),
    )
    print(result.summary_line())
    expected = epsilon_for([(SIGMA, result.sample_rate, STEPS)], delta=1e-5, accountant=dpz.Accountant.RDP)
    assert result.claimed_epsilon == pytest.approx(expected, rel=1e-9)
    assert result.steps == STEPS and result.num_included == int(draw_inclusion(CANARIES, seed).sum())
    assert result.sample_rate == pytest.approx(30 / (200 + result.num_included))
    assert result.canary_signal == pytest.approx(100.0 / 100.01)
    assert 0.0 <= result.epsilon_lower_bound < result.claimed_epsilon
    assert not result.violated
    if seed == 0:
        path = plot_scores(result, tmp_path / "scores.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("variant", ["scaled_noise", "no_clipping"])
def test_broken_dp_bound_exceeds_the_claim(variant) -> None:
    """Noise std 0.1 sigma C, or no clipping at all (canary gradients of norm 100 C): the same audit certifies an
    epsilon above the claim at 95% confidence."""
    model = TinyRegression()
    with BROKEN[variant]():
        result = run_audit(
            model,
            model.train_dataloader(),
            trainer=_trainer(_privacy(0), STEPS),
            config=AuditConfig(num_canaries=CANARIES, seed=0),
        )
    print(result.summary_line())
    assert result.violated and result.epsilon_lower_bound > result.claimed_epsilon + 1.0


def test_audit_refuses_scalar_losses_and_non_private_strategies() -> None:
    class ScalarLoss(TinyRegression):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx).mean()

    model = ScalarLoss()
    with pytest.raises(ValueError, match="per-example losses of shape"):
        run_audit(model, model.train_dataloader(), trainer=_trainer(_privacy(0), 2), config=AuditConfig())
    plain = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False)
    with pytest.raises(TypeError, match="not a first-order DP strategy"):
        run_audit(model, model.train_dataloader(), trainer=plain, config=AuditConfig())
    with pytest.raises(ValueError, match="guess_fractions"):
        AuditConfig(guess_fractions=(0.7,))
    assert math.isclose(AuditConfig(guess_fractions=[0.1]).guess_fractions[0], 0.1)  # Hydra lists become tuples
