"""The tests' warm launcher (tests/_warm.py) starts a command as ``python`` would: the same argv, working directory,
environment, ``sys.path``, exit status and streams as a cold interpreter, and torchrun's rank environment."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import _warm

PROBE = """\
import json, os, sys, warnings
import probe_helper
print(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
    "secret": os.environ.get("WARM_PROBE"), "absent": "WARM_PROBE_ABSENT" in os.environ,
    "helper": probe_helper.__file__, "site": os.environ.get("SITE_RAN"),
    "ignored": warnings.filters[0][0], "rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE"),
}))
print("to stderr", file=sys.stderr)
if os.environ.get("RANK") == "1" and sys.argv[1] == "kill":
    os.kill(os.getpid(), 9)
if os.environ.get("RANK") == "0" and sys.argv[1] == "kill":
    import time
    time.sleep(60)  # stopped by the launcher once rank 1 died
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
"""


@pytest.fixture
def probe(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    scripts, site, work = tmp_path / "scripts", tmp_path / "site", tmp_path / "work"
    for folder in (scripts, site, work):
        folder.mkdir()
    (scripts / "probe.py").write_text(PROBE)
    (scripts / "probe_helper.py").write_text("")  # importable because the script's folder is sys.path[0]
    (site / "sitecustomize.py").write_text("import os\nos.environ['SITE_RAN'] = 'yes'\n")
    env = {"PATH": "/usr/bin:/bin", "WARM_PROBE": "s3", "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}
    return scripts / "probe.py", work, env


def _cold(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_a_script_sees_what_a_cold_interpreter_gives_it(probe) -> None:
    """Reference: the same command line run by a plain ``subprocess.run([python, ...])``."""
    script, work, env = probe
    warm = _warm.run([str(script), "a b", "3"], cwd=work, env=env, timeout=60)
    cold = _cold([str(script), "a b", "3"], work, env)
    assert (warm.returncode, warm.stderr) == (cold.returncode, cold.stderr) == (3, "to stderr\n")
    assert json.loads(warm.stdout) == json.loads(cold.stdout)
    seen = json.loads(warm.stdout)
    assert seen["cwd"] == str(work) and seen["path0"] == str(script.parent) and seen["name"] == "__main__"
    assert (seen["secret"], seen["absent"], seen["site"], seen["ignored"]) == ("s3", False, "yes", "ignore")


def test_a_module_runs_as_main_from_the_working_directory(probe) -> None:
    """Reference: ``python -m probe`` from the script's folder, cold."""
    script, _, env = probe
    warm = _warm.run(["-m", "probe", "x"], cwd=script.parent, env=env, timeout=60)
    cold = _cold(["-m", "probe", "x"], script.parent, env)
    assert warm.returncode == cold.returncode == 0
    assert json.loads(warm.stdout) == json.loads(cold.stdout)
    assert json.loads(warm.stdout)["argv"] == [str(script), "x"]


def test_a_timeout_kills_the_command_and_raises(probe, tmp_path: Path) -> None:
    sleeper = tmp_path / "sleep.py"
    sleeper.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired) as info:
        _warm.run([str(sleeper)], timeout=1)
    assert info.value.output == "started\n"


@pytest.mark.distributed
def test_ranks_get_torchruns_environment_and_a_dead_rank_stops_the_others(probe) -> None:
    """Reference: torchrun sets RANK and WORLD_SIZE per rank; when one rank dies (here SIGKILL), it stops the rest."""
    script, _, env = probe
    ok = _warm.run_ranks(script, ["fine"], env=env, timeout=60)
    assert ok.codes == [0, 0] and ok.log.count('"world": "2"') == 2
    assert '"rank": "0"' in ok.log and '"rank": "1"' in ok.log
    dead = _warm.run_ranks(script, ["kill"], env=env, timeout=60)
    assert dead.codes == [-signal.SIGTERM, -signal.SIGKILL], dead.log
    assert "rank 1 (ended by SIGKILL)" in dead.log
