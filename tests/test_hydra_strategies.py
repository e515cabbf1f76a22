"""The Hydra entry with every strategy group entry, the precision group, sweeps and one 2-process run.

Every strategy runs 2 logical steps of each task (gpt_tiny, gpt, cifar10, imdb; shrunk) on its embedded data in
one process. Per task, the strategies are grouped into two ``--multirun`` sweeps, one process each (DeepSpeed's and
the others), which also exercises the sweep machinery; each test reads its run's ``summary.json``. DeepSpeed's ~35 s
shared-memory comm-op build is skipped as in ``tests/strategies/parallel_worker.py`` (a ``sitecustomize`` on the
subprocesses' path; gloo does the collectives).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
from concurrent.futures import Future
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import lightning_dpzero
from lightning_dpzero.train import run
from tests import _warm

CONFIGS = Path(lightning_dpzero.__file__).resolve().parent / "configs"
COMMON = [
    "trainer.max_steps=2",
    "task.data.num_train=64",
    "task.data.num_val=16",
    "task.data.batch_size=16",
    "rich_progress_bar=false",
    "plot=false",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]
SHRINK = {  # each task's model and data made small enough for 2 steps in about a second
    "gpt_tiny": ["task.model.n_layer=1", "task.model.n_embd=32", "task.model.block_size=16"],
    "gpt": [
        "task.model.n_layer=1",
        "task.model.n_embd=32",
        "task.model.n_head=2",
        "task.model.block_size=16",
        "task.data.block_size=16",
    ],
    "cifar10": ["task.data.image_size=8", "task.model.net.depth=10", "task.model.net.width=1"],
    "imdb": [
        "task.data.max_len=16",
        "task.data.vocab_size=512",
        "task.model.net.dim=32",
        "task.model.net.depth=1",
        "task.model.net.heads=2",
    ],
}
TASKS = list(SHRINK)
TINY = [*COMMON, *SHRINK["gpt_tiny"]]  # the default task


def tiny(task: str) -> list[str]:
    return [f"task={task}", *COMMON, *SHRINK[task]]


PRIVATE = ["dp", "dp_ddp", "dp_fsdp", "dp_zero1", "dp_zero2", "dp_zero3"]
NONPRIVATE = ["nonprivate", "ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"]
GROUPS = {
    "plain": ["dp", "dp_ddp", "dp_fsdp", "nonprivate", "ddp", "fsdp"],
    "deepspeed": ["dp_zero1", "dp_zero2", "dp_zero3", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"],
}
# tests only: DeepSpeed's shared-memory comm op is not built (gloo does the collectives), as in the strategy tests
_SITECUSTOMIZE = """\
import sys
import deepspeed.comm.torch  # noqa: F401
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
"""


def _env(tmp: Path, deepspeed: bool) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if deepspeed:
        site = tmp / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _command(args: list[str]) -> list[str]:
    return ["-m", "lightning_dpzero.train", *args]


def _train(args: list[str], cwd: Path, deepspeed: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    return _warm.run(_command(args), cwd=cwd, env=_env(cwd, deepspeed), timeout=timeout)


_STARTED: dict = {}  # what start_commands submitted: key -> (working folder, Future of the CompletedProcess)


def _swept(task: str, group: str) -> list[str]:
    """The strategies a task's sweep runs: every one on the default task; on the others, ours and ``nonprivate``
    (Lightning's own DDP, FSDP and DeepSpeed strategies need one task to show that their config files run)."""
    names = GROUPS[group]
    return names if task == "gpt_tiny" else [n for n in names if n in PRIVATE or n == "nonprivate"]


def _sweep(task: str, group: str) -> tuple[Path, Future]:
    """Per task, each group of strategies as one ``--multirun`` (one process, its jobs in sequence)."""
    if (task, group) not in _STARTED:
        root = _warm.workdir(f"{task}-{group}")
        args = ["--multirun", f"strategy={','.join(_swept(task, group))}", "privacy=sigma1", *tiny(task)]
        args.append(f"hydra.sweep.dir={root}")
        future = _warm.submit(_command(args), cwd=root, env=_env(root, group == "deepspeed"), timeout=600)
        _STARTED[task, group] = (root, future)
    return _STARTED[task, group]


def _target_multirun() -> tuple[Path, Future]:
    if "target" not in _STARTED:
        root = _warm.workdir("target-epsilon")
        args = ["--multirun", "privacy.target_epsilon=3,8", *TINY, f"hydra.sweep.dir={root}"]
        _STARTED["target"] = (root, _warm.submit(_command(args), cwd=root, env=_env(root, False), timeout=300))
    return _STARTED["target"]


def start_commands(items: list[pytest.Function]) -> None:
    """Submits the commands the selected tests check, when the session starts (tests/conftest.py)."""
    if any("sweeps" in item.fixturenames for item in items):
        for task in TASKS:
            for group in GROUPS:
                _sweep(task, group)
    if any(
        item.originalname == test_multirun_over_target_epsilon_writes_each_summary_and_the_sweep_table.__name__
        for item in items
    ):
        _target_multirun()


@pytest.fixture(scope="module")
def sweeps() -> dict[tuple[str, str], tuple[Path, subprocess.CompletedProcess]]:
    """Each (task, group) sweep's folder and finished process (submitted when the session started)."""
    out = {}
    for task in TASKS:
        for group in GROUPS:
            root, future = _sweep(task, group)
            out[task, group] = (root, future.result())
    return out


def _summary(sweeps, strategy: str, task: str = "gpt_tiny") -> dict:
    group = next(g for g, names in GROUPS.items() if strategy in names)
    root, proc = sweeps[task, group]
    path = root / str(_swept(task, group).index(strategy)) / "summary.json"
    assert path.exists(), f"task={task} strategy={strategy}: no summary.json; stderr ends:\n{proc.stderr[-4000:]}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("strategy", PRIVATE)
def test_private_strategy_trains_and_reports_epsilon(sweeps, strategy: str, task: str) -> None:
    """Reference: epsilon of 2 Poisson steps at sigma=1 from dp-accounting directly; the run's strategy is DP."""
    import dp_accounting

    summary = _summary(sweeps, strategy, task)
    assert summary["private"] and summary["steps"] == 2 and summary["strategy"] == strategy
    assert summary["task"] == task
    assert summary["noise_multiplier"] == 1.0 and math.isfinite(summary["value"])
    q = 16 / 64  # task.data.batch_size / task.data.num_train
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.0)), 2)
    assert summary["delta"] == pytest.approx(64**-1.1)  # delta = 1/N^1.1 by default
    assert summary["epsilon"] == pytest.approx(accountant.get_epsilon(summary["delta"]), rel=1e-3)


