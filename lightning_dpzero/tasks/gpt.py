"""GPT task: a GPT-2-style causal language model and its LightningModule (tokenizers, text data and weight loading
live in ``tokenizers.py``, ``text_data.py`` and ``gpt_weights.py``; their public names are importable from here too).

The default corpus is generated: lines of additions (``"37+45=82;"``), which have structure a small model learns
within a few hundred private steps (format first, then digits). Real text files can be used with
``TextFileDataModule`` (byte-level tokens by default: nothing to download, nothing learnt from the private text).
``GPTTask(checkpoint_path=...)`` starts from a Lightning checkpoint, a ``torch.save``d state dict (of ``GPT`` or
``GPTTask``) or Hugging Face GPT-2 weights (``model.safetensors`` / ``pytorch_model.bin``, with ``config.json`` when
a folder is given), mapped onto ``GPT`` without needing ``transformers``; ``GPT2BPETokenizer`` reads GPT-2's
``vocab.json`` and ``merges.txt`` from a local folder. Shapes: n examples, T positions, D features, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpzero.tasks.gpt_weights import load_gpt_checkpoint, load_safetensors
from lightning_dpzero.tasks.text_data import SyntheticArithmeticDataModule, TextFileDataModule
from lightning_dpzero.tasks.tokenizers import ByteTokenizer, CharTokenizer, GPT2BPETokenizer

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict

__all__ = [
    "ByteTokenizer",
    "CharTokenizer",
    "GPT",
    "GPT2BPETokenizer",
    "GPTConfig",
    "GPTTask",
    "SyntheticArithmeticDataModule",
    "TextFileDataModule",
    "load_gpt_checkpoint",
    "load_safetensors",
]


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")  # GPT-2's "gelu_new"


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "gelu_tanh": _gelu_tanh}


class GPTConfig:
    """Size of the model (nanoGPT's naming); ``activation`` is ``gelu`` (exact) or ``gelu_tanh`` (GPT-2's)."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 64,
        activation: str = "gelu",
    ) -> None:
        if n_embd % n_head:
            raise ValueError(f"GPTConfig: n_embd={n_embd} must be divisible by n_head={n_head}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"GPTConfig: activation={activation!r} is not one of {sorted(_ACTIVATIONS)}.")
        self.vocab_size, self.block_size = vocab_size, block_size
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.activation = activation


class _Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(n, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))  # [n, H, T, D/H]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.n_embd), _Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.fc, self.out = nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.act = _ACTIVATIONS[cfg.activation]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2-style decoder; the output head shares the token embedding's weight (tied weights)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if name.endswith("out.weight") or name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        """idx [n, T] token ids -> logits [n, T, V]."""
        positions = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)  # [n, T]: one row per example
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class LanguageModelSteps(L.LightningModule):
    """The training and validation steps of a language model whose ``per_example_loss(batch)`` gives [n] losses:
    per-example losses for the DP strategies (the mean for the others), the losses logged synced over the ranks."""

    def per_example_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        losses = self.per_example_loss(batch)
        self.log("train_loss", losses.mean(), prog_bar=True, sync_dist=True)
        return {"loss": losses.mean(), "per_example_loss": losses}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.per_example_loss(batch).mean(), prog_bar=True, sync_dist=True)


class GPTTask(LanguageModelSteps):
    """Next-token prediction. ``training_step`` returns the batch mean as ``loss`` and the per-example losses [n]
    (mean over each row's tokens) as ``per_example_loss``, which DP strategies use; other strategies ignore it.

    Args:
        vocab_size: V; must cover the data module's tokenizer (15 for the arithmetic alphabet, 256 for bytes).
        block_size: the longest sequence T (size of the position table).
        n_layer: transformer blocks.
        n_head: attention heads.
        n_embd: D.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        checkpoint_path: start from these weights (see ``load_gpt_checkpoint``): the sizes stored with them (V, T,
            layers, D, and the heads and activation where recorded) replace the arguments above.
        activation: ``gelu`` or ``gelu_tanh`` (GPT-2's); a Hugging Face GPT-2 checkpoint sets its own.
    """

    if TYPE_CHECKING:  # save_hyperparameters() stores them as an AttributeDict; Lightning declares any MutableMapping

        @property
        def hparams(self) -> AttributeDict: ...

    def __init__(
        self,
        vocab_size: int = 15,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 64,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        checkpoint_path: str | None = None,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        state = None
        if checkpoint_path is not None:
            state, sizes = load_gpt_checkpoint(checkpoint_path)
            self.hparams.update(sizes)  # the checkpoint's shapes win over the constructor's defaults
        h = self.hparams
        self.model = GPT(GPTConfig(h.vocab_size, h.block_size, h.n_layer, h.n_head, h.n_embd, h.activation))
        if state is not None:
            self.model.load_state_dict(state)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None and tokenizer.vocab_size > self.model.cfg.vocab_size:
            raise ValueError(
                f"GPTTask: the data module's {type(tokenizer).__name__} has {tokenizer.vocab_size} tokens but the "
                f"model only vocab_size={self.model.cfg.vocab_size}; set GPTTask(vocab_size={tokenizer.vocab_size})."
            )
        data_block = getattr(getattr(datamodule, "hparams", {}), "get", lambda *_: None)("block_size")
        if data_block is not None and data_block > self.model.cfg.block_size:
            raise ValueError(
                f"GPTTask: the data module's block_size={data_block} exceeds the model's position table "
                f"(block_size={self.model.cfg.block_size}); shorten the data blocks or enlarge the model."
            )

    def per_example_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch  # [n, T] inputs and targets (shifted by one)
        logits = self.model(x)
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)  # [n]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
