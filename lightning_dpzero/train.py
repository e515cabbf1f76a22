"""Hydra entry point: ``python -m lightning_dpzero.train [overrides]``.

    python -m lightning_dpzero.train                                  # private GPT on the embedded corpus, eps 8
    python -m lightning_dpzero.train privacy=eps3 trainer.max_steps=300
    python -m lightning_dpzero.train strategy=nonprivate              # the same run without privacy
    python -m lightning_dpzero.train strategy=dp_zero3 trainer.devices=2 privacy.target_epsilon=3
    python -m lightning_dpzero.train precision=bf16-mixed
    python -m lightning_dpzero.train --multirun privacy.target_epsilon=1,3,8

Config groups (``configs/``): ``task``, ``strategy`` (``dp dp_ddp dp_zero1 dp_zero2 dp_zero3 dp_fsdp`` and the
non-private ``nonprivate ddp deepspeed_stage_1 deepspeed_stage_2 deepspeed_stage_3 fsdp``), ``privacy``,
``precision`` (``32-true bf16-mixed 16-mixed bf16-true``), ``trainer``, ``experiment``.

Each run prints one summary line, writes ``summary.json`` (final metric, epsilon, delta, sigma), the Lightning logs
(``csv/metrics.csv``; ``tensorboard/`` when TensorBoard is installed) and ``privacy_curve.png`` in its output
directory; a ``--multirun`` also writes ``multirun_summary.json`` and ``.csv`` in the sweep directory. The function
returns the optimized metric for Hydra sweepers.

With ``trainer.devices=2`` Lightning starts the second process itself (it re-runs this command with the same
overrides and the same ``hydra.run.dir``). Under ``--multirun``, or to control the processes yourself, launch with
torchrun instead, which Lightning detects::

    torchrun --standalone --nproc_per_node 2 -m lightning_dpzero.train strategy=dp_zero3 trainer.devices=2 \
        hydra.run.dir=outputs/zero3      # an explicit run dir: each rank resolves ${now:...} on its own
"""

from __future__ import annotations

import inspect
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, cast

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from lightning_dpzero.allocator import retain_freed_memory
from lightning_dpzero.callbacks import PrivacyBudget, PrivacyCurvePlot
from lightning_dpzero.strategies.query import dp_step


def run(cfg: DictConfig, root_dir: str | Path | None = None) -> dict[str, Any]:
    """Train and validate one configuration, writing logs and the plot under ``root_dir``.

    Args:
        cfg: the composed ``train`` config (groups ``task``, ``strategy``, ``privacy``, ``precision``, ``trainer``).
        root_dir: the run's output directory; ``None``: the current directory.

    Returns:
        The summary: ``metric``, ``value`` (the final validation metric), ``steps``, ``private``, and for DP
        strategies ``epsilon``, ``delta``, ``noise_multiplier`` and ``target_epsilon``; ``strategy_class``,
        ``precision``, ``precision_plugin``, ``world_size``, ``rank`` (of this process) and ``plot`` (the PNG's
        path, or ``None``).
    """
    root = Path(root_dir or Path.cwd())
    if cfg.get("retain_freed_memory", True):
        retain_freed_memory()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.task.data)
    model = instantiate(cfg.task.model)
    strategy_cls = hydra.utils.get_class(cfg.strategy._target_)
    private = "privacy" in inspect.signature(strategy_cls).parameters
    # PrivacyConfig is passed after instantiation: OmegaConf cannot merge a dataclass with union-typed fields.
    strategy = instantiate(cfg.strategy, _partial_=True)(**({"privacy": instantiate(cfg.privacy)} if private else {}))
    precision = cfg.precision.precision if cfg.get("precision") is not None else "32-true"
    # DP strategies take DPPrecision as a plugin (no loss scaler); the others take Lightning's own precision flag.
    precision_kwargs: dict[str, Any] = (
        {"plugins": [instantiate(cfg.precision)]} if private and cfg.get("precision") else {"precision": precision}
    )
    plot = PrivacyCurvePlot(root / "privacy_curve.png", metric=cfg.optimized_metric) if cfg.get("plot", True) else None
    callbacks: list[Callback] = [c for c in (PrivacyBudget() if private else None, plot) if c is not None]
    callbacks += _progress_bar(cfg)
    callbacks += _callbacks(cfg.trainer.get("callbacks"))
    trainer_cfg = OmegaConf.masked_copy(cfg.trainer, [k for k in cfg.trainer if k not in ("logger", "callbacks")])
    trainer: L.Trainer = instantiate(
        trainer_cfg,
        strategy=strategy,
        callbacks=callbacks,
        logger=_loggers(cfg.trainer.get("logger"), root),
        default_root_dir=str(root),
        **precision_kwargs,
    )
    trainer.fit(model, datamodule=datamodule)
    with warnings.catch_warnings():
        # Lightning advises devices=1 for validate under several processes (DistributedSampler may repeat examples
        # to even out the ranks' shares); val_loss is synced over the ranks, exact when the shares are equal.
        warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders")
        metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    summary: dict[str, Any] = {
        "metric": cfg.optimized_metric,
        "value": float(metrics[cfg.optimized_metric]),
        "steps": trainer.global_step,
        "private": private,
        "strategy_class": type(trainer.strategy).__name__,
        "precision": precision,
        "precision_plugin": type(trainer.strategy.precision_plugin).__name__,
        "world_size": trainer.world_size,
        "rank": trainer.global_rank,
        "plot": None if plot is None or plot.written is None else str(plot.written),
    }
    dp = dp_step(trainer)
    if dp is not None:
        summary.update(
            epsilon=dp.epsilon(),
            delta=dp.delta,
            noise_multiplier=dp.ledger.noise_multiplier,
            target_epsilon=dp.config.target_epsilon,
        )
    return summary


