"""RMSNorm and InstanceNorm settings the LAYER_CASES models do not reach: torch's default eps per dtype, and
InstanceNorm in eval mode with tracked statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_dpzero.clipping.engine as engine_module
from lightning_dpzero.clipping.rules.norm import instance_norm_rule, rms_norm_rule
from tests.clipping.test_engine import assert_matches, run_engine
from tests.conftest import N_EXAMPLES, default_mask, squared_error
from tests.reference import reference_clipped_sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_rms_norm_default_eps_follows_torch(dtype: torch.dtype) -> None:
    """Reference: per-example autograd through nn.RMSNorm(eps=None) in ``dtype``; inputs small enough (mean x^2 ~
    1e-7) that the eps torch picks (fp32's for bf16 inputs, fp64's for fp64) changes the gradient."""
    torch.manual_seed(0)
    norm = nn.RMSNorm(4, dtype=dtype)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(4, dtype=dtype))
    x = (3e-4 * torch.randn(3, 2, 4)).to(dtype)
    grad = torch.randn(3, 2, 4).to(dtype)
    expected = torch.stack(
        [torch.autograd.grad(norm(x[i : i + 1]), norm.weight, grad[i : i + 1])[0] for i in range(3)]
    ).float()
    (got,) = rms_norm_rule(norm, x, grad, {"weight": "weight"})
    tol = 2e-2 if dtype is torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.left, expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_instance_norm_in_eval_mode_uses_running_statistics() -> None:
    """Reference: reference_clipped_sum with an eval-mode InstanceNorm2d(track_running_stats=True) in the model."""
    torch.manual_seed(1)
    norm = nn.InstanceNorm2d(3, affine=True, track_running_stats=True).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.add_(0.3 * torch.randn(3))
    model = nn.Sequential(nn.Conv2d(2, 3, 3), norm, nn.Tanh(), nn.Flatten(), nn.Linear(27, 2))
    inputs = (torch.randn(N_EXAMPLES, 2, 5, 5), torch.randn(N_EXAMPLES, 2))
    mask = default_mask()
    expected = reference_clipped_sum(
        model, squared_error, inputs, mask, clip_norm=0.5, style="param-wise", function="abadi"
    )
    got, _ = run_engine(
        model, squared_error, [(inputs, mask)], clip_norm=0.5, clipping_style="param-wise", clipping_function="abadi"
    )
    assert_matches(got, expected, 0.5)
    # and the rule itself: eval-mode statistics are the running ones, not the example's own
    x, grad = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    weight = {c.param: c.left for c in instance_norm_rule(norm, x, grad, {"weight": "w", "bias": "b"})}["w"]
    x_hat = (x - norm.running_mean.view(1, 3, 1, 1)) / (norm.running_var.view(1, 3, 1, 1) + norm.eps).sqrt()
    torch.testing.assert_close(weight, (x_hat * grad).sum((2, 3)))


class _Norms(nn.Module):
    """Every normalisation rule on inputs with positions: LayerNorm and RMSNorm over [n, T, D], GroupNorm and
    InstanceNorm over [n, C, H, W]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.group = nn.GroupNorm(2, 4)
        self.instance = nn.InstanceNorm2d(4, affine=True)
        self.layer = nn.LayerNorm(4)
        self.rms = nn.RMSNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        # InstanceNorm before GroupNorm: torch's own CPU backward of InstanceNorm's affine parameters (the reference)
        # is wrong when its output gradient arrives transposed (finite differences agree with this engine instead)
        h = self.group(torch.tanh(self.instance(self.conv(x))))  # [n, 4, 5, 5]
        h = self.rms(torch.tanh(self.layer(h.flatten(2).transpose(1, 2))))  # [n, 25, 4]
        return self.head(h.mean(1))


def _statistics_seen(monkeypatch, statistics: str) -> list[tuple[type, bool]]:
    """Make the engine read the norm layers' forward statistics (``saved``) or not (``recomputed``); returns the
    (layer type, whether they were at hand) of each read."""
    seen: list[tuple[type, bool]] = []
    read = engine_module.forward_statistics

    def spy(module: nn.Module, output: torch.Tensor):
        found = read(module, output) if statistics == "saved" else None
        seen.append((type(module), found is not None))
        return found

    monkeypatch.setattr(engine_module, "forward_statistics", spy)
    return seen


