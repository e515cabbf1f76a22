"""The single-device strategy ``"dp"`` end to end, against the oracles of DESIGN.md section 4."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

import lightning_dpzero as dpz
from lightning_dpzero.accounting import epsilon_for
from lightning_dpzero.config import _ZERO_NOISE_ENV
from tests.reference import reference_clipped_sum


@pytest.fixture
def zero_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_ZERO_NOISE_ENV, "1")


class Net(nn.Module):
    """Every layer type of the foundation: Embedding, Linear on [n, T, D], LayerNorm, Conv2d, GroupNorm, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.ln = nn.LayerNorm(8)
        self.seq = nn.Linear(8, 8)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(8 + 4, 3)

    def forward(self, tokens: Tensor, image: Tensor) -> Tensor:
        h = torch.tanh(self.seq(self.ln(self.emb(tokens)))).mean(1)  # [n, 8]
        g = torch.relu(self.gn(self.conv(image))).mean((2, 3))  # [n, 4]
        return self.head(torch.cat([h, g], 1))


def per_example_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    tokens, image, y = batch
    return F.cross_entropy(model(tokens, image), y, reduction="none")


class Task(L.LightningModule):
    def __init__(self, n: int = 40, loss_kind: str = "per-example", lr: float = 0.1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.data = (
            torch.randint(0, 12, (n, 5), generator=g),
            torch.randn(n, 2, 6, 6, generator=g),
            torch.randint(0, 3, (n,), generator=g),
        )
        self.net = Net()
        self.loss_kind, self.lr = loss_kind, lr
        self.compute_dtype: torch.dtype | None = None  # the dtype the head computed in (precision tests)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor | dict[str, Tensor]:
        tokens, image, y = batch
        logits = self.net(tokens, image)  # as per_example_loss(self.net, batch), recording the compute dtype
        self.compute_dtype = logits.dtype
        losses = F.cross_entropy(logits, y, reduction="none")
        if self.loss_kind == "scalar":
            return losses.mean()  # the strategy multiplies by the physical batch size p
        if self.loss_kind == "dict":
            return {"loss": losses.mean(), "per_example_loss": losses}
        return losses

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.data), batch_size=8, shuffle=True)


class Capture(Callback):
    """Records each logical batch, the model before the step, and the gradient handed to the optimizer."""

    def __init__(self) -> None:
        self.batches, self.models, self.grads = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch)
        self.models.append(copy.deepcopy(pl_module.net))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.net.named_parameters()})


