"""Zeroth-order DP under the single-device strategy ``"dp"``, against the float64 oracle of ``reference.py``."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import lightning_dpzero as dpz
from lightning_dpzero.config import _ZERO_NOISE_ENV, PrivacyConfig, PruneSelection, ZerothOrderConfig
from lightning_dpzero.strategies.reducers import LocalReducer
from lightning_dpzero.zeroth_order import StageSchedule, ZOStep
from lightning_dpzero.zeroth_order.pruning import select_coordinates, synflow_scores
from tests.zeroth_order.reference import reference_differences, reference_directions, reference_update


@pytest.fixture
def zero_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_ZERO_NOISE_ENV, "1")


class Net(nn.Module):
    """Embedding -> LayerNorm -> Linear on [n, T, D] -> mean -> Linear, with a Dropout that ZO switches off."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.fc(self.ln(self.emb(tokens))))  # [n, T, 6]
        return self.head(self.drop(h.mean(1)))  # [n, 3]


class Task(L.LightningModule):
    def __init__(self, n: int = 24, dtype: torch.dtype = torch.float64, lr: float = 0.3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.data = (torch.randint(0, 10, (n, 4), generator=g), torch.randint(0, 3, (n,), generator=g))
        torch.manual_seed(1)
        self.net = Net().to(dtype)
        self.lr = lr
        self.example_input_array = self.data[0][:1]

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        tokens, y = batch
        losses = F.cross_entropy(self.net(tokens), y, reduction="none")
        return {"loss": losses.mean(), "per_example_loss": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.data), batch_size=8)


def net_loss(net: nn.Module):
    """Per-example losses of ``net`` at given parameter values (out of place), for the oracle."""

    def loss(values: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        tokens, y = batch
        return F.cross_entropy(functional_call(net.eval(), values, (tokens,)), y, reduction="none")

    return loss


class Record(Callback):
    """Parameters before and after each logical step, and the step's physical batches and masks."""

    def __init__(self) -> None:
        self.before, self.after, self.batches = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})
        self.batches.append((batch.physical_batches, batch.masks))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})


