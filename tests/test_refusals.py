"""One test per row of the README's refused-input table not already covered elsewhere (the table names each test).

Every refusal goes through ``Trainer.fit`` as a user would meet it, and checks that the message names the setting at
fault and the fix.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BatchSizeFinder, Callback, EarlyStopping, LearningRateFinder, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dpzero as dpz
from lightning_dpzero.strategies.deepspeed import DPZeroStrategy
from lightning_dpzero.strategies.fsdp import shard_lightning_module
from tests.strategies.test_dp_strategy import Task, per_example_loss


def _trainer(privacy: dpz.PrivacyConfig | None = None, steps: int = 2, **kwargs) -> L.Trainer:
    return L.Trainer(
        strategy=dpz.DPStrategy(privacy or dpz.PrivacyConfig(noise_multiplier=1.0, physical_batch_size=8)),
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


class LSTMTask(Task):
    def __init__(self) -> None:
        super().__init__()
        self.net.rnn = nn.LSTM(8, 8)


class ManualTask(Task):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class TwoOptimizers(Task):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net.head.parameters(), lr=0.1), torch.optim.SGD(self.net.seq.parameters(), lr=0.1)]


class ForeignParameter(Task):
    """A DP optimizer mixed with a non-DP parameter (one that is not the LightningModule's)."""

    def configure_optimizers(self):
        return torch.optim.SGD([*self.parameters(), torch.zeros(3, requires_grad=True)], lr=0.1)


class UnusedParameter(Task):
    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(4, 4)  # trainable, never called


class OutsideItsModule(Task):
    """Uses the head's weight through F.linear: the head's hook never sees that use."""

    def training_step(self, batch, batch_idx):
        tokens, image, y = batch
        h = torch.tanh(self.net.seq(self.net.ln(self.net.emb(tokens)))).mean(1)
        g = torch.relu(self.net.gn(self.net.conv(image))).mean((2, 3))
        logits = F.linear(torch.cat([h, g], 1), self.net.head.weight, self.net.head.bias)
        return F.cross_entropy(logits, y, reduction="none")


class TokenLosses(Task):
    """Returns [p, T] token losses: not reducible to one loss per example by the strategy."""

    def training_step(self, batch, batch_idx):
        losses = super().training_step(batch, batch_idx)
        return losses.unsqueeze(1).expand(-1, 5)


class EmptyData(Task):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(0, 5)), batch_size=8)


class RootParameter(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))


class FrozenHead(Task):
    def __init__(self) -> None:
        super().__init__()
        self.net.head.requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class UnfreezeHead(Callback):
    """Gradual unfreezing (as BackboneFinetuning does): the head joins the optimizer once training has started."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 1:
            module.net.head.requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": list(module.net.head.parameters())})


class BatchSizedTask(Task):
    """A module whose batch_size Lightning's BatchSizeFinder can tune."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 8


@pytest.mark.parametrize(
    ("task", "privacy", "trainer_kwargs", "error", "match"),
    [
        (LSTMTask, None, {}, dpz.UnsupportedLayerError, r"'net\.rnn' \(LSTM\).*requires_grad_\(False\)"),
        (ManualTask, None, {}, ValueError, "manual optimization"),
        (TwoOptimizers, None, {}, RuntimeError, "multiple optimizers is only supported with manual optimization"),
        (ForeignParameter, None, {}, ValueError, r"shape \(3,\) that is not one of the LightningModule's parameters"),
        (FrozenHead, None, {"callbacks": [UnfreezeHead()]}, ValueError, r"\(3, 12\).*made trainable after training"),
        (UnusedParameter, None, {}, RuntimeError, r"\['spare\.weight', 'spare\.bias'\].*requires_grad_\(False\)"),
        (OutsideItsModule, None, {}, dpz.PerExampleCheckError, r"'net\.head\.weight'.*call the module"),
        (TokenLosses, None, {}, ValueError, r"shape \((\d+), 5\).*per-example losses of shape \[\1\]"),
        (EmptyData, None, {}, ValueError, "training dataset is empty"),
        (Task, None, {"devices": 2}, ValueError, r"DPStrategy runs on one device.*devices=2.*'dp_ddp'"),
        (Task, None, {"callbacks": [LearningRateFinder()]}, ValueError, "LearningRateFinder tunes the run from"),
        (BatchSizedTask, None, {"callbacks": [BatchSizeFinder()]}, ValueError, "BatchSizeFinder tunes the run"),
        (
            Task,
            dpz.PrivacyConfig(noise_multiplier=1.0, delta=0.05),
            {},
            ValueError,
            r"delta=0\.05 is not below 1/N = 0\.025",
        ),
    ],
)
def test_refused_at_fit(task, privacy, trainer_kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        _trainer(privacy, **trainer_kwargs).fit(task())


class LBFGSTask(Task):
    """An optimizer that evaluates its closure several times per step: each evaluation is a training step."""

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)