@pytest.mark.parametrize("statistics", ["saved", "recomputed"])
def test_norm_rules_normalise_a_few_examples_at_a_time(monkeypatch, statistics) -> None:
    """Reference: reference_clipped_sum, with the rules' chunk (norm._CHUNK) small enough that each normalises
    one or two examples at a time (the default normalises these small inputs at once); LayerNorm and GroupNorm
    with the statistics their forward saved, and recomputing them."""
    import lightning_dpzero.clipping.rules.norm as norm_module

    seen = _statistics_seen(monkeypatch, statistics)
    monkeypatch.setattr(norm_module, "_CHUNK", 150)  # 100 values per example here: 1 example per chunk
    torch.manual_seed(2)
    model = _Norms()
    with torch.no_grad():
        for module in (model.group, model.instance, model.layer, model.rms):
            module.weight.add_(0.3 * torch.randn_like(module.weight))
    inputs = (torch.randn(N_EXAMPLES, 2, 5, 5), torch.randn(N_EXAMPLES, 2))
    mask = default_mask()
    expected = reference_clipped_sum(model, squared_error, inputs, mask, clip_norm=0.5, style="all-layer",
                                     function="abadi")  # fmt: skip
    got, _ = run_engine(model, squared_error, [(inputs, mask)], clip_norm=0.5, clipping_function="abadi")
    assert_matches(got, expected, 0.5)
    if statistics == "saved":
        assert {(nn.LayerNorm, True), (nn.GroupNorm, True)} <= set(seen)


class _SequenceFirstLayerNorm(nn.Module):
    """A LayerNorm on [T, n, D] (the examples in dim 1) with T == n: the statistics its forward saved, [T, n, 1],
    have the shape of examples-first ones, [n, T, 1], but not their order."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # [n, T, 3]
        h = self.norm(torch.tanh(self.proj(x)).transpose(0, 1))  # [T, n, 4]
        return self.head(h.transpose(0, 1).mean(1))


@pytest.mark.parametrize("batches", [1, 2])
def test_layer_norm_statistics_of_a_sequence_first_input_are_not_taken_for_examples_first(monkeypatch, batches):
    """Reference: reference_clipped_sum over ``batches`` physical batches (the second is not watched)."""
    seen = _statistics_seen(monkeypatch, "saved")
    torch.manual_seed(3)
    model = _SequenceFirstLayerNorm()
    with torch.no_grad():
        model.norm.weight.add_(0.3 * torch.randn(4))
    inputs = (torch.randn(N_EXAMPLES, N_EXAMPLES, 3), torch.randn(N_EXAMPLES, 2))
    mask = default_mask()
    expected = reference_clipped_sum(model, squared_error, inputs, mask, clip_norm=0.5, style="all-layer",
                                     function="abadi")  # fmt: skip
    got, _ = run_engine(model, squared_error, [(inputs, mask)] * batches, clip_norm=0.5, clipping_function="abadi")
    assert_matches(got, {k: v * batches for k, v in expected.items()}, 0.5)
    assert (nn.LayerNorm, True) not in seen


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
def test_group_norm_takes_torch_backward_kernel_on_contiguous_tensors(monkeypatch, layout) -> None:
    """Reference: reference_clipped_sum. With its forward's statistics and contiguous input and output gradient, a
    GroupNorm's per-example weight and bias gradients come from torch's backward kernel (the batch as one example of
    n C channels); a channels-last input takes the normalise-and-sum chunks. Both exact."""
    import lightning_dpzero.clipping.rules.norm as norm_module

    calls = []
    kernel = norm_module.group_norm_affine_gradients

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(norm_module, "group_norm_affine_gradients", spy)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(36, 2))
    with torch.no_grad():
        model[1].weight.add_(0.3 * torch.randn(4))
    x = (torch.randn(N_EXAMPLES, 2, 5, 5) * 2 + 1).contiguous(memory_format=layout)
    inputs, mask = (x, torch.randn(N_EXAMPLES, 2)), default_mask()
    expected = reference_clipped_sum(model, squared_error, inputs, mask, clip_norm=0.5, style="all-layer",
                                     function="abadi")  # fmt: skip
    got, _ = run_engine(model, squared_error, [(inputs, mask)] * 2, clip_norm=0.5, clipping_function="abadi")
    assert_matches(got, {name: 2 * value for name, value in expected.items()}, 0.5)
    assert bool(calls) == (layout == torch.contiguous_format)
