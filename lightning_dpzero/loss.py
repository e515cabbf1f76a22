"""What ``training_step`` returns under DP, and the sum of per-example losses the clipping engine differentiates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["summed_loss", "training_step_loss"]


def training_step_loss(output: Any) -> Tensor:
    """The loss in ``training_step``'s output: a tensor, or a dict's ``per_example_loss`` (preferred) or ``loss``."""
    if isinstance(output, Mapping):
        loss = output["per_example_loss"] if "per_example_loss" in output else output.get("loss")
    else:
        loss = output
    if not isinstance(loss, Tensor):
        raise TypeError(
            "training_step must return the loss as a Tensor (or a dict with 'per_example_loss' or 'loss'), got "
            f"{type(loss).__name__}."
        )
    return loss


def summed_loss(loss: Tensor, physical_batch_size: int) -> Tensor:
    """The sum over the p rows of their own losses: ``loss`` is per-example losses [p], or a scalar mean over the
    rows (every row weighted equally: times p). Whether it really is per-example is for the self-check to verify.

    Raises:
        ValueError: any other shape (e.g. token losses [p, T]).
    """
    p = physical_batch_size
    if loss.dim() == 0:
        return loss * p
    if loss.shape == (p,):
        return loss.sum()
    raise ValueError(
        f"training_step returned a loss of shape {tuple(loss.shape)}; under DP it must be a scalar mean over "
        f"the physical batch or per-example losses of shape [{p}]."
    )
