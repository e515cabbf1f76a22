"""What a DP training method is to a strategy, and what a strategy's reduction is to a method.

A method (``DPStep``: first-order DP-SGD, ``ZOStep``: zeroth-order) runs the physical batches of a logical step and
ends it; a strategy supplies a ``Reducer``: where the clipped sums go and which coordinates this rank owns. Every
method releases a step the same way, through its ``PrivacyLedger``: noise on what this rank owns, division by B,
and one accounting event, together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.ledger import PrivacyLedger

if TYPE_CHECKING:
    from lightning_dpzero.clipping.engine import ClippingEngine

__all__ = ["PrivateMethod", "Reducer", "make_method"]


class Reducer(Protocol):
    """A strategy's reduction of one logical step's clipped sums over its ranks.

    ``add`` and ``flush`` move clipped sums towards the coordinates each rank owns; ``release`` hands this rank's
    coordinates to ``PrivacyLedger.release`` (noise, division by B, accounting) and then to the optimizer. The
    methods' small collectives (zeroth-order's P numbers) go through ``all_reduce`` and ``broadcast``.
    """

    streams: bool  # True: the engine hands each physical batch's clipped sums to ``add`` as soon as they are clipped

    def select(self, params: dict[str, nn.Parameter], optimizer: Optimizer | None) -> list[tuple[str, nn.Parameter]]:
        """The (name, parameter) pairs the step releases, in the same order on every rank."""
        ...

    def bind(self, params: dict[str, nn.Parameter]) -> None:
        """The method's trainable parameters by name (the names ``add`` receives)."""
        ...

    def start(self, physical_index: int) -> None:
        """A physical batch starts (``physical_index`` 0 is the first of the logical step)."""
        ...

    def add(self, name: str, clipped_sum: Tensor | None) -> None:
        """One parameter's clipped sum (full shape, fp32; ``None``: zeros), of a physical batch or of the step."""
        ...

    def flush(self) -> None:
        """Reduce whatever ``add`` queued (the end of a physical batch, or of the step's sums)."""
        ...

    def release(self, ledger: PrivacyLedger, named: list[tuple[str, nn.Parameter]]) -> None:
        """Release the step: ``ledger.release`` on the coordinates this rank owns, then write the gradients."""
        ...

    def all_reduce(self, values: Tensor) -> None:
        """Sum a (small) tensor over the ranks, in place."""
        ...

    def broadcast(self, values: Tensor, src: int = 0) -> None:
        """Overwrite ``values`` with rank ``src``'s, in place."""
        ...


@runtime_checkable
class PrivateMethod(Protocol):
    """One private training method, as every strategy drives it.

    The strategy calls ``attach`` when the model is ready, ``ledger.bind_data`` on the training loader,
    ``physical_batch`` for each physical batch of a logical step and ``finish_step`` once at its end; ``state_dict``
    goes into checkpoints. ``ledger`` holds the sampling, noise and accounting.
    """

    config: PrivacyConfig
    ledger: PrivacyLedger

    @property
    def method_name(self) -> str:
        """What the method runs, for messages (e.g. "DP-SGD")."""
        ...

    @property
    def clipping_description(self) -> str:
        """How it clips, for the start-of-run line."""
        ...

    @property
    def probe_engine(self) -> ClippingEngine | None:
        """The clipping engine the per-example self-check probes (``None``: it compares losses and buffers only)."""
        ...

    def before_sharding(self, model: nn.Module) -> None:
        """Sharded strategies call it on the full model before sharding or wrapping it (the clipping engine's rules
        are looked up by the layers' own types; zeroth-order's pruning scores the full weights)."""
        ...

    def attach(self, model: nn.Module, reducer: Reducer | None = None) -> None:
        """Hook the model (again after a strategy replaced its parameters); ``reducer`` may stream the clipped sums."""
        ...

    def detach(self) -> None: ...

    def selection_digest(self) -> str | None:
        """What every rank must agree on before training (a digest), or ``None``."""
        ...

    def physical_batch(self, forward: Callable[[], Any], mask: Tensor, device: torch.device) -> tuple[Any, Tensor]:
        """Run one physical batch (``forward()`` is the user's training_step); return its output and the mean loss
        over the real examples (for logging)."""
        ...

    def finish_step(self, optimizer: Optimizer | None, reducer: Reducer) -> None:
        """End the logical step through ``reducer``: released (noise, division by B, accounting) exactly once."""
        ...

    def epsilon(self) -> float: ...

    @property
    def delta(self) -> float | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def make_method(config: PrivacyConfig) -> PrivateMethod:
    """The method ``config`` asks for: ``ZOStep`` for ``method="zeroth_order"``, else ``DPStep``."""
    if config.zeroth_order is not None:
        from lightning_dpzero.zeroth_order.step import ZOStep

        return ZOStep(config)
    from lightning_dpzero.step import DPStep

    return DPStep(config)
