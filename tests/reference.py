"""The float64 oracle (DESIGN.md section 4): per-example gradients by plain autograd, clipped, summed.

Naive on purpose: every real example is run alone (a batch of one) through a float64 deep copy of the model, its
gradient is split into clipping groups exactly as ``lightning_dpzero/clipping/styles.py`` documents, each group is
scaled by the clipping function, and the clipped gradients are summed (not divided by anything). Only the enums
are imported from the library, so a bug in its grouping, norms or rules cannot leak into the expected values.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_dpzero.config import ClippingFunction, ClippingStyle

__all__ = [
    "reference_clipped_sum",
    "reference_factors",
    "reference_group_norms",
    "reference_groups",
    "reference_per_sample_grads",
    "trainable_names",
]

PerSampleLoss = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]


def trainable_names(model: nn.Module) -> list[str]:
    """Canonical names of the trainable parameters (a tied parameter appears once, under its first name)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _as_tuple(inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


def reference_per_sample_grads(
    model: nn.Module, per_sample_loss_fn: PerSampleLoss, batch_inputs: Sequence[Tensor], mask: Tensor
) -> list[dict[str, Tensor]]:
    """For every real example (mask true), in order: {canonical name: float64 gradient of its own loss}."""
    model64 = copy.deepcopy(model).double()
    names = trainable_names(model64)
    params = dict(model64.named_parameters())
    inputs = _as_tuple(batch_inputs)
    grads = []
    for i in torch.nonzero(torch.as_tensor(mask).bool()).flatten().tolist():
        one = tuple(x[i : i + 1].double() if x.is_floating_point() else x[i : i + 1] for x in inputs)
        losses = per_sample_loss_fn(model64, one)
        assert losses.shape == (1,), f"per-sample loss of a batch of one must have shape [1], got {losses.shape}"
        g = torch.autograd.grad(losses[0], [params[n] for n in names], allow_unused=True)
        grads.append({n: (torch.zeros_like(params[n]) if gi is None else gi.detach()) for n, gi in zip(names, g)})
    return grads


def _owning_modules(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Module paths (named_modules order) that own a trainable canonical parameter, and each parameter's owner."""
    canonical = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    modules: list[str] = []
    owner: dict[str, str] = {}
    for path, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            full = f"{path}.{attr}" if path else attr
            if p.requires_grad and canonical.get(id(p)) == full:
                owner[full] = path
                if path not in modules:
                    modules.append(path)
    return modules, owner


def reference_groups(
    model: nn.Module, style: ClippingStyle | str, groups: int | Sequence[str] | None = None
) -> tuple[list[str], dict[str, int]]:
    """Group labels (in threshold order) and the group index of every trainable parameter.

    all-layer: one group; layer-wise: one per owning module path; param-wise: one per parameter; group-wise with an
    int M: the owning modules (named_modules order) cut into M contiguous chunks sized like ``np.array_split``;
    group-wise with prefixes: the first matching prefix, in the order given, then one last group for the rest.
    """
    style = ClippingStyle(style)
    names = trainable_names(model)
    modules, owner = _owning_modules(model)
    if style is ClippingStyle.ALL_LAYER:
        key = {n: "all" for n in names}
        labels = ["all"]
    elif style is ClippingStyle.PARAM_WISE:
        key = {n: n for n in names}
        labels = list(names)
    elif style is ClippingStyle.LAYER_WISE:
        key = {n: owner[n] for n in names}
        labels = list(modules)
    elif isinstance(groups, int):
        chunks = [list(c) for c in np.array_split(np.array(modules, dtype=object), groups) if len(c)]
        chunk_of = {m: f"chunk{k}" for k, chunk in enumerate(chunks) for m in chunk}
        key = {n: chunk_of[owner[n]] for n in names}
        labels = [f"chunk{k}" for k in range(len(chunks))]
    else:
        assert groups is not None, "group-wise needs groups"
        prefixes = list(groups)
        key = {n: next((p for p in prefixes if n.startswith(p)), "<rest>") for n in names}
        labels = prefixes + (["<rest>"] if "<rest>" in key.values() else [])
    index = {label: k for k, label in enumerate(labels)}
    return labels, {n: index[key[n]] for n in names}


def reference_group_norms(grads: list[dict[str, Tensor]], group_of: dict[str, int], num_groups: int) -> Tensor:
    """[num real examples, K] float64 L2 norms of each example's gradient restricted to each group."""
    out = torch.zeros(len(grads), num_groups, dtype=torch.float64)
    for i, g in enumerate(grads):
        for name, gi in g.items():
            out[i, group_of[name]] += gi.square().sum()
    return out.sqrt()


def _thresholds(clip_norm: float, num_groups: int, group_clip_norms: Sequence[float] | None) -> Tensor:
    if group_clip_norms is not None:
        assert len(group_clip_norms) == num_groups
        return torch.tensor(list(group_clip_norms), dtype=torch.float64)
    return torch.full((num_groups,), clip_norm / math.sqrt(num_groups), dtype=torch.float64)


def _factors(norms: Tensor, thresholds: Tensor, function: ClippingFunction, gamma: float) -> Tensor:
    if function is ClippingFunction.ABADI:
        return torch.where(norms > thresholds, thresholds / norms, torch.ones_like(norms))  # min(1, C_k / n)
    return thresholds / (norms + gamma)  # C_k / (n + gamma)


def reference_factors(
    model: nn.Module,
    per_sample_loss_fn: PerSampleLoss,
    batch_inputs: Sequence[Tensor],
    mask: Tensor,
    *,
    clip_norm: float,
    style: ClippingStyle | str,
    function: ClippingFunction | str,
    stability_constant: float = 0.01,
    groups: int | Sequence[str] | None = None,
    group_clip_norms: Sequence[float] | None = None,
) -> Tensor:
    """[num real examples, K] float64 clip factors (to check that a setting clips some examples and not others)."""
    grads = reference_per_sample_grads(model, per_sample_loss_fn, batch_inputs, mask)
    labels, group_of = reference_groups(model, style, groups)
    norms = reference_group_norms(grads, group_of, len(labels))
    thresholds = _thresholds(clip_norm, len(labels), group_clip_norms)
    return _factors(norms, thresholds, ClippingFunction(function), stability_constant)


def reference_clipped_sum(
    model: nn.Module,
    per_sample_loss_fn: PerSampleLoss,
    batch_inputs: Sequence[Tensor],
    mask: Tensor,
    *,
    clip_norm: float,
    style: ClippingStyle | str,
    function: ClippingFunction | str,
    stability_constant: float = 0.01,
    groups: int | Sequence[str] | None = None,
    group_clip_norms: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """sum over real examples i of the clipped g_i: {canonical parameter name: float64 tensor}, not divided by B.

    Per group k: g_i,k * f(||g_i,k||) with abadi f = min(1, C_k / n) and automatic f = C_k / (n + gamma), where
    C_k = C / sqrt(K) unless ``group_clip_norms`` gives them.
    """
    function = ClippingFunction(function)
    grads = reference_per_sample_grads(model, per_sample_loss_fn, batch_inputs, mask)
    labels, group_of = reference_groups(model, style, groups)
    norms = reference_group_norms(grads, group_of, len(labels))
    factors = _factors(norms, _thresholds(clip_norm, len(labels), group_clip_norms), function, stability_constant)
    params = dict(model.named_parameters())
    total = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in trainable_names(model)}
    for i, g in enumerate(grads):
        for name, gi in g.items():
            total[name] += factors[i, group_of[name]] * gi
    return total