def _fit(task: Task, privacy: PrivacyConfig, steps: int, callbacks: list | None = None) -> L.Trainer:
    trainer = L.Trainer(
        strategy=dpz.DPStrategy(privacy),
        max_steps=steps,
        callbacks=callbacks or [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task)
    return trainer


def _zo_privacy(clip_norm: float = 0.4, sigma: float = 0.0, **zo: object) -> PrivacyConfig:
    return PrivacyConfig(
        noise_multiplier=sigma,
        clip_norm=clip_norm,
        clipping_function="abadi",
        expected_batch_size=8,
        physical_batch_size=3,
        seed=7,
        method="zeroth_order",
        zeroth_order=ZerothOrderConfig(**zo),
    )


def test_updates_match_float64_reference_across_stages(zero_noise: None) -> None:
    """Reference: reference.py (each example alone, theta +- beta z out of place, joint Abadi clipping of the P = 2
    differences, sum / B, update with the proximal pull to the stage's starting weights); 2 stages (T0 = 1: steps 0 |
    1, 2), beta, eta and lambda per stage, padded physical batches."""
    zo = dict(
        num_directions=2,
        num_stages=2,
        stage_length=1,
        perturbation_scale=(1e-3, 5e-4),
        learning_rate=(0.2, 0.1),
        proximal_weight=(0.5, 0.3),
    )
    task, record = Task(), Record()
    trainer = _fit(task, _zo_privacy(clip_norm=2.0, **zo), 3, [record])
    dp = trainer.strategy.dp
    assert isinstance(dp, ZOStep) and dp.ledger.accountant.steps == 3
    loss = net_loss(task.net)
    clipped = unclipped = 0
    anchor = None
    for step in range(3):
        beta, lr, lam = zo["perturbation_scale"][min(step, 1)], zo["learning_rate"][min(step, 1)], None
        lam = zo["proximal_weight"][min(step, 1)]
        theta = record.before[step]
        if step in (0, 1):  # the first step of each stage: the anchor is that stage's starting weights
            anchor = {n: v.clone() for n, v in theta.items()}
        z = reference_directions(theta, dp.directions, step=step, num_directions=2, name_prefix="net.")
        batches, masks = record.batches[step]
        diffs = reference_differences(theta, z, batches, masks, beta=beta, loss_fn=loss)
        norms = diffs.norm(dim=1)
        clipped, unclipped = clipped + int((norms > 2.0).sum()), unclipped + int((norms <= 2.0).sum())
        expected, _ = reference_update(
            theta, z, diffs, clip_norm=2.0, expected_batch_size=8.0, lr=lr, lam=lam, anchor=anchor
        )
        for name, value in expected.items():
            torch.testing.assert_close(record.after[step][name], value, rtol=1e-9, atol=1e-12, msg=name)
        assert any(not torch.equal(record.after[step][n], theta[n]) for n in theta)
    assert clipped > 0 and unclipped > 0, (clipped, unclipped)  # both branches of the clipping were exercised


def test_joint_clipping_of_directions() -> None:
    """Reference: sum_i d_i min(1, C / ||d_i||) over real finite rows (an example's P differences clipped as one
    vector), which differs from clipping each direction separately; padded and non-finite rows add exactly 0."""
    step = ZOStep(_zo_privacy(sigma=1.0, num_directions=3))
    diffs = torch.tensor(
        [[3.0, 4.0, 0.0], [0.1, -0.2, 0.2], [float("nan"), 1.0, 1.0], [5.0, 5.0, 5.0], [-1.0, 0.0, 2.0]],
        dtype=torch.float64,
    )
    mask = torch.tensor([1, 1, 1, 0, 1])
    step.add_differences(diffs, mask)
    c = 0.4
    expected = sum(diffs[i] * min(1.0, c / diffs[i].norm().item()) for i in (0, 1, 4))
    torch.testing.assert_close(step._sums, expected, rtol=1e-15, atol=0)
    per_direction = sum(diffs[i].clamp(-c, c) for i in (0, 1, 4))
    assert not torch.allclose(step._sums, per_direction)
    assert step.non_finite_examples == 1
    raising = ZOStep(_zo_privacy(sigma=1.0).replace(non_finite="raise"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        raising.add_differences(diffs[:, :1], mask)


def test_stage_schedule() -> None:
    """Reference: stage s covers [T0 (2^s - 1), T0 (2^(s+1) - 1)), the last stage until the end; per-stage values."""
    cfg = ZerothOrderConfig(
        num_stages=3, stage_length=2, perturbation_scale=(1e-2, 1e-3, 1e-4), learning_rate=(0.4, 0.2, 0.1)
    )
    schedule = StageSchedule(cfg)
    stages = [schedule.at(t) for t in range(20)]
    assert [s.index for s in stages] == [0, 0, 1, 1, 1, 1] + [2] * 14
    assert [s.first_step for s in stages[:7]] == [0, 0, 2, 2, 2, 2, 6]
    assert [s.perturbation_scale for s in stages[:7]] == [1e-2, 1e-2, 1e-3, 1e-3, 1e-3, 1e-3, 1e-4]
    assert [s.learning_rate for s in stages[:7]] == [0.4, 0.4, 0.2, 0.2, 0.2, 0.2, 0.1]
    constant = StageSchedule(ZerothOrderConfig(perturbation_scale=3e-3))  # DPZero: one stage forever
    assert {constant.at(t) for t in (0, 5, 10**6)} == {constant.at(0)} and constant.at(7).proximal_weight == 0.0
    with pytest.raises(ValueError, match="stage_length"):
        ZerothOrderConfig(num_stages=2)
    with pytest.raises(ValueError, match="one per stage"):
        ZerothOrderConfig(num_stages=2, stage_length=3, learning_rate=(0.1, 0.2, 0.3))


def test_proximal_anchor_is_a_copy(zero_noise: None) -> None:
    """Reference: with lambda > 0 the anchor keeps the stage's starting values while the live weights move (the
    public DP-ZOSO code aliases it to the live weights, making the proximal term identically 0)."""
    task = Task()
    trainer = _fit(task, _zo_privacy(learning_rate=0.2, proximal_weight=0.5), 2)
    dp = trainer.strategy.dp
    for name, param in dp.params.items():
        assert dp._anchor[name].data_ptr() != param.data_ptr()
    assert any(not torch.equal(dp._anchor[n], p.detach().flatten()) for n, p in dp.params.items())


def _bits(t: Tensor) -> Tensor:
    return t.detach().contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64).clone()


def test_parameters_restored_bit_exactly_tied_weights() -> None:
    """Reference: after the +- perturbations of a physical batch (P = 3, fp32, a GPT with tied input/output
    embeddings), every parameter is bit-for-bit what it was; the forward passes did see perturbed weights."""
    from lightning_dpzero.tasks.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=15, block_size=8, n_layer=1, n_head=2, n_embd=16))
    step = ZOStep(_zo_privacy(sigma=1.0, num_directions=3, perturbation_scale=1e-2))
    step.attach(model)
    step.ledger.accountant = dpz.PrivacyAccountant("rdp", delta=1e-5)
    before = {n: _bits(p) for n, p in model.named_parameters()}
    tokens = torch.randint(0, 15, (4, 8), generator=torch.Generator().manual_seed(1))

    def forward() -> Tensor:
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)

    step.forward_differences(forward, torch.ones(4))
    for name, param in model.named_parameters():
        assert torch.equal(_bits(param), before[name]), name
    assert bool((step._sums != 0).all())  # the perturbations changed the losses
    assert step.perturber.seen == set(step.params)  # the tied weight was perturbed (once per module call)

    def failing() -> Tensor:
        model(tokens[:, :-1])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        step.forward_differences(failing, torch.ones(4))
    for name, param in model.named_parameters():
        assert torch.equal(_bits(param), before[name]), name


