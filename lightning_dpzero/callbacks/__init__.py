"""Lightning callbacks (privacy budget, the epsilon plot) and the Hydra sweep-summary callback."""

from lightning_dpzero.callbacks.plot import PrivacyCurvePlot
from lightning_dpzero.callbacks.privacy_budget import PrivacyBudget
from lightning_dpzero.callbacks.sweep_summary import SweepSummary

__all__ = ["PrivacyBudget", "PrivacyCurvePlot", "SweepSummary"]
