"""Activation checkpointing under per-example clipping.

Non-reentrant checkpointing (``torch.utils.checkpoint(..., use_reentrant=False)``, and what transformers'
``gradient_checkpointing_enable()`` uses by default) recomputes the checkpointed forward inside the engine's own
backward, through saved-tensor hooks: the taps recorded in the first forward stay in the graph, so the clipped sums
are those of the model without checkpointing. Reentrant checkpointing runs the block without gradients and
differentiates the recomputation in a nested backward the engine cannot take part in: it is refused, naming
checkpointing and the fix, whether or not the block's input requires a gradient.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

import lightning_dpzero as dpz
from lightning_dpzero.clipping import ClippingEngine
from lightning_dpzero.config import PrivacyConfig
from tests.reference import reference_clipped_sum

C = 0.1  # every example is clipped


class Net(nn.Module):
    """A tied-free MLP whose middle block (or, with ``first=True``, its first layer too) is checkpointed."""

    def __init__(self, mode: str = "off", first: bool = False) -> None:
        super().__init__()
        self.mode, self.first = mode, first
        self.a = nn.Linear(5, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def _run(self, fn, x: Tensor) -> Tensor:
        if self.mode == "off":
            return fn(x)
        return checkpoint(fn, x, use_reentrant=self.mode == "reentrant")

    def forward(self, x: Tensor) -> Tensor:
        h = self._run(self.a, x) if self.first else self.a(x)
        return self.head(self._run(self.block, torch.tanh(h)))


def loss_fn(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    x, y = inputs
    return F.cross_entropy(model(x), y, reduction="none")


def _engine_sums(model: nn.Module, inputs: tuple[Tensor, ...], style: str) -> dict[str, Tensor]:
    mask = torch.ones(inputs[0].shape[0], dtype=torch.bool)
    engine = ClippingEngine(
        model, PrivacyConfig(noise_multiplier=1.0, clip_norm=C, clipping_function="abadi", clipping_style=style)
    )
    engine.attach()
    with engine.recording(torch.device("cpu"), rows=mask.numel()):
        loss = loss_fn(model, inputs).sum()
    engine.backward(loss, mask)
    engine.detach()
    return engine.pop_summed()


@pytest.mark.parametrize("style", ["all-layer", "layer-wise", "param-wise"])
@pytest.mark.parametrize("first", [False, True], ids=["middle block", "first layer too"])
def test_non_reentrant_checkpointing_matches_the_reference(style: str, first: bool) -> None:
    """Reference: tests/reference.py on the model without checkpointing (float64, one example at a time); the
    checkpointed model's clipped sums match it and equal the unchecked model's sums to fp32 rounding."""
    torch.manual_seed(0)
    inputs = (torch.randn(6, 5), torch.randint(0, 3, (6,)))
    plain, checkpointed = Net("off"), Net("non-reentrant", first=first)
    checkpointed.load_state_dict(plain.state_dict())
    got = _engine_sums(checkpointed, inputs, style)
    unchecked = _engine_sums(plain.train(), inputs, style)
    expected = reference_clipped_sum(
        plain, loss_fn, inputs, torch.ones(6, dtype=torch.bool), clip_norm=C, style=style, function="abadi"
    )
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(got[name], unchecked[name], rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize("first", [False, True], ids=["input requires grad", "input does not"])
def test_reentrant_checkpointing_is_refused_naming_checkpointing(first: bool) -> None:
    """Reference: a block whose input requires a gradient fails in torch's own check (``.grad()`` through a reentrant
    checkpoint); a first layer whose input does not gets no gradient at all. Both end in a message that names
    reentrant checkpointing and use_reentrant=False, raised before any update."""
    torch.manual_seed(0)
    task = Task(Net("reentrant", first=first))
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    with pytest.raises(RuntimeError, match=r"reentrant activation checkpointing.*use_reentrant=False"):
        _trainer(1, seed=0).fit(task)
    for name, p in task.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


class Task(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g)
        self.rows = list(zip(x, y))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return loss_fn(self.net, tuple(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=8)


def _trainer(steps: int, seed: int) -> L.Trainer:
    privacy = dpz.PrivacyConfig(
        noise_multiplier=1.0, clip_norm=C, expected_batch_size=12, physical_batch_size=5, seed=seed
    )
    return L.Trainer(
        strategy=dpz.DPStrategy(privacy),
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_a_checkpointed_model_trains_as_the_plain_one_under_dp() -> None:
    """Reference: the same run (same privacy seed: same Poisson samples and noise) without checkpointing; after three
    noisy steps, with the per-example self-check on the first, the parameters agree to fp32 rounding."""
    torch.manual_seed(0)
    plain = Task(Net("off"))
    checkpointed = Task(Net("non-reentrant", first=True))
    checkpointed.load_state_dict(plain.state_dict())
    for task in (plain, checkpointed):
        _trainer(3, seed=7).fit(task)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)


def test_transformers_gradient_checkpointing_matches_the_reference() -> None:
    """Reference: tests/reference.py on the same GPT-2 without checkpointing; ``gradient_checkpointing_enable()``
    (transformers' default, non-reentrant) checkpoints every block, and the clipped sums match."""
    transformers = pytest.importorskip("transformers", reason="needs the `hf` extra")
    from tests.clipping.test_transformers import MODELS

    build, lm_loss, data = MODELS["gpt2"]
    torch.manual_seed(0)
    plain = build()
    model = build()
    model.load_state_dict(plain.state_dict())
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    assert model.transformer.gradient_checkpointing
    inputs = data(4)
    mask = torch.ones(4, dtype=torch.bool)
    engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=C, clipping_function="abadi"))
    engine.attach()
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.utils.checkpoint, "checkpoint", counted)
        patch.setattr(transformers.modeling_utils, "checkpoint", counted, raising=False)
        enable()  # again, so that the layers hold the counting function
        with engine.recording(torch.device("cpu"), rows=4):
            loss = lm_loss(model, inputs).sum()
        engine.backward(loss, mask)
    assert calls and all(c is False for c in calls), calls
    got = engine.pop_summed()
    expected = reference_clipped_sum(plain, lm_loss, inputs, mask, clip_norm=C, style="all-layer", function="abadi")
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=1e-6 * C, msg=name)