def test_accumulation_set_during_training_is_refused_before_any_release() -> None:
    """Sensitivity: GradientAccumulationScheduler sets accumulate_grad_batches once training has started (past the
    setup check); two Poisson samples' clipped sums would then be noised once and accounted as one step. Refused on
    the first logical batch: nothing released, nothing accounted, the weights untouched."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    task = Task()
    before = [p.detach().clone() for p in task.parameters()]
    trainer = _trainer(callbacks=[GradientAccumulationScheduler({0: 2})])
    with pytest.raises(RuntimeError, match=r"accumulate_grad_batches is 2 \(a GradientAccumulationScheduler"):
        trainer.fit(task)
    assert trainer.strategy.dp.ledger.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, task.parameters()))


class SkippedSteps(Task):
    """Skips every other optimizer step by running the closure alone (a pattern from Lightning's docs)."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if batch_idx % 2 == 0:
            optimizer.step(closure=optimizer_closure)
        else:
            optimizer_closure()


def test_a_skipped_optimizer_step_is_refused() -> None:
    """Sensitivity: a batch whose optimizer step is skipped is clipped but never released; the next batch's release
    held both samples' clipped sums (4 logical batches, 2 releases). Refused when the next batch begins: only the
    first batch, released on its own, is accounted."""
    trainer = _trainer(steps=4)
    with pytest.raises(RuntimeError, match=r"optimizer step did not run \(an optimizer_step override"):
        trainer.fit(SkippedSteps())
    assert trainer.strategy.dp.ledger.steps == 1


def test_a_logical_batch_is_never_released_twice() -> None:
    """Sensitivity: LBFGS evaluates its closure several times per step; each evaluation clipped, noised and
    accounted the same Poisson sample as a fresh one (2 optimizer steps were accounted as 6 steps: the accountant
    undercounts a subsample released three times). Refused at the second release of a draw; the first is a
    genuine step and stays accounted."""
    trainer = _trainer()
    with pytest.raises(RuntimeError, match=r"Poisson draw 0 was already used.*\(LBFGS\)"):
        trainer.fit(LBFGSTask())
    assert trainer.strategy.dp.ledger.steps == 1


class LogsItsLoss(Task):
    """Logs its training loss per step and per epoch, validates on held-out rows, and may log a metric of the
    training data at each epoch's end; ``plateau``: a ReduceLROnPlateau on ``plateau``."""

    def __init__(self, plateau: str | None = None) -> None:
        super().__init__()
        self.plateau = plateau
        g = torch.Generator().manual_seed(1)
        self.held_out = (torch.randint(0, 12, (8, 5), generator=g), torch.randn(8, 2, 6, 6, generator=g),
                         torch.randint(0, 3, (8,), generator=g))  # fmt: skip
        self.seen: list[Tensor] = []

    def training_step(self, batch, batch_idx):
        losses = super().training_step(batch, batch_idx)
        self.seen.append(losses.detach().mean())
        self.log("train_loss", losses.mean(), on_step=True, on_epoch=True)
        return losses

    def on_train_epoch_end(self) -> None:
        self.log("epoch_mean_loss", torch.stack(self.seen).mean())
        self.seen.clear()

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val_loss", per_example_loss(self.net, batch).mean())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.held_out), batch_size=8)

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        if self.plateau is None:
            return optimizer
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": self.plateau}}


class TwoLoaders(Task):
    """Two training DataLoaders (Lightning combines them): each batch is a dict of the two loaders' batches."""

    def train_dataloader(self):
        rows = TensorDataset(*self.data)
        return {"a": DataLoader(rows, batch_size=8), "b": DataLoader(rows, batch_size=8)}

    def training_step(self, batch, batch_idx):
        return super().training_step(batch["a"], batch_idx)


def test_a_batch_that_is_not_a_poisson_sample_is_refused() -> None:
    """Sensitivity: a training batch the strategy did not sample (here Lightning's combination of two loaders) was
    handed to training_step as it came, and its gradient would have reached the optimizer neither clipped nor
    noised. Refused before anything is released."""
    task = TwoLoaders()
    before = [p.detach().clone() for p in task.parameters()]
    trainer = _trainer()
    with pytest.raises(
        RuntimeError, match=r"not a Poisson sample.*\{'a': LogicalBatch, 'b': LogicalBatch\}.*ConcatDataset"
    ):
        trainer.fit(task)
    assert trainer.strategy.dp.ledger.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, task.parameters()))


