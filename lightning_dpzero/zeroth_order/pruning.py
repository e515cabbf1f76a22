"""Data-free pruning: SynFlow scores (Tanaka et al. 2020) select the coordinates zeroth-order training updates.

SynFlow, one shot: every floating parameter and buffer is made float64 and every parameter is replaced by its
absolute value, the model is run on an all-ones input (its ``example_input_array`` with every value set to 1: token
id 1 for a language model), R is the sum of the outputs, and the score of a trainable coordinate is
|theta * dR/dtheta|. No training data is read, so selecting with it costs no privacy. Afterwards every parameter and
buffer gets back its original tensor object: the model is bit-for-bit unchanged.

Cost: a float64 copy of the parameters, their gradients and the concatenated scores, once before training.
The selection is global: the ``keep_fraction`` of all trainable coordinates with the lowest (DP-ZOPO) or highest
(SynFlow) scores, ties broken by position (a stable sort). Only one-shot SynFlow is implemented (the iterative
variant re-scores a progressively pruned network, which only matters when most of it is pruned *away*).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dpzero.config import PruneSelection

__all__ = ["all_ones_like", "select_coordinates", "synflow_scores"]


def all_ones_like(example: Any) -> Any:
    """``example`` (a tensor or a tuple / list / dict of them) with every tensor replaced by ones of its shape."""
    if isinstance(example, Tensor):
        return torch.ones_like(example)
    if isinstance(example, Mapping):
        return {k: all_ones_like(v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(all_ones_like(v) for v in example)
    return example


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _output_sum(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output.sum()
    values = output.values() if isinstance(output, Mapping) else output
    tensors = [_output_sum(v) for v in values if isinstance(v, (Tensor, Mapping, tuple, list))]
    if not tensors:
        raise TypeError("SynFlow: the model's output holds no tensor to sum.")
    return torch.stack(tensors).sum()


def synflow_scores(model: nn.Module, example_input: Any, params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
    """SynFlow scores |theta * dR/dtheta| of ``params`` on an all-ones input, in float64.

    Args:
        model: called as ``model(*inputs)`` (tuple), ``model(**inputs)`` (dict) or ``model(inputs)``.
        example_input: an input of the right shapes and types; only its shapes are used.
        params: canonical name -> trainable parameter of ``model`` (each shared parameter once).
    Returns:
        name -> float64 scores of the parameter's shape.
    Raises:
        FloatingPointError: the scores overflow even in float64.
    Privacy:
        Reads no training data: the selection is public and costs no epsilon.
    """
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    originals = {id(t): t.data for t in tensors}
    training = {m: m.training for m in model.modules()}
    t: Tensor  # the loops below go over parameters and buffers alike
    try:
        with torch.no_grad():
            for t in model.parameters():
                t.data = t.data.to(torch.float64).abs()  # linearise: |theta|
            for t in model.buffers():
                if t.is_floating_point():
                    t.data = t.data.to(torch.float64)
        model.eval()
        with torch.enable_grad():
            inputs = all_ones_like(example_input)
            total = _output_sum(_call(model, inputs))  # R = 1^T f(1; |theta|)
            names = list(params)
            grads = torch.autograd.grad(total, [params[n] for n in names], allow_unused=True)
        scores = {}
        for name, grad in zip(names, grads):
            value = params[name].detach()
            score = torch.zeros_like(value) if grad is None else (value * grad).abs()
            if not bool(torch.isfinite(score).all()):
                raise FloatingPointError(
                    f"SynFlow: the score of {name!r} is not finite even in float64 (the product of |weights| "
                    "overflows); use prune_keep_fraction=None or a smaller model."
                )
            scores[name] = score
        return scores
    finally:
        for t in tensors:
            t.data = originals[id(t)]  # the original tensor objects: bit-exact, whatever happened above
        for module, mode in training.items():
            module.training = mode


def select_coordinates(
    scores: Mapping[str, Tensor], *, keep_fraction: float, select: PruneSelection
) -> dict[str, Tensor]:
    """The kept coordinates of each parameter: sorted flat indices (int64, on the scores' device).

    Args:
        scores: name -> scores (any shape), in the order parameters are listed.
        keep_fraction: the fraction of all coordinates kept, rounded up to at least one coordinate.
        select: keep the ``LOWEST`` or the ``HIGHEST`` scores; ties go to the earlier position.
    """
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().to(torch.float64) for n in names])  # [d]
    keep = max(1, math.ceil(keep_fraction * flat.numel() - 1e-9))
    key = flat if select is PruneSelection.LOWEST else -flat
    chosen = torch.argsort(key, stable=True)[:keep].sort().values  # [keep], ascending positions
    kept, offset = {}, 0
    for name in names:
        n = scores[name].numel()
        lo, hi = torch.searchsorted(chosen, torch.tensor([offset, offset + n], device=chosen.device)).tolist()
        kept[name] = chosen[lo:hi] - offset
        offset += n
    return kept
