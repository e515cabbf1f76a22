"""Fine-tune any Hugging Face causal language model (``transformers``) with DP, the model's code unchanged.

``HFCausalLMTask`` wraps a transformers model (an instance, a hub name or local folder for ``from_pretrained``, or a
``model_type`` and config values for a freshly initialised one) into a LightningModule whose ``training_step``
returns per-example losses (next-token cross-entropy averaged over each example's tokens), as every DP strategy
wants. It reads the batches of the GPT task's data modules: ``(inputs, targets)`` of token ids [n, T].

Needs the ``hf`` extra (``pip install "lightning_dpzero[hf]"``). Shapes: n examples, T tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpzero.tasks.gpt import LanguageModelSteps

__all__ = ["HFCausalLMTask"]


class HFCausalLMTask(LanguageModelSteps):
    """A transformers causal LM as a LightningModule with per-example losses.

    Args:
        model: a transformers model instance; or ``None`` to build one from ``pretrained`` or ``model_type``.
        pretrained: a hub name or a local folder for ``AutoModelForCausalLM.from_pretrained`` (downloads).
        model_type: a transformers model type (``"gpt2"``, ``"llama"``, ``"opt"``...) initialised from scratch
            with ``config`` (no download).
        config: the config values of ``model_type`` (e.g. ``{"n_embd": 64, "n_layer": 2, "vocab_size": 15}``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Example::

        task = HFCausalLMTask(GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=15)))
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        pretrained: str | None = None,
        model_type: str | None = None,
        config: Mapping[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        given = sum(x is not None for x in (model, pretrained, model_type))
        if given != 1:
            raise ValueError(
                "HFCausalLMTask: give exactly one of `model` (an instance), `pretrained` (a hub name or folder) and "
                f"`model_type` (with `config`); got {given}."
            )
        if model is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            if pretrained is not None:
                model = AutoModelForCausalLM.from_pretrained(pretrained)
            else:
                assert model_type is not None  # exactly one of the three is given (checked above)
                cfg = AutoConfig.for_model(model_type, **dict(config or {}))
                model = AutoModelForCausalLM.from_config(cfg)
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay

    def per_example_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Next-token cross-entropy averaged over each example's T tokens: [n]."""
        inputs, targets = batch  # [n, T] each
        logits = self.model(input_ids=inputs).logits  # [n, T, V]
        return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").mean(1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
