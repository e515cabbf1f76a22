"""Per-layer rules; importing this package registers them."""

from lightning_dpzero.clipping.rules import conv, embedding, linear, norm

__all__ = ["conv", "embedding", "linear", "norm"]
