"""LightningCLI entry point: ``lightning-dpzero fit --config run.yaml`` (or ``python -m lightning_dpzero.cli``).

    lightning-dpzero fit --model=GPTTask --data=SyntheticArithmeticDataModule --trainer.strategy=dp_zero3 \
        --privacy.target_epsilon=3 --trainer.max_steps=200
    lightning-dpzero fit --trainer.strategy=lightning_dpzero.DPStrategy \
        --trainer.strategy.privacy.target_epsilon=3 --trainer.strategy.privacy.clipping_style=layer-wise ...
    lightning-dpzero fit --config run.yaml --print_config        # the full, resolved config
    lightning-dpzero fit --help                                   # every option, privacy settings included

Everything is Lightning's CLI; the DP parts are selectable by registered name or class path:

- strategies: ``--trainer.strategy=dp|dp_ddp|dp_zero1|dp_zero2|dp_zero3|dp_fsdp`` (registered names) or a class
  path (``lightning_dpzero.DPZeroStrategy`` with ``--trainer.strategy.stage=3``);
- privacy: a top-level ``privacy:`` section (``--privacy.target_epsilon=3``, see ``--help``) given to whichever DP
  strategy is chosen, or the strategy's own ``privacy`` argument (``--trainer.strategy.privacy.*``; not both).
  Enum settings take the strings of the YAML configs (``clipping_style: layer-wise``, ``accountant: pld``).
  With neither, the strategy uses ``PrivacyConfig.default()`` (sigma calibrated for epsilon = 8);
- precision: ``--trainer.precision=bf16-mixed`` (a DP strategy runs it as ``DPPrecision``) or
  ``--trainer.plugins=DPPrecision --trainer.plugins.precision=bf16-mixed``;
- ``PrivacyBudget`` is added to the callbacks when the strategy is private and none is given
  (``--trainer.callbacks+=PrivacyBudget --trainer.callbacks.max_epsilon=5`` to set your own;
  ``--privacy_budget=false`` for none);
- tasks: ``--model=GPTTask`` / ``--data=SyntheticArithmeticDataModule`` or any LightningModule / DataModule by class
  path.

Example ``run.yaml``::

    trainer:
      strategy: dp            # or dp_zero3 with trainer.devices: 2
      max_steps: 100
      accelerator: cpu
    privacy:
      target_epsilon: 3.0
      expected_batch_size: 128
      physical_batch_size: 64
    model:
      class_path: lightning_dpzero.tasks.gpt.GPTTask
    data:
      class_path: lightning_dpzero.tasks.text_data.SyntheticArithmeticDataModule
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from enum import Enum
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.strategies import StrategyRegistry
from typing_extensions import override

import lightning_dpzero  # noqa: F401  # registers the DP strategy names
import lightning_dpzero.tasks  # noqa: F401  # makes the tasks selectable by class name
from lightning_dpzero import config as _config
from lightning_dpzero.callbacks import PrivacyBudget
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.strategies.query import is_private

__all__ = ["DPLightningCLI", "main", "run"]


_DESCRIPTION = (
    "Differentially private training with Lightning (lightning_dpzero). DP strategies by name: "
    "--trainer.strategy=dp|dp_ddp|dp_zero1|dp_zero2|dp_zero3|dp_fsdp, or by class path (lightning_dpzero.DPStrategy, "
    "DPDDPStrategy, DPZeroStrategy, DPFSDPStrategy). Privacy settings: a top-level `privacy:` section "
    "(--privacy.target_epsilon=3; every field: --privacy.help) or the strategy's own "
    "--trainer.strategy.privacy.*. Precision: --trainer.precision=bf16-mixed or --trainer.plugins=DPPrecision. "
    "PrivacyBudget (epsilon in the progress bar, stop before the budget is spent) is added for DP strategies."
)


def _register_enum_types() -> None:
    """jsonargparse reads enums by member name (``LAYER_WISE``); ours are written by value (``layer-wise``)."""
    from jsonargparse.typing import register_type

    for enum in vars(_config).values():
        if isinstance(enum, type) and issubclass(enum, _config._StrEnum) and enum is not _config._StrEnum:
            register_type(enum, serializer=lambda member: member.value, deserializer=_enum_parser(enum))


def _enum_parser(enum: type[Enum]) -> Any:
    def parse(value: Any) -> Enum:
        if isinstance(value, enum):
            return value
        for member in enum:
            if str(value) in (member.value, member.name):
                return member
        raise ValueError(f"{enum.__name__}: {value!r} is not one of {[m.value for m in enum]}.")

    return parse


class _SaveConfigWithoutSeed(SaveConfigCallback):
    """Lightning's ``config.yaml`` in the log directory, with ``privacy.seed`` removed.

    Privacy:
        ``PrivacyConfig.seed`` rebuilds the run's secret key, from which every noise draw derives; log directories
        get shared, so it is written as null (the saved config then trains with a fresh OS key).
    """

    def __init__(self, parser: LightningArgumentParser, config: Any, *args: Any, **kwargs: Any) -> None:
        config = config.clone()
        for path in ("privacy.seed", "trainer.strategy.init_args.privacy.seed"):
            try:
                if config.get(path) is not None:
                    config[path] = None
            except (KeyError, TypeError):
                continue
        super().__init__(parser, config, *args, **kwargs)


class DPLightningCLI(LightningCLI):
    """``LightningCLI`` with a top-level ``privacy`` section and ``PrivacyBudget`` added for DP strategies.

    Args:
        *args: passed to ``LightningCLI`` (defaults: any LightningModule and DataModule by class path or name).
        privacy_budget_default: whether ``PrivacyBudget`` is added when a DP strategy has none (``--privacy_budget``).
        **kwargs: passed to ``LightningCLI``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _register_enum_types()
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)  # the tasks configure their own optimizer
        kwargs.setdefault("save_config_callback", _SaveConfigWithoutSeed)
        if not args and "model_class" not in kwargs:
            args = (LightningModule, LightningDataModule)
        parser_kwargs = kwargs.pop("parser_kwargs", None) or {}
        for subcommand in (None, "fit", "validate", "test", "predict"):
            target = parser_kwargs if subcommand is None else parser_kwargs.setdefault(subcommand, {})
            target.setdefault("description", _DESCRIPTION)
        kwargs["parser_kwargs"] = parser_kwargs
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--privacy",
            type=PrivacyConfig | None,
            default=None,
            help="Privacy settings (lightning_dpzero.PrivacyConfig) given to the DP strategy chosen with "
            "--trainer.strategy: exactly one of target_epsilon (sigma calibrated for trainer.max_steps) and "
            "noise_multiplier; delta (null: 1/N^1.1), clip_norm C, clipping_style (all-layer, layer-wise, "
            "param-wise, group-wise), clipping_function (automatic, abadi), expected_batch_size B = qN or "
            "sample_rate q, physical_batch_size (memory only), accountant (rdp, pld), seed. Use either this "
            "section or --trainer.strategy.privacy, not both; neither: PrivacyConfig.default() (epsilon = 8).",
        )
        parser.add_argument(
            "--privacy_budget",
            type=bool,
            default=True,
            help="Add a PrivacyBudget callback (logs epsilon to the progress bar and loggers, stops before the "
            "budget is spent) when the strategy is private and the callbacks have none.",
        )

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        privacy = config.get("privacy")
        if privacy is None:
            return
        strategy = config.trainer.get("strategy")
        if isinstance(strategy, str):
            if not is_private(strategy):
                raise ValueError(
                    f"lightning-dpzero: a `privacy` section was given, but trainer.strategy={strategy!r} is not a DP "
                    "strategy; choose one of dp, dp_ddp, dp_zero1, dp_zero2, dp_zero3, dp_fsdp."
                )
            entry = StrategyRegistry[strategy]
            init_args = {**entry["init_params"], "privacy": privacy}
            config.trainer.strategy = _namespace(
                class_path=f"{entry['strategy'].__module__}.{entry['strategy'].__qualname__}", init_args=init_args
            )
            return
        class_path = strategy.get("class_path") if strategy is not None else None
        cls = _import(class_path) if class_path else None
        if cls is None or "privacy" not in inspect.signature(cls).parameters:
            raise ValueError(
                f"lightning-dpzero: a `privacy` section was given, but trainer.strategy={class_path!r} takes no "
                "privacy settings; choose a DP strategy (e.g. --trainer.strategy=dp or lightning_dpzero.DPStrategy)."
            )
        init_args = strategy.get("init_args")
        if init_args is not None and init_args.get("privacy") is not None:
            raise ValueError(
                "lightning-dpzero: privacy settings given twice, in the top-level `privacy` section and in "
                "trainer.strategy.init_args.privacy; keep one."
            )
        if init_args is None:
            strategy.init_args = _namespace(privacy=privacy)
        else:
            init_args.privacy = privacy

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        config = dict(config)
        privacy_budget = self._get(self.config, "privacy_budget", default=True)
        given = [*(config.get("callbacks") or []), *callbacks]
        if (
            privacy_budget
            and is_private(config.get("strategy"))
            and not any(isinstance(c, PrivacyBudget) for c in given)
        ):
            callbacks = [*callbacks, PrivacyBudget()]
        return super()._instantiate_trainer(config, callbacks)


def _namespace(**values: Any) -> Any:
    from jsonargparse import Namespace

    return Namespace(**{k: Namespace(**v) if isinstance(v, dict) else v for k, v in values.items()})


def _import(class_path: str) -> type | None:
    from jsonargparse._util import import_object

    try:
        return import_object(class_path)
    except (ImportError, AttributeError, ValueError):
        return None


def run(args: Sequence[str] | None = None) -> DPLightningCLI:
    """Parse ``args`` (the command line without the program; ``None``: ``sys.argv``), run the subcommand and return
    the CLI (its ``trainer``, ``model`` and ``datamodule``)."""
    return DPLightningCLI(args=list(args) if args is not None else None)


def main(args: Sequence[str] | None = None) -> None:
    """The ``lightning-dpzero`` console script: exit status 0 when the subcommand finishes."""
    run(args)


if __name__ == "__main__":
    main()
