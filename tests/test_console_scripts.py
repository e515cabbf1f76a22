"""The installed console scripts, as a user runs them: each trains (or audits) a few steps and exits with status 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import _warm

BIN = Path(sys.executable).parent
SMALL = ["trainer.max_steps=2", "task.data.num_train=256", "task.data.num_val=32", "+trainer.enable_progress_bar=false"]
CLI_CONFIG = {
    "trainer": {
        "strategy": "dp",
        "max_steps": 2,
        "limit_val_batches": 1,
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_checkpointing": False,
    },
    "privacy": {"target_epsilon": 3.0, "expected_batch_size": 32},
    "model": {"class_path": "lightning_dpzero.tasks.gpt.GPTTask", "init_args": {"n_layer": 1, "n_embd": 32}},
    "data": {
        "class_path": "lightning_dpzero.tasks.gpt.SyntheticArithmeticDataModule",
        "init_args": {"num_train": 128, "num_val": 16},
    },
}


def _script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable} (pip install the package)")
    return str(path)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return _warm.run(args, cwd=cwd, env=env, timeout=600)  # the installed script file, run as python runs it


def test_lightning_dpzero_fit_exits_zero(tmp_path: Path) -> None:
    """Reference: `lightning-dpzero fit --config run.yaml` (LightningCLI) trains and exits 0, printing no object."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(CLI_CONFIG))
    out = _run([_script("lightning-dpzero"), "fit", "--config", str(config)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DPLightningCLI object" not in out.stdout + out.stderr


def test_lightning_dpzero_train_exits_zero(tmp_path: Path) -> None:
    """Reference: `lightning-dpzero-train` finds its Hydra configs when installed (not only under python -m)."""
    out = _run([_script("lightning-dpzero-train"), *SMALL, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[lightning_dpzero] val_loss=" in out.stdout


def test_lightning_dpzero_audit_exits_zero(tmp_path: Path) -> None:
    """Reference: `lightning-dpzero-audit` finds its Hydra configs when installed, audits and exits 0."""
    args = [*SMALL[:3], "audit.num_canaries=16", f"hydra.run.dir={tmp_path / 'audit'}"]
    out = _run([_script("lightning-dpzero-audit"), *args], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "audit" / "audit.json").is_file()
