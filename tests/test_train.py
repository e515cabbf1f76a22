"""The Hydra entry point and the README's commands."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

import lightning_dpzero
from lightning_dpzero.randomness import SecretKey
from lightning_dpzero.train import run
from tests import _warm
from tests.privacy.leaks import assert_no_secrets, secret_needles

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(lightning_dpzero.__file__).resolve().parent / "configs"
_HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
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


class CountingCallback(Callback):
    """A user's callback given by config: counts the training batches it sees (one per logical step)."""

    made: list[CountingCallback] = []

    def __init__(self, label: str) -> None:
        self.label, self.batches = label, 0
        CountingCallback.made.append(self)

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.batches += 1


def test_run_trains_privately_and_reports_epsilon(tmp_path) -> None:
    """Reference: the summary's epsilon is at most the configured target after the planned steps; a callback named
    in trainer.callbacks runs beside the job's own and sees one training batch per logical step."""
    CountingCallback.made.clear()
    target = "+trainer.callbacks.count._target_=tests.test_train.CountingCallback"
    summary = run(_compose([*SMALL, target, "+trainer.callbacks.count.label=mine"]), root_dir=tmp_path)
    assert summary["private"] and summary["steps"] == 3
    assert 0 < summary["epsilon"] <= 8.0
    assert summary["value"] > 0
    assert [(c.label, c.batches) for c in CountingCallback.made] == [("mine", 3)]


def test_trainer_callbacks_must_be_lightning_callbacks() -> None:
    """Reference: an entry of trainer.callbacks that is not a Callback is refused, naming its target; null entries
    (a default switched off) are left out."""
    from omegaconf import OmegaConf

    from lightning_dpzero.train import _callbacks

    with pytest.raises(TypeError, match="collections.OrderedDict made a OrderedDict, not a Lightning Callback"):
        _callbacks(OmegaConf.create({"bad": {"_target_": "collections.OrderedDict"}}))
    made = _callbacks(OmegaConf.create({"off": None, "timer": {"_target_": "lightning.pytorch.callbacks.Timer"}}))
    assert [type(c).__name__ for c in made] == ["Timer"]
    assert _callbacks(OmegaConf.create({})) == [] and _callbacks(None) == []


def test_run_nonprivate_baseline(tmp_path) -> None:
    """Reference: strategy=nonprivate trains without a DP step and reports no epsilon."""
    summary = run(_compose([*SMALL, "strategy=nonprivate"]), root_dir=tmp_path)
    assert not summary["private"] and "epsilon" not in summary


SEED = 98765432109876543


_STARTED: dict[str, tuple[Path, Future]] = {}


def _main_job(key: str, *overrides: str) -> tuple[Path, Future]:
    """``python -m lightning_dpzero.train`` with SMALL and ``overrides``, in a folder of its own (its run dir)."""
    if key not in _STARTED:
        cwd = _warm.workdir(key)
        args = ["-m", "lightning_dpzero.train", *SMALL, *overrides, f"hydra.run.dir={cwd}"]
        _STARTED[key] = (cwd, _warm.submit(args, cwd=cwd, timeout=300))
    return _STARTED[key]


def _entry_point() -> tuple[Path, Future]:
    return _main_job("entry", f"privacy.seed={SEED}")


# seed: model and dropout (0 by default); privacy.seed: noise and sampling. The first two runs repeat each other.
SEEDED = {"seeded": ["privacy.seed=7"], "seeded again": ["privacy.seed=7"], "fresh key": []}


def start_commands(items: list[pytest.Function]) -> None:
    """Submits the main-job runs the selected tests check, when the session starts (tests/conftest.py)."""
    names = {item.originalname for item in items}
    if "test_module_entry_point_prints_summary" in names:
        _entry_point()
    if "test_seed_and_privacy_seed_repeat_the_main_job_bit_for_bit" in names:
        for key, overrides in SEEDED.items():
            _main_job(key, *overrides)


def test_module_entry_point_prints_summary() -> None:
    """Reference: `python -m lightning_dpzero.train` prints the metric and epsilon and writes summary.json. With an
    explicit privacy.seed, no file of the output directory (Hydra's .hydra/, the summary, logs, plot) holds the seed
    or the key it builds (tests/privacy/leaks.py)."""
    tmp_path, future = _entry_point()
    out = future.result()
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"\[lightning_dpzero\] val_loss=\d+\.\d+ after 3 steps, epsilon=.* \(target 8\)", out.stdout)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epsilon"] <= 8.0
    # the plot (matplotlib is optional: without it the run warns and writes no PNG) and the CSV log of the same run
    if _HAS_MATPLOTLIB:
        assert (tmp_path / "privacy_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "Warning" not in out.stderr, out.stderr  # nothing a user cannot act on (e.g. a missing TensorBoard)
    else:
        assert "matplotlib is not installed" in out.stderr and not (tmp_path / "privacy_curve.png").exists()
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["epsilon"]) for r in rows if r.get("epsilon")]
    assert logged and logged[-1] == pytest.approx(summary["epsilon"])  # the last step's epsilon
    assert "privacy.seed=<secret: not recorded>" in summary["overrides"]
    key = SecretKey.from_seed(SEED).to_bytes()
    assert_no_secrets([tmp_path], [str(SEED).encode(), *secret_needles(key, rank=0)])


