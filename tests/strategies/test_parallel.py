"""``dp_ddp`` and ``dp_zero1/2/3`` on 2 CPU processes (gloo), against the single-process float64 reference."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch

from lightning_dpzero.config import _ZERO_NOISE_ENV
from tests import _warm
from tests.privacy.leaks import assert_no_secrets, secret_needles
from tests.reference import reference_clipped_sum
from tests.strategies.test_dp_strategy import Net, per_example_loss

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("parallel_worker.py")
STRATEGIES = ["ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp_own"]


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = 1e-5) -> None:
    """Relative error of the whole tensor, ||a - e|| <= rtol ||e||, with an fp32 floor of 1e-7 per coordinate."""
    err, scale = (actual - expected).norm().item(), expected.norm().item()
    assert err <= rtol * scale + 1e-7 * expected.numel() ** 0.5, f"{name}: ||a - e|| = {err:.3g}, ||e|| = {scale:.3g}"


def _torchrun(strategy: str, mode: str, out: Path, expect_failure: bool = False) -> list[dict]:
    ranks = _warm.run_ranks(WORKER, [strategy, mode, str(out)], env={**os.environ, _ZERO_NOISE_ENV: "1"})
    if expect_failure:  # rank 1 killed itself; rank 0 was stopped (or failed on the lost peer), not more
        assert ranks.codes[1] == -signal.SIGKILL and ranks.codes[0] != 0, ranks.log[-4000:]
        return []
    assert ranks.ok, ranks.log[-4000:]
    return (
        [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
        if mode in ("oracle", "bf16", "noise")
        else []
    )


OFFLOAD = [
    "zero2_offload",
    "zero3_offload",
    "zero3_offload_params",
    "fsdp_offload",
    "zero2_dsopt",
    "zero3_offload_dsopt",
]
# The noise goes through the same wrapper with and without parameter offload, and at every stage once the optimizer
# comes from the DeepSpeed config: one run each of those keeps the suite short.
OFFLOAD_NOISE = ["zero2_offload", "zero3_offload", "fsdp_offload", "zero3_offload_dsopt"]


@pytest.mark.parametrize("strategy", [*STRATEGIES, "zero3_buffered", "fsdp_buffered", *OFFLOAD, "zero3_few", "ddp_few"])
def test_gradient_matches_single_process_reference(strategy: str, tmp_path) -> None:
    """Reference: tests/reference.py on the union of both ranks' Poisson samples, divided by B = qN. dp_zero3 and
    dp_fsdp stream each physical batch's clipped sums into the reduce-scatter (default) or, "_buffered", sum them in a
    full-size buffer and reduce-scatter once per logical step. "_offload": DeepSpeed's optimizer offload (the noise is
    added to the fp32 partitions on the CPU, where the optimizer steps; "_params": the parameters offloaded too; at
    "fsdp", FSDP2's CPUOffloadPolicy). "_dsopt": the optimizer in the DeepSpeed config, built by DeepSpeed, the noise
    added before its step. "_few": physical_batch_shapes="few" (last physical batches of 1, 2 or 3 rows, which differ
    between the ranks)."""
    ranks = _torchrun(strategy, "oracle", tmp_path)
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 8
    sizes = {len(m) for r in ranks for step in r["batches"] for m in step[1]}
    assert sizes == {3} if not strategy.endswith("_few") else sizes > {3}, sizes
    empty_rank_steps = 0
    for step in range(8):
        grads = [r["grads"][step] for r in ranks]
        model = Net()
        model.load_state_dict(ranks[0]["models"][step])
        for name, value in ranks[1]["models"][step].items():
            torch.testing.assert_close(value, ranks[0]["models"][step][name], rtol=0, atol=0)  # ranks agree
        physical = [pb for r in ranks for pb in r["batches"][step][0]]
        masks = [m for r in ranks for m in r["batches"][step][1]]
        assert len(ranks[0]["batches"][step][0]) == len(ranks[1]["batches"][step][0])  # same physical count
        empty_rank_steps += sum(not any(m.any() for m in r["batches"][step][1]) for r in ranks)
        inputs = tuple(torch.cat([pb[i] for pb in physical]) for i in range(3))
        expected = reference_clipped_sum(
            model, per_example_loss, inputs, torch.cat(masks), clip_norm=0.3, style="all-layer", function="automatic"
        )
        for name, value in expected.items():
            for g in grads:
                _assert_rel_close(g[name].double(), value / 4.0, name)
            if step == 0:  # the update the optimizer applied (SGD): checks the W and 1/B scaling after the reduction
                for r in ranks:
                    _assert_rel_close(r["updates"][0][name].double(), value / 4.0, name, rtol=1e-4)
    assert empty_rank_steps > 0, "the seed should give at least one step where a rank samples nothing"
    # and a step with several physical batches (dp_zero3 / dp_fsdp reduce-scatter each one and accumulate)
    assert any(len(ranks[0]["batches"][step][0]) > 1 for step in range(8))
    # Every clipping style under every strategy: layer-wise (groups clipped, and under dp_zero3 / dp_fsdp streamed,
    # during the per-example backward) and group-wise (2 contiguous groups of modules), 3 steps each.
    for style, groups in (("layer-wise", None), ("group-wise", 2)):
        runs = [r["styles"][style] for r in ranks]
        for step in range(3):
            model = Net()
            model.load_state_dict(runs[0]["models"][step])
            physical = [pb for r in runs for pb in r["batches"][step][0]]
            masks = torch.cat([m for r in runs for m in r["batches"][step][1]])
            inputs = tuple(torch.cat([pb[i] for pb in physical]) for i in range(3))
            expected = reference_clipped_sum(
                model, per_example_loss, inputs, masks, clip_norm=0.3, style=style, function="automatic", groups=groups
            )
            for name, value in expected.items():
                for r in runs:
                    _assert_rel_close(r["grads"][step][name].double(), value / 4.0, f"{style} {name}")


@pytest.mark.parametrize("strategy", [*STRATEGIES, *OFFLOAD_NOISE])
def test_noise_is_drawn_once_per_coordinate(strategy: str, tmp_path) -> None:
    """Reference: noise std sigma*C/B over the whole gradient, identical on both ranks (not W times the draws)."""
    ranks = _torchrun(strategy, "noise", tmp_path)
    flat = [torch.stack([torch.cat([g[k].flatten() for k in sorted(g)]) for g in r["updates"]]) for r in ranks]
    noise = flat[0]
    torch.testing.assert_close(noise, flat[1], rtol=0, atol=0)
    expected = 2.0 * 0.5 / 16
    bound = 6.0 / math.sqrt(2 * noise.numel())
    rel = noise.std().item() / expected - 1.0
    print(f"std rel. error {rel:.4f}, bound {bound:.4f}")
    assert abs(rel) < bound
    half = noise.shape[1] // 2  # the two ranks' shares come from different streams: uncorrelated
    corr = torch.corrcoef(torch.stack([noise[0, :half], noise[0, half : 2 * half]]))[0, 1].item()
    assert abs(corr) < 6 / math.sqrt(half)


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3", "fsdp"])
def test_checkpoints_hold_no_secret_and_resume_draws_fresh_noise(strategy: str, tmp_path) -> None:
    """Reference: tests/privacy/leaks.py. Every file of every checkpoint (full and weights-only, every step, each
    rank's DeepSpeed / FSDP shards) is read for the run's key and its streams' key material and walked for generator
    states; then whoever resumes from the checkpoint after step 1 (here: a new Trainer, as the file's holder would)
    must draw other noise for steps 1 and 2 than the run did. The accountant continues (1 + 5 steps) on each rank's
    own streams of one shared key."""
    out = tmp_path / "run"
    out.mkdir()
    _torchrun(strategy, "resume", out)
    ranks = [torch.load(tmp_path / f"run-resume{r}.pt", weights_only=False) for r in range(2)]
    needles = [n for record in ranks for n in secret_needles(record["key"], record["rank"])]
    scanned = assert_no_secrets([out / "full", out / "weights"], needles)
    print(f"{scanned} files scanned")
    for rank, record in enumerate(ranks):
        assert record["history"] == [(1.0, 0.2, 6)]
        assert record["rank"] == record["noise_rank"] == rank
        assert record["resumed_key"] != record["key"]  # a fresh key on resume: new, independent noise
        for step in (1, 2):
            draws = sorted(d for (t, d) in record["original_noise"] if t == step)
            assert draws, record["original_noise"].keys()
            a = torch.cat([record["original_noise"][(step, d)] for d in draws])
            b = torch.cat([record["resumed_noise"][(step, d)] for d in draws])
            assert not torch.equal(a, b)
            if a.numel() >= 16:
                assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 6 / math.sqrt(a.numel())
    assert ranks[0]["key"] == ranks[1]["key"] and ranks[0]["resumed_key"] == ranks[1]["resumed_key"]


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3", "fsdp"])
def test_bf16_gradient_within_bf16_tolerance_of_reference(strategy: str, tmp_path) -> None:
    """DPPrecision("bf16-mixed"): autocast (ddp), DeepSpeed bf16 (zero1/2/3), FSDP2's policy (fsdp); fp32 clipping."""
    ranks = _torchrun(strategy, "bf16", tmp_path)
    assert {r["precision"] for r in ranks} == {"bf16-mixed"}
    assert {r["compute_dtype"] for r in ranks} == {"torch.bfloat16"}  # the forward really ran in bf16
    for step in range(4):
        model = Net()
        model.load_state_dict(ranks[0]["models"][step])
        physical = [pb for r in ranks for pb in r["batches"][step][0]]
        masks = torch.cat([m for r in ranks for m in r["batches"][step][1]])
        inputs = tuple(
            torch.cat([pb[i].float() if pb[i].is_floating_point() else pb[i] for pb in physical]) for i in range(3)
        )
        expected = reference_clipped_sum(
            model, per_example_loss, inputs, masks, clip_norm=0.3, style="all-layer", function="automatic"
        )
        flat_expected = torch.cat([v.flatten() for v in expected.values()]) / 4.0
        for r in ranks:
            flat = torch.cat([r["grads"][step][name].double().flatten() for name in expected])
            # bf16 keeps 8 bits of mantissa: 4e-3 relative error per rounding; measured 2-5e-3 here, allowed 2e-2
            _assert_rel_close(flat, flat_expected, f"step {step}", rtol=2e-2)


def test_killed_run_resumes_with_identical_accounting_and_continued_streams(tmp_path) -> None:
    """A 2-process dp_ddp run whose rank 1 is SIGKILLed in step 4 resumes from its last checkpoint (step 3).
    Reference: the same run uninterrupted. With a zero-gradient model and lr 1 the final weights are minus the sum of
    the six steps' noise: equal weights mean each rank's noise stream continued exactly (not restarted, not skipped);
    the accountant history is the uninterrupted one; the sampler resumed from its checkpointed state."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir(), crashed.mkdir()
    _torchrun("ddp", "straight", straight)
    _torchrun("ddp", "crash", crashed, expect_failure=True)
    assert (crashed / "ckpts" / "last.ckpt").exists()
    _torchrun("ddp", "recover", crashed)
    for rank in range(2):
        ref = torch.load(straight / f"straight{rank}.pt", weights_only=False)
        got = torch.load(crashed / f"recover{rank}.pt", weights_only=False)
        assert [tuple(e) for e in got["saved"]["accountant"]["history"]] == [(1.0, 16 / 64, 3)]  # 3 steps done
        assert got["history"] == ref["history"] == [(1.0, 16 / 64, 6)]
        assert got["steps"] == 6
        for name, value in ref["weights"].items():
            torch.testing.assert_close(got["weights"][name], value, rtol=0, atol=1e-7)


def test_dp_zero3_exchanges_the_same_collectives_as_nonprivate_zero3(tmp_path) -> None:
    """Reference: Lightning's non-private ZeRO-3 on the same model, one forward and backward per step. Per training
    step, dp_zero3 makes the same collectives (all-gathers of parameters, the gradient reduce-scatter, DeepSpeed's
    scalar all-reduce) with the same bytes: the per-example clipping adds no communication and no extra gather."""
    _torchrun("zero3", "comms", tmp_path)
    for rank in range(2):
        record = torch.load(tmp_path / f"comms{rank}.pt", weights_only=False)
        assert len(record["dp"]) == len(record["nonprivate"]) == 3

        def summary(step: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
            ops: dict[str, tuple[int, int]] = {}
            for name, size in step:
                count, total = ops.get(name, (0, 0))
                ops[name] = (count + 1, total + size)
            return ops

        for dp_step, ref_step in zip(record["dp"], record["nonprivate"]):
            assert summary(dp_step) == summary(ref_step)
            gathered = summary(ref_step)["all_gather_into_tensor"]
            assert gathered[0] > 0 and gathered[1] > 0 and summary(ref_step)["reduce_scatter_tensor"][1] > 0


# tests/clipping/test_transformers.py's MODELS (not imported here: transformers is optional)
_HF_MODELS = ("gpt2", "llama", "opt", "bert", "vit", "t5", "torch_transformer", "torch_sequence_first")


@pytest.mark.parametrize(
    ("model_name", "strategy"),
    [(m, s) for m in _HF_MODELS for s in ("ddp", "zero3", "fsdp")] + [("gpt2_checkpointed", "zero3")],
)
def test_transformers_models_match_the_reference_on_two_processes(model_name: str, strategy: str, tmp_path) -> None:
    """Reference: tests/reference.py on the union of both ranks' Poisson samples (Abadi, C = 0.3), divided by
    B = 8: transformers' GPT-2 (Conv1D, positions computed once, a tied head) and Llama (LlamaRMSNorm through the
    torch.func fallback, on the parameters ZeRO-3 or FSDP2 gathered for the backward), unchanged.
    "gpt2_checkpointed": the same GPT-2 with transformers' activation checkpointing (non-reentrant) on every block,
    recomputed in the backward with ZeRO-3 gathering the parameters again; the reference has no checkpointing.
    "t5": T5 (T5LayerNorm through the fallback, encoder and decoder, two layers each) with its relative attention
    bias trained: computed once per stack, reused by both layers, split per example where it meets the scores.
    "torch_transformer": Lightning's demo ``nn.Transformer`` (batch_first ``nn.MultiheadAttention`` through the
    fallback, on parameters ZeRO-3 or FSDP2 gathered, a causal mask). "torch_sequence_first": an
    ``nn.TransformerEncoder`` with ``batch_first=False`` on [T, n, E] (every layer's examples in dim 1). "vit": ViT,
    whose ``ViTEmbeddings`` takes the fallback for its raw class token and position embeddings and calls a patch
    convolution inside: FSDP2 shards that subtree as one group, and under ZeRO-3 the recompute gathers the
    convolution's parameters itself."""
    pytest.importorskip("transformers")
    from tests.clipping.test_transformers import MODELS

    build, loss_fn, _ = MODELS[model_name.removesuffix("_checkpointed")]
    _torchrun(strategy, f"hf-{model_name}", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    if model_name.endswith("_checkpointed"):  # every block's forward went through a non-reentrant checkpoint
        assert all(r["checkpointed"] and set(r["checkpointed"]) == {False} for r in ranks)
    for step in range(2):
        model = build()
        model.load_state_dict(ranks[0]["models"][step], strict=False)  # a tied head is stored once
        physical = [pb for r in ranks for pb in r["batches"][step][0]]
        masks = torch.cat([m for r in ranks for m in r["batches"][step][1]])
        inputs = tuple(torch.cat([pb[i] for pb in physical]) for i in range(len(physical[0])))
        expected = reference_clipped_sum(model, loss_fn, inputs, masks, clip_norm=0.3, style="all-layer",
                                         function="abadi")  # fmt: skip
        for name, value in expected.items():
            for r in ranks:
                _assert_rel_close(r["grads"][step][name].double(), value / 8.0, f"{model_name} {name}")
