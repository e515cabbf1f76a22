"""The Hydra entry point and the README's commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import lightning_dpzero
from lightning_dpzero.train import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(lightning_dpzero.__file__).resolve().parent / "configs"
SMALL = ["trainer.max_steps=3", "task.data.num_train=256", "task.data.num_val=32", "+trainer.enable_progress_bar=false"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=False)


@pytest.mark.parametrize("privacy", ["eps1", "eps3", "eps8", "sigma1"])
def test_every_privacy_config_composes_and_instantiates(privacy: str) -> None:
    """Reference: each privacy group file builds a valid PrivacyConfig."""
    from hydra.utils import instantiate

    cfg = _compose([f"privacy={privacy}"])
    config = instantiate(cfg.privacy)
    assert isinstance(config, lightning_dpzero.PrivacyConfig)


def test_run_trains_privately_and_reports_epsilon(tmp_path) -> None:
    """Reference: the summary's epsilon is at most the configured target after the planned steps."""
    summary = run(_compose(SMALL), root_dir=tmp_path)
    assert summary["private"] and summary["steps"] == 3
    assert 0 < summary["epsilon"] <= 8.0
    assert summary["value"] > 0


def test_run_nonprivate_baseline(tmp_path) -> None:
    """Reference: strategy=nonprivate trains without a DP step and reports no epsilon."""
    summary = run(_compose([*SMALL, "strategy=nonprivate"]), root_dir=tmp_path)
    assert not summary["private"] and "epsilon" not in summary


def test_module_entry_point_prints_summary(tmp_path) -> None:
    """Reference: `python -m lightning_dpzero.train` prints the metric and epsilon and writes summary.json."""
    out = subprocess.run(
        [sys.executable, "-m", "lightning_dpzero.train", *SMALL, f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"\[lightning_dpzero\] val_loss=\d+\.\d+ after 3 steps, epsilon=", out.stdout)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epsilon"] <= 8.0


def test_readme_commands_are_the_ones_ci_runs() -> None:
    """Reference: .ci/run runs exactly the README's install and test commands."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"## Three commands\n\n```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.strip().splitlines()]
    assert len(commands) == 3
    install, main_job, tests = commands
    assert main_job == "python -m lightning_dpzero.train"
    assert install in ci and tests in ci