def test_plot_records_logged_epsilon_and_metric_by_step(tmp_path) -> None:
    """Reference: the curve holds epsilon after each of the 3 steps (as dp-accounting gives) and the final val_loss."""
    from lightning_dpzero.callbacks import PrivacyCurvePlot

    plots: list[PrivacyCurvePlot] = []
    original = PrivacyCurvePlot.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plots.append(self)

    PrivacyCurvePlot.__init__ = spy  # type: ignore[method-assign]
    try:
        summary = run(_compose([*SMALL, "privacy=sigma1"]), root_dir=tmp_path)
    finally:
        PrivacyCurvePlot.__init__ = original  # type: ignore[method-assign]
    (plot,) = plots
    assert [step for step, _ in plot.epsilon] == [1, 2, 3]
    epsilons = [eps for _, eps in plot.epsilon]
    assert epsilons == sorted(epsilons) and epsilons[-1] == pytest.approx(summary["epsilon"])
    assert plot.values[-1] == (3, pytest.approx(summary["value"]))
    if _HAS_MATPLOTLIB:
        png = tmp_path / "privacy_curve.png"
        assert summary["plot"] == str(png) and png.stat().st_size > 0
    else:
        assert summary["plot"] is None


def _missing_package_logger(save_dir: str) -> None:
    raise ModuleNotFoundError("No module named 'not_installed'")


def test_logger_with_missing_package_is_skipped_with_a_warning(tmp_path) -> None:
    """Reference: a logger whose import fails is left out (with a warning); the CSV logger remains."""
    from omegaconf import OmegaConf

    from lightning_dpzero.train import _loggers

    node = OmegaConf.create(
        {
            "csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "name": "csv"},
            "missing": {"_target_": "tests.test_train._missing_package_logger"},
        }
    )
    with pytest.warns(UserWarning, match="skipping logger tests.test_train._missing_package_logger"):
        loggers = _loggers(node, tmp_path)
    assert [type(x).__name__ for x in loggers] == ["CSVLogger"] and loggers[0].save_dir == str(tmp_path)
    assert _loggers(None, tmp_path) is False


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


def test_make_private_example_trains_privately_with_the_strategy_line_only(capsys) -> None:
    """Reference: examples/make_private.py's module trains under "dp" (epsilon <= the default target 8)."""
    import runpy

    example = runpy.run_path(str(ROOT / "examples" / "make_private.py"))
    trainer = example["main"](["--steps", "4"])
    assert type(trainer.strategy).__name__ == "DPStrategy" and trainer.global_step == 4
    assert 0 < trainer.strategy.dp.epsilon() <= 8.0
    assert re.search(r"\[make_private\] val_acc=\d\.\d+ after 4 steps, epsilon=", capsys.readouterr().out)


def test_plot_without_matplotlib_warns_and_writes_nothing(tmp_path, monkeypatch) -> None:
    """Reference: with matplotlib unimportable the callback warns (naming the fix) and writes no file."""
    from lightning_dpzero.callbacks import PrivacyCurvePlot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    plot = PrivacyCurvePlot(tmp_path / "curve.png")
    plot.epsilon, plot.values = [(1, 0.5), (2, 0.7)], [(2, 2.3)]
    with pytest.warns(UserWarning, match="pip install matplotlib"):
        plot._plot(None)
    assert plot.written is None and not (tmp_path / "curve.png").exists()


def test_seed_and_privacy_seed_repeat_the_main_job_bit_for_bit() -> None:
    """Reference: the same run twice (seed: model and dropout; privacy.seed: noise and sampling) gives the same
    val_loss; without privacy.seed each run draws a new secret key, so the noise and the result differ."""
    value = {}
    for key, overrides in SEEDED.items():
        cwd, future = _main_job(key, *overrides)
        out = future.result()
        assert out.returncode == 0, out.stderr[-3000:]
        value[key] = json.loads((cwd / "summary.json").read_text())["value"]
    assert value["seeded again"] == value["seeded"]
    assert value["fresh key"] != value["seeded"]