def _trainer(privacy: dpz.PrivacyConfig, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(
        strategy=dpz.DPStrategy(privacy),
        max_steps=max_steps,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
@pytest.mark.parametrize("function", ["abadi", "automatic"])
@pytest.mark.parametrize("loss_kind", ["per-example", "scalar", "dict"])
def test_gradient_matches_float64_reference(zero_noise, style, function, loss_kind) -> None:
    """Reference: tests/reference.py over the real rows of every physical batch, divided by B = qN."""
    privacy = dpz.PrivacyConfig(
        noise_multiplier=0.0,
        clip_norm=0.3,
        clipping_style=style,
        clipping_function=function,
        expected_batch_size=10,
        physical_batch_size=4,
        physical_batch_shapes="fixed",  # p rows in every physical batch (the "few" shapes: the test below)
        seed=1,
    )
    capture = Capture()
    task = Task(loss_kind=loss_kind)
    _trainer(privacy, 3, [capture]).fit(task)
    assert len(capture.grads) == 3
    for batch, model, grads in zip(capture.batches, capture.models, capture.grads):
        tokens = torch.cat([b[0] for b in batch.physical_batches])
        image = torch.cat([b[1] for b in batch.physical_batches])
        y = torch.cat([b[2] for b in batch.physical_batches])
        mask = torch.cat(batch.masks)
        assert all(len(m) == 4 for m in batch.masks)
        expected = reference_clipped_sum(
            model, per_example_loss, (tokens, image, y), mask, clip_norm=0.3, style=style, function=function
        )
        for name, value in expected.items():
            torch.testing.assert_close(grads[name].double(), value / 10.0, rtol=1e-5, atol=1e-8)


def test_few_shapes_match_the_reference_and_train_as_fixed_shapes() -> None:
    """Reference: tests/reference.py over the real rows (sigma = 0), with last physical batches of 1, 2, 4 or 8 rows
    (PrivacyConfig.physical_batch_shapes="few", p = 8); then with noise, the same seed trains to the same weights as
    "fixed" (same samples, same noise; only the padding differs)."""
    import os

    from lightning_dpzero.config import _ZERO_NOISE_ENV

    def privacy(shapes: str, sigma: float) -> dpz.PrivacyConfig:
        return dpz.PrivacyConfig(noise_multiplier=sigma, clip_norm=0.3, expected_batch_size=10, physical_batch_size=8,
                                 physical_batch_shapes=shapes, seed=1)  # fmt: skip

    os.environ[_ZERO_NOISE_ENV] = "1"
    try:
        capture = Capture()
        _trainer(privacy("few", 0.0), 6, [capture]).fit(Task())
    finally:
        del os.environ[_ZERO_NOISE_ENV]
    sizes = {len(m) for batch in capture.batches for m in batch.masks}
    assert sizes <= {1, 2, 4, 8} and sizes != {8}, sizes
    for batch, model, grads in zip(capture.batches, capture.models, capture.grads):
        inputs = tuple(torch.cat([b[i] for b in batch.physical_batches]) for i in range(3))
        expected = reference_clipped_sum(model, per_example_loss, inputs, torch.cat(batch.masks), clip_norm=0.3,
                                         style="all-layer", function="automatic")  # fmt: skip
        for name, value in expected.items():
            torch.testing.assert_close(grads[name].double(), value / 10.0, rtol=1e-5, atol=1e-8)
    tasks = {}
    for shapes in ("fixed", "few"):
        torch.manual_seed(0)  # the same initial model
        tasks[shapes] = Task()
        _trainer(privacy(shapes, 1.0), 4).fit(tasks[shapes])
    assert not torch.equal(tasks["few"].net.head.weight, Task().net.head.weight)  # trained
    for (name, a), b in zip(tasks["fixed"].named_parameters(), tasks["few"].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_padding_and_empty_samples_contribute_nothing(zero_noise) -> None:
    """Reference: with q tiny, steps whose sample is empty hand the optimizer an exactly zero gradient."""
    privacy = dpz.PrivacyConfig(noise_multiplier=0.0, expected_batch_size=1, physical_batch_size=4, seed=3)
    capture = Capture()
    _trainer(privacy, 12, [capture]).fit(Task())
    empty = [g for b, g in zip(capture.batches, capture.grads) if not any(m.any() for m in b.masks)]
    assert empty, "with B = 1 some of 12 samples are empty (P = 0.36 each)"
    for grads in empty:
        assert all(torch.count_nonzero(g) == 0 for g in grads.values())


class ZeroGrad(L.LightningModule):
    """A model whose loss does not depend on the parameters: the update is pure noise."""

    def __init__(self, n: int = 64, lr: float = 0.0) -> None:
        super().__init__()
        self.lin = nn.Linear(100, 100)
        self.x = torch.randn(n, 100)
        self.lr = lr

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return (self.lin(batch[0]) * 0.0).sum(1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x), batch_size=16)


class GradLog(Callback):
    def __init__(self) -> None:
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(torch.cat([p.grad.flatten() for p in pl_module.parameters()]).clone())


@pytest.mark.parametrize("physical_batch_size", [32, 2])
def test_noise_std_is_sigma_c_over_b_and_drawn_once(physical_batch_size: int) -> None:
    """Reference: noise std sigma*C/B per coordinate, whatever the number of physical batches per step."""
    sigma, c, b = 2.0, 0.5, 16
    privacy = dpz.PrivacyConfig(
        noise_multiplier=sigma, clip_norm=c, expected_batch_size=b, physical_batch_size=physical_batch_size, seed=7
    )
    log = GradLog()
    _trainer(privacy, 4, [log]).fit(ZeroGrad())
    noise = torch.stack(log.grads)  # [steps, 10100]
    expected = sigma * c / b
    n = noise.numel()
    # sample std of n normals: relative standard error 1/sqrt(2n); allow 6 standard errors
    bound = 6.0 / math.sqrt(2 * n)
    rel = noise.std().item() / expected - 1.0
    print(f"std rel. error {rel:.4f}, bound {bound:.4f}")
    assert abs(rel) < bound
    assert abs(noise.mean().item()) < 6 * expected / math.sqrt(n)
    # fresh noise every step: consecutive steps uncorrelated
    corr = torch.corrcoef(noise[:2])[0, 1].item()
    assert abs(corr) < 6 / math.sqrt(noise.shape[1])


def test_epsilon_matches_dp_accounting_and_budget_stops() -> None:
    """Reference: dp-accounting on the recorded history; the run stops before epsilon would pass max_epsilon."""
    privacy = dpz.PrivacyConfig(noise_multiplier=0.8, expected_batch_size=16, physical_batch_size=16, seed=0)
    budget = dpz.PrivacyBudget(max_epsilon=2.0)
    trainer = _trainer(privacy, 500, [budget])
    task = Task(n=64)
    trainer.fit(task)
    dp = trainer.strategy.dp
    steps = dp.ledger.accountant.steps
    assert 0 < steps < 500
    assert trainer.global_step == steps
    q = 16 / 64
    direct = epsilon_for([(0.8, q, steps)], delta=dp.delta, accountant=dpz.Accountant.RDP)
    assert dp.epsilon() == pytest.approx(direct, rel=1e-12)
    assert dp.epsilon() <= 2.0
    assert epsilon_for([(0.8, q, steps + 1)], delta=dp.delta, accountant=dpz.Accountant.RDP) > 2.0
    assert trainer.callback_metrics["epsilon"].item() == pytest.approx(dp.epsilon(), rel=1e-5)


def test_calibrated_sigma_reaches_target() -> None:
    """Reference: after max_steps, epsilon is at most the target and within 1% of it."""
    privacy = dpz.PrivacyConfig(target_epsilon=4.0, expected_batch_size=8, physical_batch_size=8, seed=0)
    trainer = _trainer(privacy, 15, [dpz.PrivacyBudget()])
    trainer.fit(Task())
    eps = trainer.strategy.dp.epsilon()
    assert trainer.global_step == 15
    assert 0.99 * 4.0 <= eps <= 4.0


def test_seeded_resume_is_bit_identical_and_the_checkpoint_holds_no_stream_state(tmp_path) -> None:
    """Reference: the same seeded run without interruption. The checkpoint holds the public ledger only (no seed,
    no generator state); the seed rebuilds the key, and the counters (steps, draws) continue the streams."""
    privacy = dpz.PrivacyConfig(noise_multiplier=1.0, expected_batch_size=8, physical_batch_size=8, seed=5)
    torch.manual_seed(0)
    uninterrupted = Task()
    _trainer(privacy, 7).fit(uninterrupted)

    torch.manual_seed(0)
    first = _trainer(privacy, 4)
    first.fit(Task())
    path = tmp_path / "dp.ckpt"
    first.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["lightning_dpzero"]["ranks"][0]
    assert saved["accountant"]["history"] == [[1.0, 0.2, 4]]
    assert set(saved) == {
        "noise_multiplier", "sample_rate", "clip_norm", "dataset_size", "calibrated_steps", "calibrated_epsilon",
        "epsilon_limit", "accountant", "sample_position",
    }  # fmt: skip

    second = _trainer(privacy, 7)
    resumed = Task()
    second.fit(resumed, ckpt_path=path)
    assert second.strategy.dp.ledger.accountant.history == [(1.0, 0.2, 7)]
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_resume_with_more_steps_never_exceeds_the_calibrated_budget(tmp_path) -> None:
    """Reference: dp-accounting; sigma calibrated for 6 steps, resumed with max_steps=30, stops at epsilon <= target."""
    privacy = dpz.PrivacyConfig(target_epsilon=2.0, expected_batch_size=8, physical_batch_size=8, seed=2)
    first = _trainer(privacy, 6)
    first.fit(Task())
    sigma = first.strategy.dp.ledger.noise_multiplier
    second = _trainer(privacy, 3)  # a shorter run, checkpointed before the planned 6 steps
    second.fit(Task())
    assert second.strategy.dp.ledger.noise_multiplier != sigma  # calibrated for 3 steps: less noise per step
    second.save_checkpoint(tmp_path / "short.ckpt")
    resumed = _trainer(privacy, 30)
    with pytest.warns(UserWarning, match="calibrated for 3 logical steps"):
        resumed.fit(Task(), ckpt_path=tmp_path / "short.ckpt")
    dp = resumed.strategy.dp
    assert dp.ledger.accountant.steps == 3  # one more step at this sigma would pass epsilon = 2
    assert dp.epsilon() <= 2.0
    steps_past = [(dp.ledger.noise_multiplier, 0.2, dp.ledger.accountant.steps + 1)]
    assert epsilon_for(steps_past, delta=dp.delta, accountant=dpz.Accountant.RDP) > 2.0


def test_resume_without_dp_state_is_refused(tmp_path) -> None:
    """Reference: a non-DP checkpoint would restart epsilon at zero."""
    plain = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    plain.fit(Task(loss_kind="scalar"))
    path = tmp_path / "plain.ckpt"
    plain.save_checkpoint(path)
    with pytest.raises(ValueError, match="no DP state"):
        _trainer(dpz.PrivacyConfig(noise_multiplier=1.0), 4).fit(Task(), ckpt_path=path)


def test_changed_clip_norm_on_resume_is_refused(tmp_path) -> None:
    """Reference: C is part of the accounted mechanism."""
    first = _trainer(dpz.PrivacyConfig(noise_multiplier=1.0, clip_norm=1.0), 2)
    first.fit(Task())
    first.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="clip_norm"):
        _trainer(dpz.PrivacyConfig(noise_multiplier=1.0, clip_norm=2.0), 4).fit(Task(), ckpt_path=tmp_path / "a.ckpt")


class BatchNormTask(Task):
    def __init__(self) -> None:
        super().__init__()
        self.net.gn = nn.BatchNorm2d(4)


class WeightedSamplerTask(Task):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.data), batch_size=8, sampler=WeightedRandomSampler([1.0] * 40, 40))