def _reference_synflow(net: nn.Module, example: Tensor) -> dict[str, Tensor]:
    import copy

    model = copy.deepcopy(net).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    out = model(torch.ones_like(example)).sum()
    names = [n for n, p in model.named_parameters()]
    grads = torch.autograd.grad(out, [p for p in model.parameters()], allow_unused=True)
    return {
        n: (p.detach() * (torch.zeros_like(p) if g is None else g)).abs()
        for n, p, g in zip(names, model.parameters(), grads)
    }


@pytest.mark.parametrize("select", list(PruneSelection))
def test_synflow_selection_matches_reference(select: PruneSelection) -> None:
    """Reference: SynFlow |theta dR/dtheta| on a float64 deep copy with |theta|, R = sum of outputs on all ones; the
    kept set is the 10% lowest / highest scores globally (ties by position); the model is bit-for-bit unchanged."""
    task = Task(dtype=torch.float32)
    before = {n: _bits(p) for n, p in task.named_parameters()}
    params = dict(task.named_parameters())
    scores = synflow_scores(task, task.example_input_array, params)
    for name, p in task.named_parameters():
        assert torch.equal(_bits(p), before[name]) and p.dtype == torch.float32
    expected = _reference_synflow(task.net, task.example_input_array)
    for name in params:
        torch.testing.assert_close(scores[name], expected[name.removeprefix("net.")], rtol=1e-12, atol=0)
    kept = select_coordinates(scores, keep_fraction=0.1, select=select)
    flat = torch.cat([scores[n].flatten() for n in params])
    k = math.ceil(0.1 * flat.numel())
    order = sorted(
        range(flat.numel()), key=lambda i: (flat[i].item() if select is PruneSelection.LOWEST else -flat[i].item(), i)
    )
    chosen, offset, expected_kept = sorted(order[:k]), 0, {}
    for name in params:
        n = params[name].numel()
        expected_kept[name] = [i - offset for i in chosen if offset <= i < offset + n]
        offset += n
    assert {n: kept[n].tolist() for n in params} == expected_kept


