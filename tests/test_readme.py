"""The README's code runs as written, so that it cannot drift from the package.

- Every ```python block is executed in a fresh namespace, in a temporary directory. The blocks use tiny models and
  few steps, so they run unchanged.
- Every command of a ```bash block is classified: commands of this package (``python -m lightning_dpzero.train``,
  ``lightning-dpzero-train``, ``lightning-dpzero``, ``python -m lightning_dpzero.audit``, ``lightning-dpzero-audit``,
  ``python examples/...``) run in a subprocess with small sizes appended (see ``_small``) and must exit 0; the others
  are skipped with their reason (install, the test suite, several processes, a GPU, a download, benchmarks). A
  command that fits neither fails the test: classify it here.
- A ```yaml block whose first line is ``# <name>.yaml`` is written under that name next to the commands, so that
  ``lightning-dpzero fit --config run.yaml`` reads the README's own file.

The commands run two at a time (one torch thread each) while the tests wait for their results in order.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
import yaml

from tests import _warm
from tests.tasks.test_examples import TINY as EXAMPLE_SIZES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

HYDRA = ("python -m lightning_dpzero.train", "lightning-dpzero-train")
AUDIT = ("python -m lightning_dpzero.audit", "lightning-dpzero-audit")
CLI = ("lightning-dpzero ",)
EXAMPLE = ("python examples/",)
# Appended to every Hydra command (Hydra keeps the last value of a key, so these replace the README's values): 2
# logical steps on 256 examples, expected logical batches of 16 (q = 1/16), physical batches of 16. The run and sweep
# directories go to the test's temporary directory. LightningCLI commands get --trainer.max_steps=2, the examples
# --steps 2 and the small sizes of tests/tasks/test_examples.py; the audit also audit.num_canaries=16.
HYDRA_SMALL = [
    "trainer.max_steps=2",
    "task.data.num_train=256",
    "task.data.num_val=32",
    "task.data.batch_size=16",
    "privacy.physical_batch_size=16",
    "+trainer.enable_progress_bar=false",
]
SKIPS = [  # (reason, predicate on the command), the first match wins
    ("installs packages", lambda c: c.startswith("pip install")),
    ("the test suite itself", lambda c: c.startswith("python -m pytest")),
    ("benchmark script (minutes)", lambda c: "examples/benchmarks/" in c),
    ("several processes", lambda c: "torchrun" in c or re.search(r"devices[= ]?[2-9]", c) is not None),
    ("needs a GPU", lambda c: re.search(r"accelerator[= ]gpu|--device cuda", c) is not None),
    (
        "downloads or reads real data",
        lambda c: re.search(r"--download|download=true|--data[ =]|data\.root=", c) is not None,
    ),
]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


def _commands() -> list[str]:
    """Every command of the README's bash blocks: comments dropped, continuation lines joined."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s+#", line)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _skip_reason(command: str) -> str | None:
    return next((reason for reason, matches in SKIPS if matches(command)), None)


def _small(command: str, tmp: Path) -> list[str]:
    """The argv of ``command`` with small sizes appended (the only rewrite), or ValueError if it is not ours."""
    argv = shlex.split(command)
    if command.startswith(HYDRA + AUDIT):
        small = [*HYDRA_SMALL, f"hydra.run.dir={tmp / 'run'}", f"hydra.sweep.dir={tmp / 'sweep'}"]
        if command.startswith(AUDIT):
            small.append("audit.num_canaries=16")
        return [*_program(argv), *small]
    if command.startswith(CLI):
        if any(arg == "--help" or arg.endswith(".help") for arg in argv):
            return _program(argv)  # prints help and exits: nothing to make small
        small = ["--trainer.max_steps=2", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp}"]
        return [*_program(argv), *small]
    if command.startswith(EXAMPLE):
        script = argv[1]
        return [
            sys.executable,
            str(ROOT / script),
            *argv[2:],
            "--steps",
            "2",
            *EXAMPLE_SIZES.get(Path(script).name, []),
        ]
    raise ValueError(command)


def _program(argv: list[str]) -> list[str]:
    """``python`` is this interpreter; a console script is the one installed beside it."""
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    installed = Path(sys.executable).parent / argv[0]
    return [str(installed) if installed.exists() else (shutil.which(argv[0]) or argv[0]), *argv[1:]]


