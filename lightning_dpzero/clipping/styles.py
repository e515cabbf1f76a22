"""Clipping styles: which parameters share a per-example norm (a group k), and each group's threshold C_k."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_dpzero.config import ClippingStyle, PrivacyConfig

__all__ = ["ClippingGroups", "make_groups"]


@dataclass(frozen=True)
class ClippingGroups:
    """``group_of[param_name]`` indexes ``clip_norms``; sum_k clip_norms[k]^2 = C^2."""

    group_of: dict[str, int]
    clip_norms: tuple[float, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.clip_norms)


def make_groups(config: PrivacyConfig, params: Sequence[tuple[str, str]]) -> ClippingGroups:
    """Assign each trainable parameter to a group.

    Args:
        config: the privacy settings (style, groups, thresholds, C).
        params: ``(parameter name, owning module path)`` for every trainable parameter, in module order.
    Raises:
        ValueError: a name prefix matches no parameter, or ``group_clip_norms`` has the wrong length.
    """
    style = config.clipping_style
    if style is ClippingStyle.ALL_LAYER:
        keys = ["all" for _ in params]
    elif style is ClippingStyle.PARAM_WISE:
        keys = [name for name, _ in params]
    elif style is ClippingStyle.LAYER_WISE:
        keys = [module for _, module in params]
    elif isinstance(config.clipping_groups, int):
        modules = list(dict.fromkeys(module for _, module in params))
        m = min(config.clipping_groups, len(modules))
        per = [len(modules) // m + (1 if i < len(modules) % m else 0) for i in range(m)]
        chunk_of, start = {}, 0
        for k, size in enumerate(per):
            for module in modules[start : start + size]:
                chunk_of[module] = f"group{k}"
            start += size
        keys = [chunk_of[module] for _, module in params]
    else:
        prefixes = config.clipping_groups or ()
        keys = [next((p for p in prefixes if name.startswith(p)), "<rest>") for name, _ in params]
        unmatched = [p for p in prefixes if p not in keys]
        if unmatched:
            raise ValueError(
                f"PrivacyConfig.clipping_groups: prefix(es) {unmatched} match no trainable parameter; "
                f"parameters are named like {[name for name, _ in params[:3]]}."
            )
    names = tuple(dict.fromkeys(keys))
    if style is ClippingStyle.GROUP_WISE and not isinstance(config.clipping_groups, int):
        # thresholds follow the order the prefixes were given in, then the unmatched rest
        names = tuple(config.clipping_groups or ()) + (("<rest>",) if "<rest>" in keys else ())
    index = {key: k for k, key in enumerate(names)}
    if config.group_clip_norms is not None:
        if len(config.group_clip_norms) != len(names):
            raise ValueError(
                f"PrivacyConfig.group_clip_norms has {len(config.group_clip_norms)} thresholds, but the "
                f"{style.value} style makes {len(names)} groups: {list(names)[:8]}."
            )
        norms = tuple(config.group_clip_norms)
    else:
        norms = (config.clip_norm / math.sqrt(len(names)),) * len(names)
    return ClippingGroups({name: index[key] for (name, _), key in zip(params, keys)}, norms, names)
