"""Make an ordinary LightningModule differentially private with one line: the Trainer's ``strategy``.

    python examples/make_private.py                 # DP-SGD on CPU, sigma calibrated for epsilon = 8
    python examples/make_private.py --non-private   # the very same module and data, without privacy
    python examples/make_private.py --steps 100

``Classifier`` below is plain Lightning: no per-example loss, no sampler, no optimizer wrapper. ``strategy="dp"``
(one device; ``dp_ddp``, ``dp_zero1/2/3`` and ``dp_fsdp`` on several) replaces the shuffled batches by Poisson
samples, clips each example's gradient, adds Gaussian noise once per step and accounts (epsilon, delta). With
no ``PrivacyConfig`` it uses the safe defaults (``PrivacyConfig.default()``: target epsilon 8, delta = 1/N^1.1,
automatic clipping, the DataLoader's batch size as the expected batch size B).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dpzero  # noqa: F401  # registers the "dp*" strategy names with Lightning


class Classifier(L.LightningModule):
    """An ordinary two-layer classifier; nothing in it knows about privacy."""

    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 2, lr: float = 0.5) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # x [n, D], y [n]
        loss = F.cross_entropy(self.net(x), y)  # the batch mean, as usual
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def blobs(n: int, features: int = 16, seed: int = 0) -> TensorDataset:
    """Two Gaussian classes whose means differ along every feature: x [n, D], y [n]."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, features, generator=gen) + (2 * y[:, None] - 1) * 0.5
    return TensorDataset(x, y)


def main(argv: Sequence[str] | None = None) -> L.Trainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--non-private", action="store_true", help="train without DP, for comparison")
    parser.add_argument("--steps", type=int, default=200, help="logical steps (sigma is calibrated for them)")
    args = parser.parse_args(argv)

    L.seed_everything(0)
    train = DataLoader(blobs(4096), batch_size=128, shuffle=True)  # an ordinary shuffled loader
    val = DataLoader(blobs(1024, seed=1), batch_size=512)
    trainer = L.Trainer(
        strategy="auto" if args.non_private else "dp",  # <- the one line that makes training private
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    model = Classifier()
    trainer.fit(model, train, val)
    accuracy = trainer.validate(model, val, verbose=False)[0]["val_acc"]
    dp = getattr(trainer.strategy, "dp", None)
    privacy = "non-private" if dp is None else f"epsilon={dp.epsilon():.2f}, delta={dp.delta:.1e}"
    print(f"[make_private] val_acc={accuracy:.3f} after {trainer.global_step} steps, {privacy}")
    return trainer


if __name__ == "__main__":
    main()