@pytest.mark.parametrize(
    ("task", "kwargs", "match"),
    [
        (BatchNormTask, {}, r"'net\.gn' \(BatchNorm2d\).*GroupNorm"),
        (WeightedSamplerTask, {}, "WeightedRandomSampler"),
        (Task, {"accumulate_grad_batches": 2}, "accumulate_grad_batches"),
    ],
)
def test_bad_input_is_refused(task, kwargs, match) -> None:
    """Reference: each input that would weaken or void the guarantee raises a clear error."""
    with pytest.raises((ValueError, TypeError), match=match):
        _trainer(dpz.PrivacyConfig(noise_multiplier=1.0), 2, **kwargs).fit(task())


def test_unreachable_budget_is_refused() -> None:
    """Reference: an epsilon too small for the planned steps raises with the numbers."""
    privacy = dpz.PrivacyConfig(target_epsilon=1e-4, delta=1e-8, expected_batch_size=40, physical_batch_size=8)
    with pytest.raises(ValueError, match="cannot be reached"):
        _trainer(privacy, 100).fit(Task())


def test_registered_name_and_default_privacy() -> None:
    """Reference: Trainer(strategy='dp') builds the DP strategy with safe defaults (target epsilon, 1/N^1.1)."""
    trainer = L.Trainer(strategy="dp", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, dpz.DPStrategy)
    trainer.fit(Task())
    dp = trainer.strategy.dp
    assert dp.config.target_epsilon == 8.0 and dp.config.noise_multiplier is None
    assert dp.delta == pytest.approx(40**-1.1)
    assert dp.epsilon() <= 8.0


