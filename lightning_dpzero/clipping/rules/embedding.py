"""``nn.Embedding``: row x_t of the per-example gradient receives b_t; the padding row receives nothing."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from lightning_dpzero.clipping.contributions import Contribution, Kind, full_shape
from lightning_dpzero.clipping.registry import UnsupportedLayerError, register_rule


def _check(module: nn.Module, path: str) -> None:
    assert isinstance(module, nn.Embedding)
    if module.max_norm is not None:
        raise UnsupportedLayerError(
            path, module, "max_norm renormalises the weight in place during the forward pass; set max_norm=None"
        )
    if module.scale_grad_by_freq:
        raise UnsupportedLayerError(
            path,
            module,
            "scale_grad_by_freq scales each example's gradient by token "
            "counts over the whole batch, which mixes examples; set scale_grad_by_freq=False",
        )
    if module.sparse:
        raise UnsupportedLayerError(path, module, "sparse gradients are not supported; set sparse=False")


@register_rule(nn.Embedding, check=_check)
def embedding_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
) -> list[Contribution]:
    assert isinstance(module, nn.Embedding)
    n = grad_output.shape[0]
    ids = activation.reshape(n, -1).long()  # [n, T]
    if module.padding_idx is not None:
        ids = ids.masked_fill(ids == module.padding_idx, -1)  # torch never updates the padding row
    b = grad_output.reshape(n, -1, grad_output.shape[-1])  # [n, T, D]
    return [
        Contribution(params["weight"], Kind.INDEX, ids, b, full_shape(module.weight), num_rows=module.num_embeddings)
    ]
