"""Zeroth-order DP under ``dp_ddp`` and ``dp_zero3`` on 2 CPU processes (gloo), against the float64 oracle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_dpzero.config import _ZERO_NOISE_ENV
from lightning_dpzero.zeroth_order import DirectionSampler
from tests.zeroth_order.reference import reference_differences, reference_directions, reference_update
from tests.zeroth_order.test_step import Task, net_loss
from tests.zeroth_order.zo_worker import settings

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("zo_worker.py")


def _torchrun(strategy: str, out: Path) -> list[dict]:
    env = {**os.environ, _ZERO_NOISE_ENV: "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    proc = subprocess.Popen(
        [*cmd, strategy, str(out)],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's ranks would outlive it otherwise
        raise
    assert proc.returncode == 0, log[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_matches_single_process_reference(strategy: str, tmp_path: Path) -> None:
    """Reference: reference.py on the union of both ranks' Poisson samples (P = 2, two stages, proximal term), the
    per-example differences summed over the ranks, divided by B = qN; both ranks hold the same (gathered) weights
    after every step; with sigma > 0 only rank 0 draws noise and both ranks release the same g. dp_ddp builds no DDP
    wrapper (no gradient buckets); dp_zero3 builds DeepSpeed's parameter partitioning only (no ZeRO optimizer, so
    no fp32 master copy that could overwrite the in-place update of the partitions)."""
    ranks = _torchrun(strategy, tmp_path)
    zo = settings(strategy)
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["steps"] == ranks[1]["steps"] == 3
    if strategy == "ddp":
        assert {r["wrapped"] for r in ranks} == {"Task"}
    else:
        assert {r["optimizer"] for r in ranks} == {"DeepSpeedZeRoOffload"}
    directions = DirectionSampler(ranks[0]["direction_seed"])
    assert ranks[1]["direction_seed"] == ranks[0]["direction_seed"]
    loss = net_loss(Task().net)
    anchor = None
    for step in range(3):
        theta = ranks[0]["before"][step]
        for name in theta:
            assert torch.equal(ranks[1]["before"][step][name], theta[name])
        if step in (0, 1):
            anchor = {n: v.clone() for n, v in theta.items()}
        stage = min(step, 1)
        z = reference_directions(theta, directions, step=step, num_directions=2, name_prefix="net.")
        batches = [b for r in ranks for b in r["batches"][step][0]]
        masks = [m for r in ranks for m in r["batches"][step][1]]
        diffs = reference_differences(theta, z, batches, masks, beta=zo["perturbation_scale"][stage], loss_fn=loss)
        expected, _ = reference_update(
            theta,
            z,
            diffs,
            clip_norm=1.0,
            expected_batch_size=8.0,
            lr=zo["learning_rate"][stage],
            lam=zo["proximal_weight"][stage],
            anchor=anchor,
        )
        for rank in ranks:
            for name, value in expected.items():
                after = rank["after"][step][name]
                if strategy == "ddp":  # float64 model
                    torch.testing.assert_close(after, value, rtol=1e-9, atol=1e-12, msg=name)
                else:  # fp32 model: relative error of the update, as DESIGN.md's 1e-5 for fp32 gradients
                    err, scale = (after - value).norm().item(), (value - theta[name]).norm().item()
                    assert err <= 1e-5 * scale, f"{name}: ||a - e|| = {err:.3g}, ||update|| = {scale:.3g}"
    assert [r["drew_noise"] for r in ranks] == [True, False]
    for g0, g1 in zip(ranks[0]["ghats"], ranks[1]["ghats"]):
        assert torch.equal(g0, g1)
