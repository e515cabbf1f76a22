"""The LightningCLI entry point (``lightning-dpzero``): DP strategies, privacy, precision and tasks by name."""

from __future__ import annotations

import math

import pytest
import yaml

pytest.importorskip(
    "jsonargparse", reason="the CLI needs jsonargparse[signatures] (pip install 'jsonargparse[signatures]')"
)

from lightning.pytorch.plugins import DeepSpeedPrecision  # noqa: E402

import lightning_dpzero as dpz  # noqa: E402
from lightning_dpzero.cli import DPLightningCLI, main, run  # noqa: E402

TASK = {
    "model": {
        "class_path": "lightning_dpzero.tasks.gpt.GPTTask",
        "init_args": {"n_layer": 1, "n_embd": 32, "block_size": 16},
    },
    "data": {
        "class_path": "lightning_dpzero.tasks.gpt.SyntheticArithmeticDataModule",
        "init_args": {"num_train": 64, "num_val": 16, "block_size": 16, "batch_size": 16},
    },
}
QUIET = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False, "logger": False}
TASK_ARGS = [
    "--model=GPTTask",
    "--model.n_layer=1",
    "--model.n_embd=32",
    "--data=SyntheticArithmeticDataModule",
    "--data.num_train=64",
]


def _parse(*args: str) -> DPLightningCLI:
    return DPLightningCLI(run=False, args=[*TASK_ARGS, "--trainer.accelerator=cpu", "--trainer.logger=false", *args])


def test_fit_from_yaml_config_with_a_privacy_section(tmp_path) -> None:
    """Reference: `fit --config` trains 2 DP steps with the YAML's privacy; epsilon reaches the progress bar."""
    config = {
        "trainer": {**QUIET, "strategy": "dp", "max_steps": 2, "limit_val_batches": 1, "enable_checkpointing": False},
        "privacy": {"noise_multiplier": 1.0, "clipping_style": "layer-wise", "accountant": "rdp"},
        **TASK,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path}"])
    trainer = cli.trainer
    assert isinstance(trainer.strategy, dpz.DPStrategy) and trainer.global_step == 2
    assert trainer.strategy.privacy.clipping_style is dpz.ClippingStyle.LAYER_WISE
    assert trainer.strategy.privacy.noise_multiplier == 1.0
    assert sum(isinstance(c, dpz.PrivacyBudget) for c in trainer.callbacks) == 1
    epsilon = trainer.strategy.dp.epsilon()
    assert 0 < epsilon < math.inf
    assert float(trainer.progress_bar_metrics["epsilon"]) == pytest.approx(epsilon)


def test_saved_config_holds_no_privacy_seed(tmp_path) -> None:
    """Reference: PrivacyConfig.seed rebuilds the run's key; Lightning's saved config.yaml (log directory) must not
    hold it: the run uses the seed, the file says null."""
    seed = 12345678901234567
    config = {
        "trainer": {**QUIET, "strategy": "dp", "max_steps": 1, "limit_val_batches": 1, "enable_checkpointing": False},
        "privacy": {"noise_multiplier": 1.0, "seed": seed},
        **TASK,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path / 'out'}"])
    assert (
        cli.trainer.strategy.dp.ledger.key == dpz.DPStep(dpz.PrivacyConfig(noise_multiplier=1.0, seed=seed)).ledger.key
    )
    saved = tmp_path / "out" / "config.yaml"
    text = saved.read_text()
    assert str(seed) not in text
    loaded = yaml.safe_load(text)
    assert loaded["privacy"]["seed"] is None
    assert loaded["trainer"]["strategy"]["init_args"]["privacy"]["seed"] is None


def test_class_path_strategy_with_its_own_privacy_argument() -> None:
    """Reference: --trainer.strategy=<class path> with --trainer.strategy.privacy.* builds that PrivacyConfig."""
    cli = _parse(
        "--trainer.strategy=lightning_dpzero.DPStrategy",
        "--trainer.strategy.privacy.target_epsilon=3",
        "--trainer.strategy.privacy.accountant=pld",
        "--trainer.strategy.privacy.clipping_function=abadi",
    )
    privacy = cli.trainer.strategy.privacy
    assert privacy.target_epsilon == 3.0 and privacy.accountant is dpz.Accountant.PLD
    assert privacy.clipping_function is dpz.ClippingFunction.ABADI


def test_registered_name_gets_the_top_level_privacy_and_precision_plugin() -> None:
    """Reference: dp_zero3 by name is DPZeroStrategy(stage=3) with --privacy.*; DPPrecision selected by name."""
    cli = _parse(
        "--trainer.strategy=dp_zero3",
        "--privacy.noise_multiplier=2",
        "--privacy.expected_batch_size=32",
        "--trainer.plugins=DPPrecision",
        "--trainer.plugins.precision=bf16-mixed",
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, dpz.DPZeroStrategy) and strategy.zero_stage_3
    assert strategy.privacy.noise_multiplier == 2.0 and strategy.privacy.expected_batch_size == 32
    plugin = cli.trainer.precision_plugin  # DPPrecision under ZeRO: DeepSpeed's own precision, at its setting
    assert isinstance(plugin, DeepSpeedPrecision) and plugin.precision == "bf16-mixed"


def test_without_privacy_settings_the_strategy_uses_the_safe_default() -> None:
    """Reference: PrivacyConfig.default() (target epsilon 8) when neither privacy section is given."""
    cli = _parse("--trainer.strategy=dp")
    assert cli.trainer.strategy.privacy == dpz.PrivacyConfig.default()
    assert any(isinstance(c, dpz.PrivacyBudget) for c in cli.trainer.callbacks)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trainer.strategy=ddp", "--privacy.target_epsilon=3"], "not a DP strategy"),
        (
            [
                "--trainer.strategy=lightning_dpzero.DPStrategy",
                "--trainer.strategy.privacy.target_epsilon=3",
                "--privacy.target_epsilon=3",
            ],
            "given twice",
        ),
    ],
)
def test_conflicting_privacy_settings_are_refused(args: list[str], message: str) -> None:
    """Reference: privacy settings for a non-private strategy, or given twice, raise a ValueError saying so."""
    with pytest.raises(ValueError, match=message):
        _parse(*args)


def test_unknown_enum_value_is_rejected_with_the_allowed_values(capsys) -> None:
    """Reference: --privacy.clipping_style=bogus fails parsing and the error lists the YAML spellings."""
    with pytest.raises(SystemExit):
        _parse("--trainer.strategy=dp", "--privacy.noise_multiplier=1", "--privacy.clipping_style=bogus")
    assert "layer-wise" in capsys.readouterr().err


def test_help_documents_the_privacy_settings(capsys) -> None:
    """Reference: `fit --help` names the privacy section and its fields; `--privacy.help` documents each one."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--privacy", "target_epsilon", "noise_multiplier", "clip_norm", "--privacy_budget", "dp_zero3"):
        assert needle in text, needle
    with pytest.raises(SystemExit):
        main(["fit", "--privacy.help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert "--privacy.physical_batch_size" in text and "memory only" in text
