"""Privacy audit built in: an empirical lower bound on epsilon that checks the implementation end to end.

One training run with m white-box gradient canaries under the user's own DP strategy, privacy settings and
precision (Steinke, Nasr and Jagielski 2023, "Privacy auditing with one (1) training run"): each canary is included
with probability 1/2, the auditor scores every canary from the per-step movement of its parameter coordinate, guesses
in/out for the most confident ones, and the number of correct guesses becomes a lower bound on epsilon at a stated
confidence. A bound above the epsilon the library claims for that run means the guarantee is not delivered.

    python -m lightning_dpzero.audit strategy=dp privacy.target_epsilon=2 audit.num_canaries=1000

Example::

    from lightning_dpzero.audit import AuditConfig, run_audit
    result = run_audit(model, datamodule.train_dataloader(), trainer=trainer, config=AuditConfig(num_canaries=1000))
    print(result.claimed_epsilon, result.epsilon_lower_bound)
"""

from lightning_dpzero.audit.bound import epsilon_lower_bound, guess_from_scores, p_value
from lightning_dpzero.audit.canaries import AuditConfig, CanaryModule, CanaryObserver
from lightning_dpzero.audit.runner import AuditResult, plot_scores, run_audit
from lightning_dpzero.audit.scores import GuessAttempt, best_guess, log_likelihood_ratio

__all__ = [
    "AuditConfig",
    "AuditResult",
    "CanaryModule",
    "CanaryObserver",
    "GuessAttempt",
    "best_guess",
    "epsilon_lower_bound",
    "guess_from_scores",
    "log_likelihood_ratio",
    "p_value",
    "plot_scores",
    "run_audit",
]