class _HookLog:
    """What each batch hook saw: (hook, owner, type of the batch, its number of rows)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, int]] = []

    def record(self, hook: str, owner: str, batch) -> None:
        rows = batch[0].shape[0] if isinstance(batch, (list, tuple)) else -1
        self.calls.append((hook, owner, type(batch).__name__, rows))


class HookTask(Task):
    def __init__(self, log: _HookLog) -> None:
        super().__init__()
        self.hook_log = log

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.hook_log.record("on_before_batch_transfer", "module", batch)
        return batch

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        self.hook_log.record("transfer_batch_to_device", "module", batch)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.hook_log.record("on_after_batch_transfer", "module", batch)
        return batch


class HookData(L.LightningDataModule):
    def __init__(self, task: Task, log: _HookLog) -> None:
        super().__init__()
        self.task, self.hook_log = task, log

    def train_dataloader(self) -> DataLoader:
        return self.task.train_dataloader()

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.hook_log.record("on_before_batch_transfer", "datamodule", batch)
        return batch


@pytest.mark.parametrize("with_datamodule", [False, True])
def test_batch_hooks_see_each_physical_batch_once_through_lightnings_routing(with_datamodule: bool) -> None:
    """Reference: Lightning's hook routing (a DataModule's on_before_batch_transfer replaces the module's); each of
    the three batch hooks sees every physical batch exactly once, never the LogicalBatch that holds them."""
    log = _HookLog()
    task = HookTask(log)
    privacy = dpz.PrivacyConfig(
        noise_multiplier=1.0, expected_batch_size=12, physical_batch_size=4, physical_batch_shapes="fixed"
    )
    physical = []

    class Count(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            log.calls.clear()  # the self-check (step 0) sends its own batches through the hooks too

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            physical.append((len(batch), list(log.calls)))

    trainer = _trainer(privacy, 3, [Count()])
    trainer.fit(task, datamodule=HookData(task, log) if with_datamodule else None)
    before_owner = "datamodule" if with_datamodule else "module"
    for count, calls in physical[1:]:
        assert {c[2] for c in calls} == {"list"}, calls  # never a LogicalBatch
        assert all(c[3] == 4 for c in calls)  # physical batches of p = 4 rows
        hooks = [(c[0], c[1]) for c in calls]
        assert hooks.count(("on_before_batch_transfer", before_owner)) == count
        assert ("on_before_batch_transfer", "module") not in hooks or not with_datamodule
        assert hooks.count(("transfer_batch_to_device", "module")) == count
        assert hooks.count(("on_after_batch_transfer", "module")) == count
