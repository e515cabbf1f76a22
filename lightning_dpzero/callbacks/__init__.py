from lightning_dpzero.callbacks.privacy_budget import PrivacyBudget

__all__ = ["PrivacyBudget"]