def _monitored_trainer(root, steps: int, callbacks: list[Callback], **kwargs) -> L.Trainer:
    return L.Trainer(
        strategy=dpz.DPStrategy(dpz.PrivacyConfig(noise_multiplier=1.0, physical_batch_size=8)),
        max_steps=steps,
        callbacks=callbacks,
        default_root_dir=root,
        logger=False,
        limit_val_batches=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("consumer", "plateau", "match", "steps"),
    [
        (
            lambda: EarlyStopping(monitor="train_loss"),
            None,
            r"EarlyStopping\(monitor='train_loss'\) reads 'train_loss'",
            0,
        ),
        (
            lambda: ModelCheckpoint(monitor="train_loss_step", every_n_train_steps=1),
            None,
            r"ModelCheckpoint\(monitor='train_loss_step'\) reads 'train_loss_step', which `training_step` logs",
            0,
        ),
        (None, "train_loss_epoch", r"ReduceLROnPlateau \(its lr_scheduler 'monitor'\) reads 'train_loss_epoch'", 0),
        (
            lambda: EarlyStopping(monitor="epoch_mean_loss", check_on_train_epoch_end=True),
            None,
            r"'epoch_mean_loss', which `on_train_epoch_end` logs",
            5,  # refused at the first epoch's end (40 rows, q = 8/40: 5 steps), before EarlyStopping reads it
        ),
    ],
    ids=["early-stopping", "model-checkpoint", "reduce-on-plateau", "epoch-end-metric"],
)
def test_a_run_steered_by_a_training_metric_is_refused(consumer, plateau, match, steps, tmp_path) -> None:
    """Sensitivity: each monitor reads an un-noised value of the training data and would stop the run, keep a
    checkpoint or cut the learning rate by it. Refused where the value is logged, before any monitor reads it:
    nothing past ``steps`` is released, no checkpoint is chosen."""
    callbacks = [] if consumer is None else [consumer()]
    trainer = _monitored_trainer(tmp_path, 12, callbacks)
    with pytest.raises(ValueError, match=match):
        trainer.fit(LogsItsLoss(plateau))
    assert trainer.strategy.dp.ledger.steps == steps
    assert not list(tmp_path.rglob("*.ckpt"))


def test_monitors_of_held_out_and_public_metrics_train(tmp_path) -> None:
    """Only metrics of the training data are refused: EarlyStopping and a plateau scheduler on the held-out
    val_loss, and a ModelCheckpoint on PrivacyBudget's epsilon (a function of the step count), train to the end."""
    checkpoint = ModelCheckpoint(monitor="epsilon", mode="min", every_n_train_steps=1)
    early = EarlyStopping(monitor="val_loss", patience=100)
    trainer = _monitored_trainer(tmp_path, 6, [early, checkpoint, dpz.PrivacyBudget()], val_check_interval=3)
    trainer.fit(LogsItsLoss(plateau="val_loss"))
    assert trainer.strategy.dp.ledger.steps == 6
    assert checkpoint.best_model_path and early.wait_count == 0


def test_changed_sigma_or_sample_rate_on_resume_is_refused(tmp_path) -> None:
    privacy = dpz.PrivacyConfig(noise_multiplier=1.0, expected_batch_size=8, physical_batch_size=8)
    trainer = _trainer(privacy, steps=2)
    trainer.fit(Task())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="noise_multiplier=1.0, the config says 2.0"):
        _trainer(privacy.replace(noise_multiplier=2.0), steps=4).fit(Task(), ckpt_path=tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="sample rate q=0.2.*q=0.4"):
        _trainer(privacy.replace(expected_batch_size=16), steps=4).fit(Task(), ckpt_path=tmp_path / "a.ckpt")


