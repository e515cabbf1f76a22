"""The float64 oracle of one zeroth-order DP step (DESIGN.md sections 3 and 4), naive on purpose.

Every real example is run alone (``loss_fn`` evaluates the model at given parameter values) at theta + beta z_j
and theta - beta z_j, out of place: the parameters are never modified. Its P differences are clipped jointly with
min(1, C/||d_i||), summed and divided by B, and the update theta - eta ((1/P) sum_j g_j z_j + lambda (theta -
anchor)) is formed. The directions z are the public spec (``DirectionSampler``: what any party regenerates from the
public seed), scattered onto the kept coordinates when a pruning selection is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_dpzero.zeroth_order.perturbation import DirectionSampler

PerExampleLoss = Callable[[dict[str, Tensor], tuple[Tensor, ...]], Tensor]  # (parameter values, batch) -> [n]


def reference_directions(
    params: dict[str, Tensor],
    directions: DirectionSampler,
    *,
    step: int,
    num_directions: int,
    kept: dict[str, Tensor] | None = None,
    name_prefix: str = "",
) -> list[dict[str, Tensor]]:
    """z_j for every parameter, float64, full shape (zero outside the kept coordinates).

    ``name_prefix + name`` is the parameter's name in the LightningModule, which seeds its z.
    """
    out = []
    for j in range(num_directions):
        z = {}
        for name, value in params.items():
            idx = None if kept is None else kept.get(name, torch.zeros(0, dtype=torch.long))
            if idx is None:
                z[name] = directions.full(
                    step=step, direction=j, name=name_prefix + name, numel=value.numel(), device=value.device
                )
                z[name] = z[name].double().view_as(value)
            else:
                flat = torch.zeros(value.numel(), dtype=torch.float64)
                if idx.numel():
                    zk = directions.full(
                        step=step, direction=j, name=name_prefix + name, numel=idx.numel(), device=value.device
                    )
                    flat[idx] = zk.double()
                z[name] = flat.view_as(value)
        out.append(z)
    return out


def reference_differences(
    params: dict[str, Tensor],
    z: list[dict[str, Tensor]],
    batches: Sequence[tuple[Tensor, ...]],
    masks: Sequence[Tensor],
    *,
    beta: float,
    loss_fn: PerExampleLoss,
) -> Tensor:
    """d [n_real, P]: (l_i(theta + beta z_j) - l_i(theta - beta z_j)) / (2 beta), each real example alone."""
    rows = []
    for batch, mask in zip(batches, masks):
        for i in torch.nonzero(mask.bool()).flatten().tolist():
            one = tuple(x[i : i + 1] for x in batch)
            row = []
            for zj in z:
                plus = loss_fn({n: params[n] + beta * zj[n] for n in params}, one)
                minus = loss_fn({n: params[n] - beta * zj[n] for n in params}, one)
                row.append(((plus - minus) / (2 * beta))[0])
            rows.append(torch.stack(row))
    return torch.stack(rows) if rows else torch.zeros(0, len(z), dtype=torch.float64)


def reference_update(
    params: dict[str, Tensor],
    z: list[dict[str, Tensor]],
    diffs: Tensor,
    *,
    clip_norm: float,
    expected_batch_size: float,
    lr: float,
    lam: float = 0.0,
    anchor: dict[str, Tensor] | None = None,
    noise: Tensor | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """(theta after the step, g [P]) from the differences [n_real, P], Abadi clipping of each row jointly."""
    norms = diffs.norm(dim=1)
    factors = torch.clamp(clip_norm / norms, max=1.0)
    total = (diffs * factors[:, None]).sum(0) if diffs.numel() else torch.zeros(len(z), dtype=torch.float64)
    if noise is not None:
        total = total + noise
    g = total / expected_batch_size  # [P]
    new = {}
    for name, theta in params.items():
        direction = sum(g[j] / len(z) * z[j][name] for j in range(len(z)))
        prox = lam * (theta - anchor[name]) if lam else 0.0
        new[name] = theta - lr * (direction + prox)
    return new, g
