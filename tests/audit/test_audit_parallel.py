"""The one-run audit under ``dp_zero3`` on 2 CPU processes (gloo): one torchrun, three audits in the same ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_dpzero.accounting import epsilon_for
from lightning_dpzero.config import Accountant
from tests import _warm

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("parallel_worker.py")


def test_zero3_audit_below_claim_when_correct_and_above_when_one_rank_adds_no_noise(tmp_path) -> None:
    """Two correct audits (seeds 0, 1) stay below the claim; with the noise of rank 1's ZeRO-3 partition missing
    (every parameter, u included, is split over both ranks) the bound exceeds it. The claim is the accountant's
    epsilon for (sigma, q, T), recomputed here through epsilon_for."""
    args = ["zero3", str(tmp_path), "ok:0", "ok:1", "noise_on_rank_zero_only:2"]
    ranks = _warm.run_ranks(WORKER, args, timeout=300)
    assert ranks.ok, ranks.log[-4000:]
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