def _command_params() -> list:
    params = []
    for i, command in enumerate(_commands()):
        reason = _skip_reason(command)
        if reason is None and not command.startswith(HYDRA + AUDIT + CLI + EXAMPLE):
            reason = "UNCLASSIFIED"  # fails in the test below
            params.append(pytest.param(command, reason, id=f"{i}-{command[:60]}"))
        elif reason is not None:
            marks = pytest.mark.skip(reason=f"{reason}: {command}")
            params.append(pytest.param(command, reason, id=f"{i}-{command[:60]}", marks=marks))
        else:
            params.append(pytest.param(command, None, id=f"{i}-{command[:60]}"))
    return params


def _yaml_files() -> dict[str, str]:
    """The README's yaml blocks headed ``# <name>.yaml``: name -> text."""
    files = {}
    for block in _blocks("yaml"):
        first = block.splitlines()[0]
        if match := re.fullmatch(r"#\s*([\w.-]+\.ya?ml)\s*", first):
            files[match.group(1)] = block
    return files


def _prepared(command: str, tmp: Path) -> tuple[list[str], dict]:
    """The command's argv and where it runs: a folder holding the README's yaml files, this checkout on the path."""
    for name, text in _yaml_files().items():
        (tmp / name).write_text(text)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return _small(command, tmp), {"cwd": tmp, "env": env}


_STARTED: dict[str, Future] = {}


def start_commands(items: list[pytest.Function]) -> None:
    """Submits every selected runnable command when the session starts (tests/conftest.py); the tests wait for
    theirs."""
    for item in items:
        if item.originalname == "test_readme_command_runs" and item.callspec.params["reason"] is None:
            command = item.callspec.params["command"]
            if command not in _STARTED:
                argv, where = _prepared(command, _warm.workdir("readme"))
                _STARTED[command] = _warm.submit(argv, **where, timeout=300)


def test_the_readme_has_code_to_test() -> None:
    """Reference: the README shows Python, runnable commands and the CLI's run.yaml."""
    assert _blocks("python") and any(p.values[1] is None for p in _command_params())
    assert "run.yaml" in _yaml_files() and "--config run.yaml" in README


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_runs(index: int, tmp_path, monkeypatch) -> None:
    """Reference: the block runs unchanged in a fresh namespace."""
    code = _blocks("python")[index]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": f"readme_block_{index}"})


def test_readme_yaml_files_parse() -> None:
    for name, text in _yaml_files().items():
        assert isinstance(yaml.safe_load(text), dict), name


@pytest.mark.parametrize(("command", "reason"), _command_params())
def test_readme_command_runs(command: str, reason: str | None, request) -> None:
    """Reference: the command exits 0 with small sizes appended; the main job prints the line the README explains."""
    assert reason is None, f"README command {command!r} is neither runnable nor skipped: classify it in {__file__}"
    start_commands([request.node])  # submitted already when the session started
    out = _STARTED[command].result()
    assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    if command == "python -m lightning_dpzero.train":
        shown = re.search(r"^\[lightning_dpzero\] val_loss=.*$", README, re.M).group(0)
        shape = re.sub(r"\d+", r"\\d+", re.escape(shown))
        assert re.search(shape, out.stdout), (shown, out.stdout[-2000:])


def test_every_refused_input_names_a_test_that_exists() -> None:
    """Reference: the "Refused inputs" table's third column; each `file.py::name` (a `*` matches like a glob) is a
    test function defined in that file under tests/, each bare `file.py` exists. A renamed test fails here."""
    import fnmatch

    section = README.split("## Refused inputs", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line.rsplit("|", 2)[1]]
    assert len(rows) >= 20
    missing = []
    for row in rows:
        current: Path | None = None
        for ref in re.findall(r"`([^`]+)`", row.rsplit("|", 2)[1]):
            if ref.startswith("[") or ".py" not in ref:
                continue  # another parameter of the test just named, or a setting
            path, _, name = ref.partition("::")
            current = ROOT / "tests" / path
            if not current.is_file():
                missing.append(ref)
                continue
            if name:
                defined = re.findall(r"^def (test_\w+)", current.read_text(), re.M)
                if not fnmatch.filter(defined, name.split("[")[0]):
                    missing.append(ref)
    assert not missing, missing