def test_pruning_mask_restricts_perturbation_and_update(zero_noise: None) -> None:
    """Reference: with 10% of coordinates kept, the weights the forward passes see differ from theta only on the kept
    coordinates, the update changes only (and all of) them, and it matches reference.py with z on the kept set."""
    task, record = Task(), Record()
    seen: list[tuple[str, Tensor]] = []  # (parameter name, the value a forward pass saw)

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # registered after the ZO hooks: sees perturbed weights
            for prefix, module in pl_module.net.named_modules():
                for pname, _ in module.named_parameters(recurse=False):
                    name = f"{prefix}.{pname}" if prefix else pname
                    module.register_forward_pre_hook(
                        lambda m, a, name=name, pname=pname: (
                            None
                            if trainer.strategy.dp.ledger.self_check.running  # the self-check's forwards at theta
                            else seen.append((name, getattr(m, pname).detach().clone()))
                        )
                    )

    trainer = _fit(task, _zo_privacy(prune_keep_fraction=0.1, learning_rate=0.3), 1, [record, Spy()])
    dp = trainer.strategy.dp
    assert dp.num_trainable == math.ceil(0.1 * sum(p.numel() for p in task.parameters()))
    theta, after = record.before[0], record.after[0]
    kept = {n.removeprefix("net."): i for n, i in dp.kept.items()}
    for name, value in theta.items():
        changed = set(torch.nonzero((after[name] != value).flatten()).flatten().tolist())
        allowed = set(kept.get(name, torch.zeros(0, dtype=torch.long)).tolist())
        assert changed <= allowed and (changed == allowed or not allowed), name
    physical = len(record.batches[0][1])
    assert len(seen) == 2 * len(theta) * physical  # every parameter, at theta + beta z and theta - beta z
    for name, value in seen:
        moved = set(torch.nonzero((value != theta[name]).flatten()).flatten().tolist())
        assert moved == set(kept.get(name, torch.zeros(0, dtype=torch.long)).tolist()), name
    z = reference_directions(theta, dp.directions, step=0, num_directions=1, kept=kept, name_prefix="net.")
    diffs = reference_differences(theta, z, *record.batches[0], beta=1e-3, loss_fn=net_loss(task.net))
    expected, _ = reference_update(theta, z, diffs, clip_norm=0.4, expected_batch_size=8.0, lr=0.3)
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, rtol=1e-9, atol=1e-12, msg=name)


def test_noise_std_once_per_step() -> None:
    """Reference: with zero differences, g_j = noise / B has std sigma C / B whatever the number of physical batches
    (4 per step here); tolerance 5 standard errors of a sample std over 2 x 300 draws."""
    sigma, c, b = 2.0, 0.5, 8.0
    task = Task(dtype=torch.float32)
    step = ZOStep(_zo_privacy(clip_norm=c, sigma=sigma, num_directions=2, learning_rate=1e-12))
    step.ledger.bind_data(task.train_dataloader(), planned_steps=lambda n: None, owner="test")
    step.attach(task)
    draws, reducer = [], LocalReducer(torch.device("cpu"), "test")
    for _ in range(300):
        for _ in range(4):
            step.add_differences(torch.zeros(3, 2, dtype=torch.float64), torch.ones(3))
        step.perturber.seen.update(step.params)
        step.finish_step(None, reducer)
        draws.append(step.last_update["ghat"])
    g = torch.stack(draws).flatten()
    expected = sigma * c / b
    bound = 5 * expected / math.sqrt(2 * g.numel())
    print(f"std {g.std().item():.4f} vs {expected:.4f} +- {bound:.4f}")
    assert abs(g.std().item() - expected) < bound and abs(g.mean().item()) < 5 * expected / math.sqrt(g.numel())
    assert step.ledger.accountant.steps == 300


