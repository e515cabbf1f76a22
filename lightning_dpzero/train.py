"""Hydra entry point: ``python -m lightning_dpzero.train [overrides]``.

    python -m lightning_dpzero.train                                  # private GPT on the embedded corpus, eps 8
    python -m lightning_dpzero.train privacy=eps3 trainer.max_steps=300
    python -m lightning_dpzero.train strategy=nonprivate              # the same run without privacy
    python -m lightning_dpzero.train --multirun privacy.target_epsilon=1,3,8

Each run prints one summary line and writes ``summary.json`` (final metric, epsilon, delta, sigma) in its output
directory; the function returns the optimized metric for Hydra sweepers.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_dpzero.callbacks import PrivacyBudget
from lightning_dpzero.step import DPStep


def run(cfg: DictConfig, root_dir: str | Path | None = None) -> dict[str, Any]:
    """Train and validate one configuration, writing logs under ``root_dir``; returns the summary."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.task.data)
    model = instantiate(cfg.task.model)
    strategy_cls = hydra.utils.get_class(cfg.strategy._target_)
    private = "privacy" in inspect.signature(strategy_cls).parameters
    # PrivacyConfig is passed after instantiation: OmegaConf cannot merge a dataclass with union-typed fields.
    strategy = instantiate(cfg.strategy, _partial_=True)(**({"privacy": instantiate(cfg.privacy)} if private else {}))
    callbacks = [PrivacyBudget()] if private else []
    trainer: L.Trainer = instantiate(
        cfg.trainer, strategy=strategy, callbacks=callbacks, default_root_dir=str(root_dir or Path.cwd())
    )
    trainer.fit(model, datamodule=datamodule)
    metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    summary: dict[str, Any] = {
        "metric": cfg.optimized_metric,
        "value": float(metrics[cfg.optimized_metric]),
        "steps": trainer.global_step,
        "private": private,
    }
    dp = getattr(trainer.strategy, "dp", None)
    if isinstance(dp, DPStep):
        summary.update(epsilon=dp.epsilon(), delta=dp.delta, noise_multiplier=dp.noise_multiplier)
    return summary


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    out = Path(HydraConfig.get().runtime.output_dir)
    summary = run(cfg, root_dir=out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    privacy = (
        f"epsilon={summary['epsilon']:.3f} delta={summary['delta']:.2e} sigma={summary['noise_multiplier']:.3f}"
        if summary["private"]
        else "non-private"
    )
    print(f"[lightning_dpzero] {summary['metric']}={summary['value']:.4f} after {summary['steps']} steps, {privacy}")
    value = summary["value"]
    return value if math.isfinite(value) else float("inf")


if __name__ == "__main__":
    main()
