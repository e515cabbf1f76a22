"""Shared pieces of the task tests: tiny trainers and the zero-noise gradient capture for the float64 oracle."""

from __future__ import annotations

import copy

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

import lightning_dpzero as dpz


def trainer(private: bool, max_steps: int = 3, callbacks=(), **privacy) -> L.Trainer:
    """A quiet CPU trainer; ``private`` uses the ``dp`` strategy with sigma = 1, C = 1, B = 16, p = 8 unless given."""
    kwargs = {}
    if private:
        settings = {"noise_multiplier": 1.0, "clip_norm": 1.0, "expected_batch_size": 16, "physical_batch_size": 8}
        kwargs["strategy"] = dpz.DPStrategy(dpz.PrivacyConfig(**{**settings, **privacy}))
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        callbacks=list(callbacks),
        **kwargs,
    )


class Capture(Callback):
    """Records each logical batch, the network before the step, and the gradient handed to the optimizer."""

    def __init__(self, attribute: str) -> None:
        self.attribute = attribute
        self.batches, self.nets, self.grads = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch)
        self.nets.append(copy.deepcopy(getattr(pl_module, self.attribute)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        net = getattr(pl_module, self.attribute)
        self.grads.append({n: p.grad.detach().clone() for n, p in net.named_parameters()})


def parameters_changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    """Whether any trainable parameter moved away from ``before`` (a state copy)."""
    return any(not torch.equal(before[n], p.detach()) for n, p in module.named_parameters() if p.requires_grad)
