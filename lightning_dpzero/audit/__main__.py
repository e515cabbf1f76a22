"""Hydra entry point: ``python -m lightning_dpzero.audit [overrides]`` audits one task/strategy/privacy setting.

    python -m lightning_dpzero.audit                                   # gpt_tiny, dp, eps8 (configs/audit.yaml)
    python -m lightning_dpzero.audit privacy=eps3 trainer.max_steps=100 audit.num_canaries=2000
    python -m lightning_dpzero.audit strategy=dp_zero3 trainer.devices=2 hydra.run.dir=outputs/audit_zero3

The overrides are those of ``python -m lightning_dpzero.train`` (groups ``task``, ``strategy``, ``privacy``,
``precision``, ``trainer``) plus ``audit.*`` (``configs/audit.yaml``). Prints the claimed epsilon (the library's
accountant, for the run's delta), the empirical lower bound and the confidence; writes ``audit.json`` and
``canary_scores.png`` (score distributions of included and excluded canaries) in the run directory.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_dpzero.audit.canaries import AuditConfig
from lightning_dpzero.audit.runner import AuditResult, plot_scores, run_audit
from lightning_dpzero.train import redact_hydra_outputs, redact_privacy_seed


def audit_from_config(cfg: DictConfig) -> tuple[AuditResult, L.Trainer]:
    """Build the run of ``cfg`` (as ``lightning_dpzero.train`` would) and audit it.

    Args:
        cfg: the composed ``audit`` config: the ``train`` groups plus ``audit``.
    Returns:
        The audit result and the Trainer that ran it.
    Raises:
        ValueError: the strategy is not private.
    """
    L.seed_everything(cfg.seed, workers=True)
    strategy_cls = hydra.utils.get_class(cfg.strategy._target_)
    if "privacy" not in inspect.signature(strategy_cls).parameters:
        raise ValueError(
            f"lightning_dpzero.audit: strategy {cfg.strategy._target_} is not private; there is no claim to audit. "
            "Choose strategy=dp, dp_ddp, dp_zero1/2/3 or dp_fsdp."
        )
    strategy = instantiate(cfg.strategy, _partial_=True)(privacy=instantiate(cfg.privacy))
    plugins = [instantiate(cfg.precision)] if cfg.get("precision") else []
    datamodule = instantiate(cfg.task.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.task.model)
    # Training only: no validation, checkpoints or loggers (the audit run is not the user's model).
    keep = [k for k in cfg.trainer if k not in ("logger", "val_check_interval", "check_val_every_n_epoch")]
    trainer: L.Trainer = instantiate(
        OmegaConf.masked_copy(cfg.trainer, keep),
        strategy=strategy,
        plugins=plugins,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    config = AuditConfig(**OmegaConf.to_container(cfg.audit, resolve=True))  # type: ignore[arg-type]
    return run_audit(model, datamodule.train_dataloader(), trainer=trainer, config=config), trainer


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "configs"), config_name="audit")
def main(cfg: DictConfig) -> float:
    """Run the audit; on rank 0 print the result and write ``audit.json`` and ``canary_scores.png``."""
    out = Path(HydraConfig.get().runtime.output_dir)
    redact_hydra_outputs(out, HydraConfig.get())  # no privacy.seed in what Hydra wrote
    result, trainer = audit_from_config(cfg)
    if trainer.global_rank == 0:
        summary: dict[str, Any] = result.summary()
        summary["overrides"] = [redact_privacy_seed(o) for o in HydraConfig.get().overrides.task]
        (out / "audit.json").write_text(json.dumps(summary, indent=2, default=float))
        written = ["audit.json"]
        try:
            plot_scores(result, out / "canary_scores.png")
            written.append("canary_scores.png")
        except ImportError:
            print("[lightning_dpzero.audit] matplotlib is not installed; skipping canary_scores.png")
        print(result.summary_line())
        print(f"[lightning_dpzero.audit] wrote {', '.join(written)} in {out}")
    return result.epsilon_lower_bound


if __name__ == "__main__":
    main()
