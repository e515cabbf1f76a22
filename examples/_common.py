"""What the task examples share: the private (or non-private) Trainer, the fit, the validation and the privacy line."""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L

import lightning_dpzero as dpz


def fit_and_validate(
    model: L.LightningModule, data: L.LightningDataModule, args: argparse.Namespace, **privacy: Any
) -> tuple[L.Trainer, dict[str, float], str]:
    """Train ``args.steps`` logical steps with ``dp`` (or without DP under ``--non-private``), then validate.

    Args:
        args: the script's ``epsilon``, ``clip_norm``, ``batch_size`` (the expected logical batch B),
            ``physical_batch_size``, ``steps``, ``accelerator``, ``non_private`` and ``privacy_seed`` (the DP noise
            and sampling; ``None``: a fresh secret key from the OS, so only ``--seed`` plus ``--privacy-seed``
            repeat a run bit for bit).
        **privacy: further ``PrivacyConfig`` settings (e.g. ``delta=1e-5``).
    Returns:
        The trainer, the validation metrics and "epsilon=... delta=..." (or "non-private").
    """
    extra: dict[str, Any] = {}
    if not args.non_private:
        config = dpz.PrivacyConfig(
            target_epsilon=args.epsilon,
            clip_norm=args.clip_norm,
            expected_batch_size=args.batch_size,
            physical_batch_size=args.physical_batch_size,
            seed=getattr(args, "privacy_seed", None),
            **privacy,
        )
        extra = {"strategy": dpz.DPStrategy(config), "callbacks": [dpz.PrivacyBudget()]}
    trainer = L.Trainer(
        accelerator=args.accelerator,
        max_steps=args.steps,
        val_check_interval=args.steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **extra,
    )
    trainer.fit(model, data)
    metrics = trainer.validate(model, data, verbose=False)[0]
    dp = getattr(trainer.strategy, "dp", None)
    privacy_text = "non-private" if dp is None else f"epsilon={dp.epsilon():.2f} delta={dp.delta:.1e}"
    return trainer, metrics, privacy_text
