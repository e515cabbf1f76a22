"""Zeroth-order DP under ``dp_ddp``, ``dp_zero3`` and ``dp_fsdp`` on 2 CPU processes (gloo), against the float64
oracle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_dpzero.config import _ZERO_NOISE_ENV, PruneSelection
from lightning_dpzero.zeroth_order import DirectionSampler
from lightning_dpzero.zeroth_order.pruning import select_coordinates, synflow_scores
from tests import _warm
from tests.privacy.leaks import assert_no_secrets, secret_needles
from tests.zeroth_order.reference import reference_differences, reference_directions, reference_update
from tests.zeroth_order.test_step import Task, net_loss
from tests.zeroth_order.zo_worker import settings

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("zo_worker.py")


def _torchrun(strategy: str, out: Path) -> list[dict]:
    ranks = _warm.run_ranks(WORKER, [strategy, str(out)], env={**os.environ, _ZERO_NOISE_ENV: "1"})
    assert ranks.ok, ranks.log[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp"])
def test_matches_single_process_reference(strategy: str, tmp_path: Path) -> None:
    """Reference: reference.py on the union of both ranks' Poisson samples (P = 2, two stages, proximal term), the
    per-example differences summed over the ranks, divided by B = qN; both ranks hold the same (gathered) weights
    after every step; with sigma > 0 only rank 0 draws noise and both ranks release the same g. dp_ddp builds no DDP
    wrapper (no gradient buckets); dp_zero3 builds DeepSpeed's parameter partitioning only (no ZeRO optimizer, so
    no fp32 master copy that could overwrite the in-place update of the partitions)."""
    ranks = _torchrun(strategy, tmp_path)
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["steps"] == ranks[1]["steps"] == 3
    if strategy == "ddp":
        assert {r["wrapped"] for r in ranks} == {"Task"}
    elif strategy == "zero3":
        assert {r["optimizer"] for r in ranks} == {"DeepSpeedZeRoOffload"}
    else:  # every parameter stays a DTensor shard; each rank holds its rows of the 135 coordinates
        names = {n for n, _ in Task().named_parameters()}
        assert all(set(r["sharded"]) == names for r in ranks)
        assert sorted(r["local_numel"] for r in ranks) == [64, 71]
    directions = DirectionSampler(ranks[0]["direction_seed"])
    assert ranks[1]["direction_seed"] == ranks[0]["direction_seed"]
    _assert_matches_reference(strategy, ranks, directions)
    # Pruned: SynFlow on the full weights (before ZeRO-3 / FSDP2 shard them), the same selection on both ranks, then
    # the same oracle with z on the kept coordinates; each rank updates the kept coordinates of its own shard.
    task = Task() if strategy != "zero3" else Task(dtype=torch.float32)  # DeepSpeed casts before the selection
    params = dict(task.named_parameters())
    kept = select_coordinates(
        synflow_scores(task, task.example_input_array, params), keep_fraction=0.3, select=PruneSelection.LOWEST
    )
    for rank in ranks:
        assert {n: i.tolist() for n, i in rank["pruned"]["kept"].items() if i.numel()} == {
            n: i.tolist() for n, i in kept.items() if i.numel()
        }
    _assert_matches_reference(
        strategy, [r["pruned"] for r in ranks], directions, kept={n.removeprefix("net."): i for n, i in kept.items()}
    )
    if strategy != "ddp":  # resumed from the sharded checkpoint of step 2: the same third step, bit for bit
        # the seed rebuilt the key; the checkpoint (each rank's partitions, the Lightning state) holds none of it
        assert_no_secrets([tmp_path / "ckpt"], [n for rk in (0, 1) for n in secret_needles(ranks[0]["key"], rank=rk)])
        for rank in ranks:
            assert rank["resumed"]["steps"] == 3 and len(rank["resumed"]["after"]) == 1
            for name, value in rank["after"][2].items():
                assert torch.equal(rank["resumed"]["after"][0][name], value), name
    assert [r["drew_noise"] for r in ranks] == [True, False]
    for g0, g1 in zip(ranks[0]["ghats"], ranks[1]["ghats"]):
        assert torch.equal(g0, g1)


def _assert_matches_reference(
    strategy: str, ranks: list[dict], directions: DirectionSampler, kept: dict[str, torch.Tensor] | None = None
) -> None:
    """Three steps of both ranks (same weights before each) against reference.py on the union of their batches."""
    zo = settings(strategy)
    loss = net_loss(Task().net)
    anchor = None
    for step in range(3):
        theta = ranks[0]["before"][step]
        for name in theta:
            assert torch.equal(ranks[1]["before"][step][name], theta[name])
        if step in (0, 1):
            anchor = {n: v.clone() for n, v in theta.items()}
        stage = min(step, 1)
        z = reference_directions(theta, directions, step=step, num_directions=2, kept=kept, name_prefix="net.")
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
                if strategy != "zero3":  # float64 model
                    torch.testing.assert_close(after, value, rtol=1e-9, atol=1e-12, msg=name)
                else:  # fp32 model: relative error of the update, as DESIGN.md's 1e-5 for fp32 gradients, plus the
                    # rounding of the weights to fp32 (half an ulp per coordinate; it dominates for small updates)
                    err, scale = (after - value).norm().item(), (value - theta[name]).norm().item()
                    ulp = torch.finfo(torch.float32).eps * value.norm().item()
                    assert err <= 1e-5 * scale + ulp, f"{name}: ||a - e|| = {err:.3g}, ||update|| = {scale:.3g}"
