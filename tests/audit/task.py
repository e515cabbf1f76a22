"""A tiny regression task for the audit tests: per-example squared errors of a small MLP on random data."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class TinyRegression(L.LightningModule):
    def __init__(self, n: int = 200, lr: float = 0.05) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 8, generator=g)
        self.data = TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return (self.net(x) - y).pow(2).squeeze(-1)  # [p]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self, batch_size: int = 30) -> DataLoader:
        return DataLoader(self.data, batch_size=batch_size, shuffle=True)