def _progress_bar(cfg: DictConfig) -> list[Callback]:
    """Lightning's rich progress bar (epsilon is logged to it) when rich is installed and the bar is enabled."""
    import importlib.util

    if not cfg.get("rich_progress_bar", True) or cfg.trainer.get("enable_progress_bar", True) is False:
        return []
    if importlib.util.find_spec("rich") is None:
        return []  # Lightning's tqdm bar; rich is a dependency of the package, so this is a stripped install
    from lightning.pytorch.callbacks import RichProgressBar

    return [RichProgressBar()]


def _callbacks(node: Any) -> list[Callback]:
    """The callbacks of ``trainer.callbacks`` (a dict by name, or a list), instantiated, after the job's own
    (the privacy budget, the plot, the progress bar): a name set to null is left out."""
    if not node:
        return []
    callbacks = []
    for entry in node.values() if isinstance(node, DictConfig) else node:
        if entry is None:
            continue
        callback = instantiate(entry)
        if not isinstance(callback, Callback):
            raise TypeError(
                f"trainer.callbacks: {entry.get('_target_')} made a {type(callback).__name__}, not a Lightning "
                "Callback (lightning.pytorch.callbacks.Callback)"
            )
        callbacks.append(callback)
    return callbacks


def _loggers(node: Any, root: Path) -> list[Logger] | bool:
    """The loggers of ``trainer.logger`` (a dict by name, or a list), each under ``root`` unless it sets save_dir.

    A logger whose package is missing (``TensorBoardLogger`` without tensorboard) is skipped: quietly when its entry
    says ``if_installed: true`` (the default config's TensorBoard), with a warning otherwise.
    ``trainer.logger=null`` or ``false`` disables logging.
    """
    if node is None or node is False:
        return False
    if node is True:
        return True  # Lightning's default logger
    entries = list(node.values()) if isinstance(node, DictConfig) else list(node)
    loggers = []
    for entry in entries:
        if entry is None:
            continue
        kwargs = {} if entry.get("save_dir") else {"save_dir": str(root)}
        optional = bool(entry.get("if_installed", False))
        entry = OmegaConf.masked_copy(entry, [k for k in entry if k != "if_installed"])
        try:
            loggers.append(instantiate(entry, **kwargs))
        except (ModuleNotFoundError, InstantiationException) as err:
            missing = err if isinstance(err, ModuleNotFoundError) else err.__cause__
            if not isinstance(missing, ModuleNotFoundError):
                raise
            if not optional:  # the default config's TensorBoard: used when installed, silently left out otherwise
                reason = str(missing).splitlines()[0]
                rank_zero_warn(f"lightning_dpzero.train: skipping logger {entry._target_}: {reason}")
    return loggers or False