def test_refusals() -> None:
    """Reference: DESIGN.md section 6: what ZO cannot do is refused with the setting and the fix."""
    with pytest.raises(ValueError, match="all-layer"):
        PrivacyConfig(noise_multiplier=1.0, method="zeroth_order", clipping_style="layer-wise")
    with pytest.raises(ValueError, match="method='zeroth_order'"):
        PrivacyConfig(noise_multiplier=1.0, zeroth_order=ZerothOrderConfig())
    zo = PrivacyConfig(noise_multiplier=1.0, method="zeroth_order")
    with pytest.raises(ValueError, match="dp_ddp"):
        dpz.DPZeroStrategy(stage=2, privacy=zo)

    class ScalarLoss(Task):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]

    with pytest.raises(ValueError, match="per-example losses"):
        _fit(ScalarLoss(), zo.replace(physical_batch_size=4, expected_batch_size=8), 1)
    task = Task()
    task.example_input_array = None
    with pytest.raises(ValueError, match="example_input_array"):
        _fit(task, zo.replace(zeroth_order=ZerothOrderConfig(prune_keep_fraction=0.5)), 1)


def test_resume_continues_exactly(tmp_path) -> None:
    """Reference: an uninterrupted 4-step run (fixed seed). A run checkpointed after 2 steps and resumed to 4 ends
    with bit-identical weights: the pruning selection, the proximal anchor, the stage, the sampler and the noise
    stream all come back from the checkpoint (the selection is not recomputed on the trained weights)."""
    zo = dict(prune_keep_fraction=0.3, num_stages=2, stage_length=1, proximal_weight=(0.2, 0.1), learning_rate=0.3)
    privacy = _zo_privacy(sigma=0.7, **zo)
    straight = Task()
    _fit(straight, privacy, 4)
    first = Task()
    trainer = _fit(first, privacy, 2)
    trainer.save_checkpoint(tmp_path / "zo.ckpt")
    resumed = Task()
    second = L.Trainer(
        strategy=dpz.DPStrategy(privacy),
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    second.fit(resumed, ckpt_path=tmp_path / "zo.ckpt")
    assert second.strategy.dp.ledger.accountant.steps == 4
    kept = {n: i.tolist() for n, i in second.strategy.dp.kept.items()}
    assert kept == {n: i.tolist() for n, i in trainer.strategy.dp.kept.items()}
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_hydra_privacy_config() -> None:
    """Reference: configs/privacy/zo_eps8.yaml composes and instantiates a zeroth-order PrivacyConfig, and list
    overrides from the command line become per-stage tuples."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    root = Path(__file__).resolve().parents[2] / "configs"
    overrides = [
        "privacy=zo_eps8",
        "privacy.zeroth_order.num_stages=2",
        "privacy.zeroth_order.stage_length=5",
        "privacy.zeroth_order.learning_rate=[2e-3,1e-3]",
    ]
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        privacy = instantiate(compose(config_name="train", overrides=overrides).privacy)
    assert privacy.method is dpz.Method.ZEROTH_ORDER and privacy.clipping_function == "abadi"
    assert privacy.zeroth_order.learning_rate == (2e-3, 1e-3) and privacy.zeroth_order.stage_length == 5


def test_a_zeroth_order_run_names_its_method(zero_noise: None, capsys: pytest.CaptureFixture[str], caplog) -> None:
    """Reference: ZOStep.method_name; the start-of-run line describes what runs (not "DP-SGD ... clipping")."""
    import logging

    with caplog.at_level(logging.INFO):
        _fit(Task(), _zo_privacy(num_directions=2), 1)
    text = caplog.text + capsys.readouterr().err
    assert "DP zeroth-order (2 direction(s), 1 stage(s))" in text and "DP-SGD" not in text
    assert "abadi clipping of each example's finite differences" in text
