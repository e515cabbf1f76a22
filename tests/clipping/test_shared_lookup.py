"""Positions looked up once for the whole batch without a batch dim, as nanoGPT does (``wpe(arange(T))`` -> [T, D],
added to the [n, T, D] token embeddings): each example gets its own gradient, checked against the float64
per-example reference; when T equals the physical batch size the lookup cannot be told from one index per example
and the per-example self-check refuses the run, naming the module."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_dpzero as dpz
from lightning_dpzero.clipping import ClippingEngine
from tests.clipping.test_engine import assert_matches
from tests.reference import reference_clipped_sum

V, D = 20, 8


class NanoGPT(nn.Module):
    """nanoGPT's embedding layout: tied head, positions from ``arange(t)`` without a batch dim."""

    def __init__(self, block_size: int = 16) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(block_size, D)
        self.ln, self.mlp = nn.LayerNorm(D), nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # shape (t)
        x = self.wte(idx) + self.wpe(pos)  # [n, t, D] + [t, D]
        return self.head(self.ln(torch.tanh(self.mlp(x))))


def lm_loss(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    (idx,) = inputs
    logits = model(idx)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), idx[:, 1:], reduction="none").mean(1)


@pytest.mark.parametrize("style", ["all-layer", "layer-wise", "param-wise"])
def test_positions_looked_up_once_get_per_example_gradients(style: str) -> None:
    """Reference: tests/reference.py (each example alone, float64, autograd, abadi clipping)."""
    torch.manual_seed(0)
    model, inputs = NanoGPT(), (torch.randint(0, V, (5, 7)),)
    mask = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)
    expected = reference_clipped_sum(model, lm_loss, inputs, mask, clip_norm=0.5, style=style, function="abadi")
    config = dpz.PrivacyConfig(noise_multiplier=1.0, clip_norm=0.5, clipping_style=style, clipping_function="abadi")
    engine = ClippingEngine(model, config)
    engine.attach()
    with engine.recording(torch.device("cpu"), rows=mask.numel()):  # as the strategies record: p rows
        loss = lm_loss(model, inputs).sum()
    engine.backward(loss, mask)
    assert_matches(engine.pop_summed(), expected, 0.5)


class Task(L.LightningModule):
    def __init__(self, length: int) -> None:
        super().__init__()
        self.net = NanoGPT(block_size=max(16, length))
        self.rows = list(torch.randint(0, V, (32, length), generator=torch.Generator().manual_seed(1)))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return lm_loss(self.net, (batch,))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=8)


def _fit(length: int, physical_batch_size: int = 4) -> L.Trainer:
    privacy = dpz.PrivacyConfig(noise_multiplier=1.0, expected_batch_size=8, physical_batch_size=physical_batch_size)
    trainer = L.Trainer(
        strategy=dpz.DPStrategy(privacy),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Task(length))
    return trainer


def test_nanogpt_trains_under_dp_with_no_change_to_the_model() -> None:
    """The per-example self-check (rows, losses, autograd's per-example norms) passes; two steps are accounted."""
    torch.manual_seed(0)
    assert _fit(length=7).strategy.dp.ledger.steps == 2


@pytest.mark.parametrize("p", [4, 16], ids=["p=T=4 (the check sees every row)", "p=T=16 (the check sees 8)"])
def test_positions_as_long_as_the_physical_batch_are_refused_naming_the_module(p: int) -> None:
    """T == p: [T, D] looks like one row per example; refused naming the module, also when the self-check runs on
    fewer rows than p (it decides as the run does, from p: no expansion, so its shapes do not fit)."""
    torch.manual_seed(0)
    with pytest.raises(dpz.PerExampleCheckError, match=r"module 'net.wpe'.*wpe\(pos.expand\(n, T\)\)"):
        _fit(length=p, physical_batch_size=p)