_SEED_OVERRIDE = re.compile(r"((?:\+\+?)?privacy\.seed=)([^\s,'\"\]]+)")
_REDACTED = "<secret: not recorded>"


def redact_privacy_seed(text: str) -> str:
    """``text`` with the value of every ``privacy.seed=...`` override replaced (Hydra's override lists)."""
    return _SEED_OVERRIDE.sub(lambda m: m.group(1) + _REDACTED, text)


def redact_hydra_outputs(out: Path, hydra_cfg: Any) -> None:
    """Remove ``privacy.seed`` from what Hydra wrote before the job started (``.hydra/*.yaml``, ``multirun.yaml``).

    Privacy:
        ``PrivacyConfig.seed`` rebuilds the run's secret key: whoever has it regenerates every noise draw. Output
        directories get shared (logs, checkpoints), so the seed is never left in them; the user keeps it where
        they wrote it (a command line, an experiment file).
    """
    subdir = hydra_cfg.output_subdir  # None: Hydra wrote no .hydra directory
    files = [] if subdir is None else [out / subdir / n for n in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    files.append(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    for file in files:
        if not file.is_file():
            continue
        text = redact_privacy_seed(file.read_text())
        if file.name == "config.yaml":
            config = OmegaConf.create(text)
            if OmegaConf.select(config, "privacy.seed") is not None:
                config.privacy.seed = _REDACTED
                text = OmegaConf.to_yaml(config)
        file.write_text(text)


# An absolute path: Hydra resolves a relative one against the caller's package, which fails when the function is
# called from a console script (lightning-dpzero-train) instead of `python -m lightning_dpzero.train`.
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra's entry: run, then (on rank 0) write ``summary.json`` and print the summary line."""
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    redact_hydra_outputs(out, hydra_cfg)
    summary = run(cfg, root_dir=out)
    # HydraConfig.get() is annotated as the HydraConf dataclass; it returns the DictConfig (num is unset outside sweeps)
    summary["job"] = cast(DictConfig, hydra_cfg.job).get("num")
    summary["overrides"] = [redact_privacy_seed(o) for o in hydra_cfg.overrides.task]
    summary.update({group: hydra_cfg.runtime.choices.get(group) for group in ("task", "strategy")})
    # the privacy group's file and the fields overridden on top of it: "eps8" alone would misname a run at epsilon 3
    fields = [o for o in summary["overrides"] if o.lstrip("+~").startswith("privacy.")]
    summary["privacy"] = " + ".join([hydra_cfg.runtime.choices.get("privacy") or "?", *fields])
    value = summary["value"]
    if summary["rank"] == 0:  # processes started by Lightning or torchrun share the output directory
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(summary_line(summary))
        outputs = ["summary.json", "csv/metrics.csv"] + (["privacy_curve.png"] if summary["plot"] else [])
        print(f"[lightning_dpzero] wrote {', '.join(outputs)} in {out}")
    return value if math.isfinite(value) else float("inf")


def summary_line(summary: dict[str, Any]) -> str:
    """One line: the metric, the steps, the privacy guarantee (or "non-private"), strategy, precision, processes."""
    if summary["private"]:
        target = summary.get("target_epsilon")
        delta, sigma = summary.get("delta"), summary.get("noise_multiplier")
        privacy = f"epsilon={summary['epsilon']:.3f}{f' (target {target:g})' if target is not None else ''} " + (
            f"delta={delta:.2e} sigma={sigma:.3f}" if sigma is not None else "(no training step taken)"
        )
    else:
        privacy = "non-private"
    processes = summary.get("world_size", 1)
    return (
        f"[lightning_dpzero] {summary['metric']}={summary['value']:.4f} after {summary['steps']} steps, {privacy} | "
        f"{summary.get('strategy') or summary.get('strategy_class')}, {summary.get('precision')}, "
        f"{processes} process{'es' if processes > 1 else ''}"
    )


if __name__ == "__main__":
    main()
