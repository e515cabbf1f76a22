"""``DPPrecision`` and the non-finite policy on one device; the 2-process bf16 oracles are in strategies/."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dpzero as dpz
from lightning_dpzero.config import _ZERO_NOISE_ENV
from lightning_dpzero.strategies.deepspeed import DPZeroStrategy
from tests.reference import reference_clipped_sum
from tests.strategies.test_dp_strategy import Capture, Task, per_example_loss


@pytest.fixture
def zero_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_ZERO_NOISE_ENV, "1")


def _trainer(privacy: dpz.PrivacyConfig, steps: int, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(
        strategy=dpz.DPStrategy(privacy),
        accelerator="cpu",
        max_steps=steps,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _rel_err(actual: dict[str, Tensor], expected: dict[str, Tensor], scale: float) -> float:
    a = torch.cat([actual[n].double().flatten() for n in expected])
    e = torch.cat([v.flatten() for v in expected.values()]) / scale
    return ((a - e).norm() / e.norm()).item()


def _privacy(**changes) -> dpz.PrivacyConfig:
    return dpz.PrivacyConfig(
        noise_multiplier=0.0, clip_norm=0.3, expected_batch_size=10, physical_batch_size=4, seed=1, **changes
    )


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_half_precision_gradient_within_bf16_tolerance_of_reference(zero_noise, precision: str) -> None:
    """Reference: float64 per-example clipping on the model as it was before each step (bf16-true: its bf16
    weights, upcast). Measured ~3e-3 relative error (bf16 rounds to 2^-8 = 3.9e-3); allowed 2e-2."""
    capture, task = Capture(), Task()
    trainer = _trainer(_privacy(), 3, [capture], plugins=[dpz.DPPrecision(precision)])
    trainer.fit(task)
    assert trainer.precision_plugin.scaler is None and trainer.precision_plugin.state_dict() == {}
    assert task.compute_dtype == torch.bfloat16  # the forward really ran in bf16
    weight_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert all(p.dtype == weight_dtype for p in task.parameters())
    for batch, model, grads in zip(capture.batches, capture.models, capture.grads):
        inputs = tuple(torch.cat([b[i] for b in batch.physical_batches]) for i in range(3))
        model = model.float()
        inputs = tuple(x.float() if x.is_floating_point() else x for x in inputs)
        expected = reference_clipped_sum(
            model, per_example_loss, inputs, torch.cat(batch.masks), clip_norm=0.3, style="all-layer",
            function="automatic",
        )  # fmt: skip
        assert all(g.dtype == weight_dtype for g in grads.values())
        assert _rel_err(grads, expected, 10.0) < 2e-2


def test_lightning_precision_argument_becomes_dp_precision() -> None:
    """Trainer(precision=...) under a DP strategy runs DPPrecision of that precision: autocast, no scaler."""
    trainer = _trainer(dpz.PrivacyConfig(noise_multiplier=1.0), 1, precision="bf16-mixed")
    assert isinstance(trainer.strategy.precision_plugin, dpz.DPPrecision)
    assert trainer.strategy.precision_plugin.precision == "bf16-mixed"
    task = Task()
    trainer.fit(task)
    assert task.compute_dtype == torch.bfloat16
    zero = DPZeroStrategy(stage=3, privacy=dpz.PrivacyConfig(noise_multiplier=1.0))
    zero.precision_plugin = dpz.DPPrecision("bf16-mixed")  # what the connector does with the user's plugin
    assert type(zero.precision_plugin).__name__ == "DeepSpeedPrecision"
    assert zero.precision_plugin.precision == "bf16-mixed"


def test_user_plugin_with_loss_scaler_is_refused() -> None:
    scaler = torch.amp.GradScaler("cpu")
    trainer = _trainer(dpz.PrivacyConfig(noise_multiplier=1.0), 1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    with pytest.raises(ValueError, match=r"GradScaler.*DPPrecision\('16-mixed'\)"):
        trainer.fit(Task())


@pytest.mark.parametrize(
    ("fp16", "match"),
    [({"enabled": True, "loss_scale": 0}, "dynamic"), ({"enabled": True, "loss_scale": 128}, "static scale of 128")],
)
def test_deepspeed_fp16_loss_scaling_is_refused(fp16: dict, match: str) -> None:
    strategy = DPZeroStrategy(stage=2, config={"fp16": fp16, "train_micro_batch_size_per_gpu": 1})
    with pytest.raises(ValueError, match=match):
        strategy._check_deepspeed_config()


def test_deepspeed_gradient_clipping_is_refused_and_default_forced_off() -> None:
    strategy = DPZeroStrategy(stage=2, config={"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 1})
    with pytest.raises(ValueError, match="gradient_clipping"):
        strategy._check_deepspeed_config()
    strategy = DPZeroStrategy(stage=2, config={"train_micro_batch_size_per_gpu": 1})
    strategy._check_deepspeed_config()
    assert strategy.config["gradient_clipping"] == 0.0


# ------------------------------------------------------------------------------------------- non-finite policy
class Overflow(L.LightningModule):
    """Rows 0, 5, 10, ... have inputs of ~1e6: in fp16 (max 65504) their activations overflow to inf."""

    def __init__(self, n: int = 40) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 16, generator=g)
        self.x[::5] *= 1e6
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x).float(), y, reduction="none")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)


class Steps(Callback):
    def __init__(self) -> None:
        self.batches, self.models, self.grads = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch)
        self.models.append({k: v.clone() for k, v in pl_module.net.state_dict().items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.net.named_parameters()})


def test_fp16_overflow_drops_the_example_and_keeps_weights_finite(zero_noise) -> None:
    """Reference: float64 clipping over the examples whose fp16 forward stayed finite (the others contribute 0)."""
    steps, task = Steps(), Overflow()
    privacy = dpz.PrivacyConfig(
        noise_multiplier=0.0, clip_norm=1.0, expected_batch_size=10, physical_batch_size=4, seed=2
    )
    trainer = _trainer(privacy, 4, [steps], plugins=[dpz.DPPrecision("16-mixed")])
    trainer.fit(task)
    assert all(torch.isfinite(p).all() for p in task.parameters())
    dropped = 0
    for batch, state, grads in zip(steps.batches, steps.models, steps.grads):
        x = torch.cat([b[0] for b in batch.physical_batches])
        y = torch.cat([b[1] for b in batch.physical_batches])
        mask = torch.cat(batch.masks)
        overflow = x.abs().amax(1) > 1e3
        dropped += int((overflow & mask).sum())
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3))
        model.load_state_dict(state)
        expected = reference_clipped_sum(
            model,
            lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
            (x, y),
            mask & ~overflow,
            clip_norm=1.0,
            style="all-layer",
            function="automatic",
        )
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert _rel_err(grads, expected, 10.0) < 2e-2  # fp16 keeps 11 bits: ~5e-4 per rounding
    assert dropped > 0, "the seed should sample some overflowing rows"
    assert trainer.strategy.dp.engine.non_finite_examples == dropped


def test_non_finite_policy_raise_stops_with_the_fix() -> None:
    privacy = dpz.PrivacyConfig(
        noise_multiplier=1.0, expected_batch_size=20, physical_batch_size=8, seed=2, non_finite="raise"
    )
    trainer = _trainer(privacy, 4, plugins=[dpz.DPPrecision("16-mixed")])
    with pytest.raises(FloatingPointError, match="non_finite='zero'"):
        trainer.fit(Overflow())


def test_unsupported_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="64-true"):
        dpz.DPPrecision("64-true")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed's fp16 path needs a GPU (CPUs refuse fp16)")
def test_deepspeed_fp16_runs_with_static_loss_scale_one_on_gpu() -> None:
    """GPU only (never run by CI): dp_zero2 in fp16 keeps DeepSpeed's loss scale at 1 and the weights finite."""
    trainer = L.Trainer(
        strategy=DPZeroStrategy(stage=2, privacy=dpz.PrivacyConfig(noise_multiplier=1.0, physical_batch_size=4)),
        accelerator="cuda",
        devices=1,
        plugins=[dpz.DPPrecision("16-mixed")],
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    task = Overflow()
    trainer.fit(task)
    assert trainer.strategy.config["fp16"]["loss_scale"] == 1.0
    assert trainer.strategy.model.optimizer.loss_scale == 1.0
    assert all(torch.isfinite(p.float()).all() for p in task.parameters())
