"""``run_audit``: one training run with canaries under the user's DP strategy, turned into an epsilon lower bound."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_dpzero.audit.canaries import (
    CANARY_PARAMETER,
    AuditConfig,
    CanaryModule,
    CanaryObserver,
    canary_dataloader,
    draw_inclusion,
)
from lightning_dpzero.audit.scores import GuessAttempt, best_guess, log_likelihood_ratio
from lightning_dpzero.clipping.engine import ClippingEngine
from lightning_dpzero.clipping.functions import clip_factors
from lightning_dpzero.config import Method, PrivacyConfig
from lightning_dpzero.strategies.query import dp_step

__all__ = ["AuditResult", "plot_scores", "run_audit"]


@dataclass(frozen=True)
class AuditResult:
    """The outcome of one audit run.

    Attributes:
        claimed_epsilon: epsilon of the audit run by the library's own accountant, for ``delta``.
        delta: the delta of the claim.
        epsilon_lower_bound: the empirical lower bound at ``confidence``; above ``claimed_epsilon`` means the run
            did not deliver its guarantee (with probability at least ``confidence``).
        confidence: the confidence of the bound.
        num_canaries: m.
        num_included: canaries in the training set.
        steps: T, logical steps observed.
        noise_multiplier: sigma of the run.
        sample_rate: q of the run (over the user's examples plus the included canaries).
        canary_signal: s / C, the clipped canary norm the scores assume.
        best: the attempt that gave the bound.
        attempts: every pre-registered attempt.
        scores: shape [m], the canaries' log-likelihood ratios.
        included: shape [m] bool, the truth.
    """

    claimed_epsilon: float
    delta: float
    epsilon_lower_bound: float
    confidence: float
    num_canaries: int
    num_included: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    canary_signal: float
    best: GuessAttempt
    attempts: list[GuessAttempt]
    scores: np.ndarray
    included: np.ndarray

    @property
    def violated(self) -> bool:
        """Whether the lower bound exceeds the claim."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    def summary(self) -> dict[str, Any]:
        """The numbers without the per-canary arrays (JSON-ready)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("scores", "included")}
        out["violated"] = self.violated
        return out

    def summary_line(self) -> str:
        verdict = "EXCEEDS the claim" if self.violated else "consistent with the claim"
        return (
            f"[lightning_dpzero.audit] claimed epsilon={self.claimed_epsilon:.3f} (delta={self.delta:.2e}), empirical "
            f"lower bound={self.epsilon_lower_bound:.3f} at {self.confidence:.0%} confidence: {verdict} | "
            f"m={self.num_canaries} canaries ({self.num_included} in), T={self.steps} steps, "
            f"sigma={self.noise_multiplier:.3f}, q={self.sample_rate:.4g}, best guesses: {self.best.num_correct}/"
            f"{self.best.num_guesses} correct (k_in={self.best.k_in}, k_out={self.best.k_out})"
        )


def _canary_signal(engine: ClippingEngine | None, config: PrivacyConfig, canary_gradient_norm: float) -> float:
    """s / C: the norm the library's clipping gives a canary gradient of norm w, in units of C."""
    assert engine is not None  # a first-order method clips through its engine
    groups = engine.groups
    clip = groups.clip_norms[groups.group_of[CANARY_PARAMETER]]
    norm = torch.tensor([canary_gradient_norm])
    factor = clip_factors(
        norm,
        torch.ones(1),
        clip_norm=clip,
        fn=config.clipping_function,
        stability_constant=config.stability_constant,
    )
    return float(factor[0]) * canary_gradient_norm / config.clip_norm


def run_audit(
    model: pl.LightningModule, train_dataloader: DataLoader, *, trainer: pl.Trainer, config: AuditConfig
) -> AuditResult:
    """Train ``model`` with m canaries under ``trainer``'s DP strategy and bound epsilon from below.

    Args:
        model: the module to audit (a fresh one: the audit trains it); ``training_step`` must return per-example
            losses.
        train_dataloader: the user's training loader (its dataset, batch size and collate function are used).
        trainer: a fresh Trainer with the DP strategy, precision and ``max_steps`` of the run being audited. The
            audit adds its observer callback.
        config: the audit settings.
    Returns:
        The claim (from the run's own accountant), the bound and the per-canary scores, on every rank.
    Raises:
        TypeError: the strategy is not a first-order DP strategy.
    """
    included = draw_inclusion(config.num_canaries, config.seed)
    module = CanaryModule(
        model,
        num_canaries=config.num_canaries,
        canary_gradient_norm=config.canary_gradient_norm,
        canary_lr=config.canary_lr,
    )
    dp = dp_step(trainer)
    if dp is None or dp.config.method is not Method.FIRST_ORDER:
        raise TypeError(
            f"lightning_dpzero.audit: the Trainer's strategy {type(trainer.strategy).__name__} is not a first-order "
            "DP strategy (dp, dp_ddp, dp_zero1/2/3, dp_fsdp with method='first_order'); there is no claim to audit."
        )
    ledger = dp.ledger
    observer = CanaryObserver()
    # Trainer.callbacks is set by Lightning's callback connector, not declared on Trainer
    trainer.callbacks.append(observer)  # type: ignore[attr-defined]
    trainer.fit(module, train_dataloaders=canary_dataloader(train_dataloader, included))
    if not observer.increments:
        raise RuntimeError("lightning_dpzero.audit: the run took no logical step; set Trainer(max_steps=...) > 0.")
    binding, delta = ledger.binding, ledger.delta
    assert binding is not None and delta is not None  # bound when the run trained
    # u moves by lr (s 1[sampled] + noise) / B: in units of C / B the signal is s / C and the noise std is sigma.
    x = (
        torch.stack(observer.increments).double().numpy()
        * binding.expected_batch_size
        / (config.canary_lr * dp.config.clip_norm)
    )  # [T, m]
    signal = _canary_signal(dp.probe_engine, dp.config, config.canary_gradient_norm)
    sigma, q = binding.noise_multiplier, binding.sample_rate
    scores = log_likelihood_ratio(x, signal=signal, noise_multiplier=sigma, sample_rate=q)
    best, attempts = best_guess(
        scores, included, delta=delta, confidence=config.confidence, guess_fractions=config.guess_fractions
    )
    return AuditResult(
        claimed_epsilon=ledger.epsilon(),
        delta=delta,
        epsilon_lower_bound=best.epsilon_lower_bound,
        confidence=config.confidence,
        num_canaries=config.num_canaries,
        num_included=int(included.sum()),
        steps=x.shape[0],
        noise_multiplier=sigma,
        sample_rate=q,
        canary_signal=signal,
        best=best,
        attempts=attempts,
        scores=scores,
        included=included,
    )


def plot_scores(result: AuditResult, path: str | Path) -> Path:
    """A PNG of the score distributions of included and excluded canaries, with the guess thresholds.

    Args:
        result: an audit result.
        path: where to write the PNG (parent folders are created).
    Returns:
        The path written.
    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scores, included = result.scores, result.included
    finite = scores[np.isfinite(scores)]
    # bin edges as an array: matplotlib takes any array-like, its annotation says Sequence[float]
    bins = cast(Sequence[float], np.linspace(finite.min(), finite.max(), 60)) if finite.size else 10
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.hist(scores[~included], bins=bins, alpha=0.6, color="tab:blue", label=f"excluded ({int((~included).sum())})")
    ax.hist(scores[included], bins=bins, alpha=0.6, color="tab:red", label=f"included ({int(included.sum())})")
    order = np.sort(scores)[::-1]
    if result.best.k_in:
        ax.axvline(order[result.best.k_in - 1], color="tab:red", linestyle="--", label=f"top {result.best.k_in}: in")
    if result.best.k_out:
        ax.axvline(
            order[-result.best.k_out], color="tab:blue", linestyle="--", label=f"bottom {result.best.k_out}: out"
        )
    ax.set_xlabel("canary score (log-likelihood ratio, included vs excluded)")
    ax.set_ylabel("canaries")
    ax.set_yscale("log")
    ax.set_title(
        f"claimed eps={result.claimed_epsilon:.2f}, lower bound={result.epsilon_lower_bound:.2f} "
        f"({result.confidence:.0%}), delta={result.delta:.1e}"
    )
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
