"""``DPStep``: one logical DP-SGD step (docs/design.md), shared by every strategy.

sample (Poisson, the ledger's dataloader) -> clip (per physical batch, ``ClippingEngine``) -> sum (the strategy's
``Reducer``) -> noise N(0, sigma^2 C^2) once per coordinate -> divide by the expected batch size B = qN -> account
(``PrivacyLedger.release``, on the coordinates each rank owns).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_dpzero.clipping.engine import REENTRANT_CHECKPOINT, ClippingEngine
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.ledger import PrivacyBudgetExhausted, PrivacyLedger
from lightning_dpzero.loss import summed_loss, training_step_loss
from lightning_dpzero.method import Reducer

__all__ = ["DPStep", "PrivacyBudgetExhausted"]


class DPStep:
    """The DP-SGD step for one LightningModule: per-example clipping through its ``ClippingEngine``, the rest
    through its ``PrivacyLedger`` (sampler, noise streams, accountant, budget).

    Args:
        config: the validated privacy settings.

    Privacy:
        After ``bind_data``: every logical step adds N(0, sigma^2 C^2) to each coordinate of the summed clipped
        gradient exactly once, divides by B = qN, and is accounted as one Poisson-sampled Gaussian event (q, sigma).
        A step that would take epsilon past the budget is refused.
    """

    def __init__(self, config: PrivacyConfig) -> None:
        self.config = config
        self.ledger = PrivacyLedger(config)
        self.engine: ClippingEngine | None = None
        self._checked_coverage = False

    def before_sharding(self, model: nn.Module) -> None:
        """Build the clipping engine on the model as written (its rules are looked up by the layers' own types) and
        hook it, before a strategy shards or wraps it."""
        if self.engine is None:
            self.engine = ClippingEngine(model, self.config)
        self.engine.attach()

    def attach(self, model: nn.Module, reducer: Reducer | None = None) -> None:
        """Validate ``model`` (every trainable layer has a clipping rule) and hook it; a ``reducer`` that streams
        receives each physical batch's clipped sums as soon as they are clipped.

        Called again after a strategy replaced the parameter objects (FSDP2's sharded DTensors): they are re-read.
        """
        if self.engine is None:
            self.before_sharding(model)
        assert self.engine is not None
        self.engine.refresh_params(model)
        self.engine.attach()
        if reducer is not None:
            reducer.bind(self.engine.params)
            self.engine.sink = reducer.add if reducer.streams else None

    def detach(self) -> None:
        if self.engine is not None:
            self.engine.detach()

    def selection_digest(self) -> None:
        return None

    @property
    def method_name(self) -> str:
        """What this step runs, for messages."""
        return "DP-SGD"

    @property
    def clipping_description(self) -> str:
        cfg = self.config
        return f"{cfg.clipping_style.value} {cfg.clipping_function} clipping"

    def physical_batch(self, forward: Callable[[], Any], mask: Tensor, device: torch.device) -> tuple[Any, Tensor]:
        """Run one physical batch: ``forward()`` (the user's training_step) recorded by the engine, then ``backward``.

        Returns:
            ``training_step``'s output and the detached mean loss over the real examples (for logging only).
        """
        assert self.engine is not None, "DPStep.attach() was not called"
        with self.engine.recording(device, rows=mask.numel()):
            output = forward()
        return output, self.backward(output, mask)

    @property
    def probe_engine(self) -> ClippingEngine | None:
        """The engine the per-example self-check probes (``None``: it compares losses and buffers only)."""
        return self.engine

    def backward(self, output: Any, mask: Tensor) -> Tensor:
        """Clip and add one physical batch, from the output of ``training_step`` (recorded by the engine).

        The loss may be per-example losses of shape [p] (preferred: returned as the loss, or as
        ``{"loss": losses.mean(), "per_example_loss": losses}`` so the same module also trains without DP), or a
        scalar mean over the p rows of the physical batch, every row weighted equally (it is multiplied by p to
        recover the sum of per-example losses). Token-level language-model losses must therefore average over
        the same number of tokens in every row, or be returned per example.

        Returns:
            The detached mean loss over the real examples (for logging only).
        """
        assert self.engine is not None, "DPStep.attach() was not called"
        loss = training_step_loss(output)
        total = summed_loss(loss, mask.numel())
        if loss.dim() == 0:
            shown = loss.detach()
        else:
            real = mask.to(loss.device, loss.dtype)
            shown = (loss.detach() * real).sum() / real.sum().clamp(min=1)
        self.engine.backward(total, mask)
        return shown

    def finish_step(self, optimizer: Optimizer | None, reducer: Reducer) -> None:
        """End the logical step: the clipped sums of the parameters ``optimizer`` updates through ``reducer``, which
        reduces them over the ranks and has the ledger release (noise, divide by B, account) what this rank owns.

        Privacy:
            Refused before anything moves when the step would take epsilon past the budget; noise N(0, sigma^2 C^2)
            is drawn once per coordinate per logical step, whatever the number of physical batches, by the rank
            that owns the coordinate.
        """
        assert self.engine is not None, "DPStep.attach() was not called"
        named = reducer.select(self.engine.params, optimizer)
        self.ledger.refuse_past_budget()
        self._check_coverage([name for name, _ in named])
        summed = self.engine.pop_summed()
        if not reducer.streams:  # the step's sums, summed over its physical batches here
            for name, _ in named:
                reducer.add(name, summed.pop(name, None))
            reducer.flush()
        reducer.release(self.ledger, named)

    def _check_coverage(self, names: list[str]) -> None:
        if self._checked_coverage:
            return
        assert self.engine is not None
        missing = [name for name in names if name not in self.engine.seen]
        ungraded = [name for name in missing if self.engine.owner[name] in self.engine.ungraded]
        if ungraded:
            raise RuntimeError(
                f"trainable parameter(s) {ungraded[:5]} received no per-example gradient in the first logical step: "
                f"their module(s) {sorted({self.engine.owner[n] for n in ungraded})[:5]} ran with gradients "
                "disabled (torch.no_grad, or the forward of reentrant activation checkpointing). Freeze what is "
                f"computed without gradients (requires_grad_(False)); for checkpointing: {REENTRANT_CHECKPOINT}."
            )
        if missing:
            raise RuntimeError(
                f"trainable parameter(s) {missing[:5]} received no per-example gradient in the first logical step: "
                "either they are unused (freeze them with requires_grad_(False)) or they are used outside their "
                "module (e.g. F.linear(x, self.fc.weight)); call the module instead, so its gradient is clipped."
            )
        self._checked_coverage = True

    def epsilon(self) -> float:
        """Epsilon after the logical steps taken (0 before the first)."""
        return self.ledger.epsilon()

    @property
    def delta(self) -> float | None:
        return self.ledger.delta

    def state_dict(self) -> dict[str, Any]:
        """The ledger's public state (``PrivacyLedger.state_dict``): nothing secret."""
        return self.ledger.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "zeroth_order" in state:
            raise ValueError(
                "DPStep: the checkpoint was written by a zeroth-order DP run; resume it with method='zeroth_order'."
            )
        self.ledger.load_state_dict(state)