@pytest.mark.parametrize(
    ("strategy", "task"), [(s, "gpt_tiny") for s in NONPRIVATE] + [("nonprivate", t) for t in TASKS[1:]]
)
def test_nonprivate_strategy_trains_without_epsilon(sweeps, strategy: str, task: str) -> None:
    """Reference: the non-private counterparts train the same 2 steps and report no privacy numbers."""
    summary = _summary(sweeps, strategy, task)
    assert not summary["private"] and summary["steps"] == 2 and "epsilon" not in summary
    assert math.isfinite(summary["value"])


def test_sweep_summary_lists_every_run(sweeps) -> None:
    """Reference: multirun_summary.json/.csv hold one row per run that finished, with its strategy override."""
    root, _ = sweeps["gpt_tiny", "deepspeed"]
    rows = json.loads((root / "multirun_summary.json").read_text())
    assert [r["strategy"] for r in rows] == GROUPS["deepspeed"]
    with open(root / "multirun_summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["strategy"] for r in table] == GROUPS["deepspeed"]
    assert [r["private"] for r in table] == ["True"] * 3 + ["False"] * 3
    assert all(float(r["epsilon"]) > 0 for r in table[:3]) and all(r["epsilon"] == "" for r in table[3:])


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize(
    ("strategy", "precision", "plugin"),
    [
        ("dp", "32-true", "DPPrecision"),
        ("dp", "bf16-mixed", "DPPrecision"),
        ("dp", "16-mixed", "DPPrecision"),
        ("dp", "bf16-true", "DPPrecision"),
        ("nonprivate", "32-true", "Precision"),
        ("nonprivate", "bf16-mixed", "MixedPrecision"),
        ("nonprivate", "bf16-true", "HalfPrecision"),
    ],
)
def test_precision_group(strategy: str, precision: str, plugin: str, tmp_path) -> None:
    """Reference: DP runs train under DPPrecision(<choice>), non-private ones under Lightning's own plugin."""
    summary = run(_compose([f"strategy={strategy}", f"precision={precision}", "privacy=sigma1", *TINY]), tmp_path)
    assert summary["precision"] == precision and summary["precision_plugin"] == plugin
    assert summary["steps"] == 2 and math.isfinite(summary["value"])


def test_multirun_over_target_epsilon_writes_each_summary_and_the_sweep_table() -> None:
    """Reference: 2 jobs -> 2 summary.json, each epsilon at most its target; the sweep table has both rows."""
    tmp_path, future = _target_multirun()
    proc = future.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads((tmp_path / str(job) / "summary.json").read_text()) for job in (0, 1)]
    for target, summary in zip((3.0, 8.0), runs):
        assert summary["target_epsilon"] == target and 0 < summary["epsilon"] <= target
        assert {"value", "delta", "noise_multiplier"} <= summary.keys()
    assert runs[0]["noise_multiplier"] > runs[1]["noise_multiplier"]  # a smaller budget needs more noise
    rows = json.loads((tmp_path / "multirun_summary.json").read_text())
    assert [r["epsilon"] for r in rows] == [r["epsilon"] for r in runs]
    with open(tmp_path / "multirun_summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["privacy.target_epsilon"]) for r in table] == [3.0, 8.0]
    # the privacy column names the group file and the field overridden on top of it
    assert [r["privacy"] for r in table] == ["eps8 + privacy.target_epsilon=3", "eps8 + privacy.target_epsilon=8"]


@pytest.mark.distributed
def test_two_process_dp_zero3_through_lightnings_launcher(tmp_path) -> None:
    """Reference: Lightning re-launches the Hydra command for rank 1; rank 0 alone writes the summary."""
    proc = _train(
        ["strategy=dp_zero3", "trainer.devices=2", "privacy=sigma1", *TINY, f"hydra.run.dir={tmp_path}"],
        tmp_path,
        deepspeed=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["strategy"] == "dp_zero3"
    assert proc.stdout.count("[lightning_dpzero] val_loss=") == 1, proc.stdout


@pytest.mark.distributed
def test_two_processes_log_the_same_val_loss_as_one(tmp_path) -> None:
    """Reference: the same initial weights (seed 0) validated in one process. Under 2 processes each rank sees half of
    the validation set; the logged val_loss (sync_dist) is the mean over all of it, not rank 0's half."""
    untrained = [o for o in TINY if not o.startswith("task.data.num_val")]
    untrained += ["task.data.num_val=32", "+trainer.limit_train_batches=0"]
    one = run(_compose(["strategy=dp", *untrained, "trainer.logger=null"]), root_dir=tmp_path / "one")
    proc = _train(["strategy=dp_ddp", "trainer.devices=2", *untrained, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["steps"] == one["steps"] == 0
    assert math.isclose(two["value"], one["value"], rel_tol=1e-5), (two["value"], one["value"])
