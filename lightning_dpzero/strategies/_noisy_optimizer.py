"""The optimizer proxy that adds DP noise to the gradient partitions DeepSpeed's ZeRO optimizer hands its optimizer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer

if TYPE_CHECKING:
    from lightning_dpzero.strategies.deepspeed import PartitionReducer


class _NoisyPartitionOptimizer(Optimizer):
    """Wraps the client optimizer: the logical step's release on the rank's gradient partitions, then the step.

    DeepSpeed calls ``step()`` with ``param_groups`` holding this rank's flat fp32 partition(s), whose ``.grad``
    is the mean over the W ranks of the clipped sums; the reducer has the ledger release them (x W, noise, / B,
    accounting), all partitions of the step together.
    """

    def __init__(self, inner: Optimizer, reducer: PartitionReducer) -> None:
        self.inner, self.reducer = inner, reducer  # no super().__init__: all state is inner's

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.inner.param_groups = groups

    @property
    def state(self) -> Any:
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self.inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.inner.defaults = value

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.inner.add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for group in self.inner.param_groups for p in group["params"] if p.grad is not None]
        self.reducer.release_partitions(grads)
        return self.inner.step(closure)

    def __repr__(self) -> str:
        return f"DPNoise({self.inner!r})"
