"""GPT task: a GPT-2-style causal language model and an offline character-level corpus.

The default corpus is generated: lines of additions (``"37+45=82;"``), which have structure a small model learns
within a few hundred private steps (format first, then digits). Real text files can be used with
``TextFileDataModule``. Shapes: n examples, T positions, D features, V vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["CharTokenizer", "GPT", "GPTConfig", "GPTTask", "SyntheticArithmeticDataModule", "TextFileDataModule"]


class CharTokenizer:
    """Byte-level tokenizer over a fixed alphabet: no download, no training."""

    def __init__(self, alphabet: str = "0123456789+=; \n") -> None:
        self.alphabet = alphabet
        self.index = {ch: i for i, ch in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise ValueError(f"CharTokenizer: characters {unknown[:10]} are not in the alphabet.")
        return [self.index[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)


class GPTConfig:
    """Size of the model (nanoGPT's naming)."""

    def __init__(
        self, vocab_size: int, block_size: int = 64, n_layer: int = 2, n_head: int = 4, n_embd: int = 64
    ) -> None:
        if n_embd % n_head:
            raise ValueError(f"GPTConfig: n_embd={n_embd} must be divisible by n_head={n_head}.")
        self.vocab_size, self.block_size = vocab_size, block_size
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd


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

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


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


class GPTTask(L.LightningModule):
    """Next-token prediction. ``training_step`` returns the batch mean as ``loss`` and the per-example losses [n]
    (mean over each row's tokens) as ``per_example_loss``, which DP strategies use; other strategies ignore it."""

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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd))
        if checkpoint_path is not None:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state.get("state_dict", state))

    def per_example_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch  # [n, T] inputs and targets (shifted by one)
        logits = self.model(x)
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)  # [n]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        losses = self.per_example_loss(batch)
        self.log("train_loss", losses.mean(), prog_bar=True)
        return {"loss": losses.mean(), "per_example_loss": losses}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.per_example_loss(batch).mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class _TokenBlocks(Dataset):
    """Consecutive blocks of T+1 tokens: (input [T], target [T])."""

    def __init__(self, ids: Tensor, block_size: int) -> None:
        self.ids, self.block_size = ids, block_size

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        chunk = self.ids[i * self.block_size : (i + 1) * self.block_size + 1]
        return chunk[:-1], chunk[1:]


def arithmetic_corpus(num_chars: int, seed: int) -> str:
    """Lines ``a+b=c;`` with a, b uniform in [0, 100): deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    parts, size = [], 0
    while size < num_chars:
        a, b = torch.randint(0, 100, (2,), generator=gen).tolist()
        line = f"{a}+{b}={a + b};"
        parts.append(line)
        size += len(line)
    return "".join(parts)[:num_chars]


class SyntheticArithmeticDataModule(L.LightningDataModule):
    """The embedded default corpus: generated, offline, with learnable structure."""

    def __init__(
        self, num_train: int = 4096, num_val: int = 256, block_size: int = 64, batch_size: int = 128, seed: int = 1234
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = CharTokenizer()

    def setup(self, stage: str) -> None:
        h = self.hparams
        make = lambda n, seed: _TokenBlocks(  # noqa: E731
            torch.tensor(self.tokenizer.encode(arithmetic_corpus(n * h.block_size + 1, seed))), h.block_size
        )
        self.train_set, self.val_set = make(h.num_train, h.seed), make(h.num_val, h.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)


class TextFileDataModule(L.LightningDataModule):
    """Character-level blocks from local text files (``train.txt``, ``val.txt`` under ``root``)."""

    def __init__(self, root: str, block_size: int = 64, batch_size: int = 64, alphabet: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = CharTokenizer(alphabet) if alphabet else None

    def setup(self, stage: str) -> None:
        root = Path(self.hparams.root)
        train_text, val_text = (root / "train.txt").read_text(), (root / "val.txt").read_text()
        if self.tokenizer is None:
            self.tokenizer = CharTokenizer("".join(sorted(set(train_text) | set(val_text))))
        bs = self.hparams.block_size
        self.train_set = _TokenBlocks(torch.tensor(self.tokenizer.encode(train_text)), bs)
        self.val_set = _TokenBlocks(torch.tensor(self.tokenizer.encode(val_text)), bs)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)
