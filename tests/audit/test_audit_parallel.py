"""The one-run audit under ``dp_zero3`` on 2 CPU processes (gloo): one torchrun, three audits in the same ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_dpzero.accounting import epsilon_for
from lightning_dpzero.config import Accountant

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("parallel_worker.py")


def test_zero3_audit_below_claim_when_correct_and_above_when_one_rank_adds_no_noise(tmp_path) -> None:
    """Two correct audits (seeds 0, 1) stay below the claim; with the noise of rank 1's ZeRO-3 partition missing
    (every parameter, u included, is split over both ranks) the bound exceeds it. The claim is the accountant's
    epsilon for (sigma, q, T), recomputed here through epsilon_for."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    cmd += ["zero3", str(tmp_path), "ok:0", "ok:1", "noise_on_rank_zero_only:2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's ranks would outlive it otherwise
        raise
    assert proc.returncode == 0, log[-4000:]
    audits = json.loads((tmp_path / "audits.json").read_text())
    assert [(a["variant"], a["world"]) for a in audits] == [
        ("ok", 2),
        ("ok", 2),
        ("noise_on_rank_zero_only", 2),
    ]
    for a in audits:
        print(a["variant"], a["seed"], a["claimed_epsilon"], a["epsilon_lower_bound"], a["best"])
        expected = epsilon_for([(1.15, a["sample_rate"], 50)], delta=1e-5, accountant=Accountant.RDP)
        assert a["steps"] == 50 and abs(a["claimed_epsilon"] - expected) < 1e-9 * expected
        if a["variant"] == "ok":
            assert 0.0 <= a["epsilon_lower_bound"] < a["claimed_epsilon"] and not a["violated"]
        else:
            assert a["violated"] and a["epsilon_lower_bound"] > a["claimed_epsilon"] + 1.0
