"""Accounting never disagrees with sampling, and a budget only tightens (DESIGN.md section 7): the q the accountant
records is the q every batch was drawn with; a reloaded DataLoader cannot change it; a resumed run honours the
tightest budget in force; a module trained privately cannot start a second ledger at epsilon 0 by accident."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

import lightning_dpzero as dpz
from lightning_dpzero.accounting import epsilon_for
from lightning_dpzero.ledger import Binding
from tests.strategies.test_dp_strategy import Task, _trainer


class ReloadedTask(Task):
    """Its DataLoader's batch_size changes after the first epoch (reload_dataloaders_every_n_epochs=1)."""

    def train_dataloader(self) -> DataLoader:
        dataset = list(zip(*self.data))
        return DataLoader(dataset, batch_size=8 if self.current_epoch == 0 else 16)


class SampledRates(Callback):
    """The q each logical batch was drawn with, and the accountant's history after its step."""

    def __init__(self) -> None:
        self.drawn: list[float] = []
        self.recorded: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.drawn.append(batch.sample_rate)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.recorded.append(trainer.strategy.dp.ledger.accountant.history[-1][1])


def test_a_reloaded_dataloader_cannot_change_q() -> None:
    """Reference: the first epoch's q = 8/40. The second epoch's DataLoader asks for B = 16: refused, with the fix,
    instead of accounting q = 16/40 while the sampler keeps drawing 8/40 (or the reverse)."""
    trainer = _trainer(dpz.PrivacyConfig(noise_multiplier=1.0), -1, max_epochs=2, reload_dataloaders_every_n_epochs=1)
    with pytest.raises(ValueError, match=r"q=0\.4.*this run samples with q=0\.2.*expected_batch_size"):
        trainer.fit(ReloadedTask())


def test_the_accountant_records_the_q_each_batch_was_drawn_with() -> None:
    """Reference: with B fixed in the config, a reloaded DataLoader with another batch_size keeps q = 8/40; every
    step's recorded q is its batch's, and epsilon equals dp-accounting's for (q, sigma, steps)."""
    rates = SampledRates()
    privacy = dpz.PrivacyConfig(noise_multiplier=1.0, expected_batch_size=8)
    trainer = _trainer(privacy, -1, [rates], max_epochs=2, reload_dataloaders_every_n_epochs=1)
    trainer.fit(ReloadedTask())
    dp = trainer.strategy.dp
    assert len(rates.drawn) == dp.ledger.accountant.steps == 10
    assert rates.drawn == rates.recorded == [0.2] * 10
    assert dp.epsilon() == pytest.approx(epsilon_for([(1.0, 0.2, 10)], delta=dp.delta, accountant=dp.config.accountant))


def test_a_step_whose_batch_was_drawn_with_another_q_is_refused() -> None:
    """Reference: PrivacyLedger.use_sample (the accountant would record a q the sampler did not use)."""
    dp = dpz.DPStep(dpz.PrivacyConfig(noise_multiplier=1.0)).ledger
    dp.binding = Binding(dataset_size=10, sample_rate=0.2, physical_batch_size=2, delta=1e-3, noise_multiplier=1.0)
    dp.use_sample(0, 0.2)
    with pytest.raises(RuntimeError, match="sampled with q=0.25"):
        dp.use_sample(1, 0.25)


@pytest.mark.parametrize(
    ("resume_config", "budget"),
    [({"target_epsilon": 0.5}, None), ({"target_epsilon": 2.0}, 0.5), ({"target_epsilon": 8.0}, None)],
    ids=["lower-target", "lower-budget-callback", "higher-target"],
)
def test_a_resumed_run_honours_the_tightest_budget(tmp_path, resume_config, budget) -> None:
    """Reference: dp-accounting. Calibrated for epsilon 2 over 10 steps and checkpointed after 3 (epsilon > 0.5),
    the run is resumed with a lower target, or a lower PrivacyBudget, or a higher target: no step may take epsilon past
    min(2, the resumed run's limits), so the first two stop at once and the third still stops at 2."""
    base = dict(expected_batch_size=8, physical_batch_size=8, seed=3)
    first = _trainer(dpz.PrivacyConfig(target_epsilon=2.0, **base), 10)
    first.fit(Task())
    short = _trainer(dpz.PrivacyConfig(target_epsilon=2.0, **base), 3)
    # sigma as calibrated for 10 steps, no step taken yet: run 3 steps as if it had planned 10
    planned = {**first.strategy.dp.ledger.state_dict(), "accountant": None, "sample_position": 0}
    short.strategy.dp.ledger.load_state_dict(planned)
    short.fit(Task())
    eps3 = short.strategy.dp.epsilon()
    assert eps3 > 0.5
    path = tmp_path / "three.ckpt"
    short.save_checkpoint(path)

    callbacks = [] if budget is None else [dpz.PrivacyBudget(max_epsilon=budget)]
    resumed = _trainer(dpz.PrivacyConfig(**resume_config, **base), 30, callbacks)
    with pytest.warns(UserWarning, match="stopping"):
        resumed.fit(Task(), ckpt_path=path)
    dp = resumed.strategy.dp
    limit = min(2.0, resume_config["target_epsilon"], budget or float("inf"))
    assert dp.ledger.epsilon_limit == limit
    if limit < eps3:
        assert dp.ledger.accountant.steps == 3 and dp.epsilon() == eps3  # not one more step
    else:
        assert (
            dp.ledger.accountant.steps >= 10 and 1.9 < dp.epsilon() <= limit
        )  # on to the checkpointed budget, no further


def test_a_privately_trained_module_cannot_restart_at_epsilon_zero_under_a_new_trainer() -> None:
    """Reference: the ledger of the first run (3 steps). A second Trainer would start a new one at epsilon 0 on the
    same weights: refused, naming the fixes; the same Trainer continues its ledger."""
    privacy = dpz.PrivacyConfig(noise_multiplier=1.0, expected_batch_size=8)
    model = Task()
    first = _trainer(privacy, 3)
    first.fit(model)
    with pytest.raises(RuntimeError, match="already trained privately.*3 logical steps.*ckpt_path"):
        _trainer(privacy, 3).fit(model)
    first.fit_loop.epoch_loop.max_steps = 5
    first.fit(model)  # the same Trainer: the same ledger continues
    assert first.strategy.dp.ledger.accountant.steps == 5
    fresh = Task()
    fresh.load_state_dict(model.state_dict())
    second = _trainer(privacy, 1)
    second.fit(fresh)  # a deliberate, separate run on a fresh instance
    assert second.strategy.dp.ledger.accountant.steps == 1