def test_deepspeed_config_optimizer_is_refused_only_where_the_noise_cannot_reach_it() -> None:
    """A config optimizer is wrapped after DeepSpeed builds it (the 2-process oracle and noise tests, "_dsopt"); it is
    refused for zeroth-order, and so are DeepSpeed's settings that step part of the partitions with another optimizer
    (partial offload, super offload, ZenFlow)."""
    base = {"optimizer": {"type": "Adam"}, "train_micro_batch_size_per_gpu": 1}
    DPZeroStrategy(stage=2, config=dict(base))._check_deepspeed_config()  # allowed
    zeroth_order = dpz.PrivacyConfig(noise_multiplier=1.0, method="zeroth_order")
    with pytest.raises(ValueError, match="zeroth-order DP updates the parameters itself"):
        DPZeroStrategy(stage=3, privacy=zeroth_order, config=dict(base))._check_deepspeed_config()
    offloads = {
        "ratio < 1": {"offload_optimizer": {"device": "cpu", "ratio": 0.5}},
        "super_offload": {"offload_optimizer": {"device": "cpu", "super_offload": True}},
        "zenflow": {"zenflow": {"topk_ratio": 0.1}},
    }
    for setting, zero in offloads.items():
        strategy = DPZeroStrategy(stage=3, config={**base, "zero_optimization": {"stage": 3, **zero}})
        with pytest.raises(ValueError, match=rf"{setting}.*the noise cannot reach"):
            strategy._check_deepspeed_config()


def test_fsdp_root_owned_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match=r"holds parameters \['scale'\] directly.*configure_model"):
        shard_lightning_module(RootParameter(), mesh=None, owner="DPFSDPStrategy")


def test_both_or_neither_budget_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="exactly one of `target_epsilon`"):
        dpz.PrivacyConfig(target_epsilon=3.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="exactly one of `target_epsilon`"):
        dpz.PrivacyConfig()


def test_strategy_settings_that_do_not_exist_at_a_stage_are_refused() -> None:
    """Streaming the clipped sums needs ZeRO-3's partitioned reduction; zeroth-order needs partitioned parameters."""
    with pytest.raises(ValueError, match=r"stream_clipped_sums=True.*stage 3 only"):
        dpz.DPZeroStrategy(stage=2, stream_clipped_sums=True)
    zeroth_order = dpz.PrivacyConfig(noise_multiplier=1.0, method="zeroth_order")
    with pytest.raises(ValueError, match=r"zeroth-order DP runs at ZeRO stage 3.*use strategy 'dp_ddp'"):
        dpz.DPZeroStrategy(stage=1, privacy=zeroth_order)


def test_pruning_an_already_sharded_model_is_refused() -> None:
    """SynFlow scores full weights: parameters already partitioned (``zero.Init``) or sharded (the user's
    ``configure_model``) before the strategy could select are refused with the ways out."""
    from lightning_dpzero.config import ZerothOrderConfig
    from lightning_dpzero.zeroth_order import ZOStep

    privacy = dpz.PrivacyConfig(
        noise_multiplier=1.0, method="zeroth_order", zeroth_order=ZerothOrderConfig(prune_keep_fraction=0.1)
    )
    model = torch.nn.Linear(3, 2)
    model.weight.ds_tensor = torch.zeros(3)  # what a ZeRO-3 partitioned parameter carries
    with pytest.raises(ValueError, match=r"sharded already.*use strategy 'dp' or 'dp_ddp', or set prune_keep_fraction"):
        ZOStep(privacy).before_sharding(model)


def test_ranks_with_different_pruning_selections_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank scores its own full copy; if the kept coordinates differ (e.g. differently initialised weights),
    the ranks would perturb different coordinates with the same z: refused. The other rank is simulated."""
    import lightning_dpzero.strategies._mixin as mixin

    strategy = dpz.DPDDPStrategy(dpz.PrivacyConfig(noise_multiplier=1.0, method="zeroth_order"))
    strategy.dp.kept = {"w": torch.tensor([0, 2])}
    monkeypatch.setattr(mixin.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(mixin.dist, "get_world_size", lambda group=None: 2)

    def gather(out: list, obj: object, group=None) -> None:  # noqa: ANN001
        out[:] = [obj, "another rank's digest"]

    monkeypatch.setattr(mixin.dist, "all_gather_object", gather)
    with pytest.raises(RuntimeError, match="selected different coordinates.*seed_everything"):
        strategy._check_selection_agrees()
    monkeypatch.setattr(
        mixin.dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(slice(None), [obj, obj])
    )
    strategy._check_selection_agrees()  # the same selection everywhere: fine
