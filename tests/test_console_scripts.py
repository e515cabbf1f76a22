"""The installed console scripts, as a user runs them: each trains (or audits) a few steps and exits with status 0."""

from __future__ import annotations

import os
import sys
from concurrent.futures import Future
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


_STARTED: dict[str, tuple[Path, Future]] = {}


def _submit(name: str) -> tuple[Path, Future]:
    """Runs the installed script ``name`` (the file, as python runs it) with small settings, in a folder of its own."""
    if name not in _STARTED:
        cwd = _warm.workdir(name)
        if name == "lightning-dpzero":
            (cwd / "run.yaml").write_text(yaml.safe_dump(CLI_CONFIG))
            args = ["fit", "--config", "run.yaml"]
        elif name == "lightning-dpzero-train":
            args = [*SMALL, f"hydra.run.dir={cwd / 'run'}"]
        else:
            args = [*SMALL[:3], "audit.num_canaries=16", f"hydra.run.dir={cwd / 'audit'}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        _STARTED[name] = (cwd, _warm.submit([_script(name), *args], cwd=cwd, env=env, timeout=600))
    return _STARTED[name]


SCRIPTS = {
    "test_lightning_dpzero_fit_exits_zero": "lightning-dpzero",
    "test_lightning_dpzero_train_exits_zero": "lightning-dpzero-train",
    "test_lightning_dpzero_audit_exits_zero": "lightning-dpzero-audit",
}


def start_commands(items: list[pytest.Function]) -> None:
    """Submits the scripts the selected tests run, when the session starts (tests/conftest.py)."""
    for item in items:
        if item.originalname in SCRIPTS and (BIN / SCRIPTS[item.originalname]).exists():
            _submit(SCRIPTS[item.originalname])


def test_lightning_dpzero_fit_exits_zero() -> None:
    """Reference: `lightning-dpzero fit --config run.yaml` (LightningCLI) trains and exits 0, printing no object."""
    _, future = _submit("lightning-dpzero")
    out = future.result()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DPLightningCLI object" not in out.stdout + out.stderr


def test_lightning_dpzero_train_exits_zero() -> None:
    """Reference: `lightning-dpzero-train` finds its Hydra configs when installed (not only under python -m)."""
    out = _submit("lightning-dpzero-train")[1].result()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[lightning_dpzero] val_loss=" in out.stdout


def test_lightning_dpzero_audit_exits_zero() -> None:
    """Reference: `lightning-dpzero-audit` finds its Hydra configs when installed, audits and exits 0."""
    cwd, future = _submit("lightning-dpzero-audit")
    out = future.result()
    assert out.returncode == 0, out.stderr[-3000:]
    assert (cwd / "audit" / "audit.json").is_file()
