"""Text data for the language-model tasks: the embedded arithmetic corpus (the main job's default) and text files,
cut into blocks of T + 1 tokens."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_dpzero.tasks.tokenizers import ByteTokenizer, CharTokenizer, GPT2BPETokenizer

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict

__all__ = ["SyntheticArithmeticDataModule", "TextFileDataModule", "arithmetic_corpus"]


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

    if TYPE_CHECKING:  # save_hyperparameters() stores them as an AttributeDict; Lightning declares any MutableMapping

        @property
        def hparams(self) -> AttributeDict: ...

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
    """Blocks of T+1 tokens from local text files (``train.txt``, ``val.txt`` under ``root``), or from the embedded
    arithmetic corpus when ``root`` is None.

    Args:
        root: folder with ``train.txt`` and optionally ``val.txt`` (without it, the last ``val_fraction`` of
            ``train.txt`` is held out); ``None``: the generated corpus (``num_train``/``num_val`` blocks).
        block_size: T, tokens per example (the privacy unit is one block).
        batch_size: the DataLoader batch size: the expected logical batch B when the privacy config sets none.
        alphabet: a fixed character alphabet (implies ``tokenizer="char"``).
        tokenizer: ``byte`` (UTF-8 bytes, V = 256; the default), ``char`` (the ``alphabet``; without one, the
            characters found in the files, a release of the private text's character set that the privacy
            accounting does not cover), or ``gpt2`` (``GPT2BPETokenizer`` from ``tokenizer_path``).
        tokenizer_path: folder with GPT-2's ``vocab.json`` and ``merges.txt`` (for ``tokenizer="gpt2"``).
        val_fraction: share of ``train.txt`` held out when there is no ``val.txt``.
        num_train: blocks of the generated corpus (``root`` None).
        num_val: validation blocks of the generated corpus.
        seed: seed of the generated corpus.
    """

    if TYPE_CHECKING:  # save_hyperparameters() stores them as an AttributeDict; Lightning declares any MutableMapping

        @property
        def hparams(self) -> AttributeDict: ...

    def __init__(
        self,
        root: str | None = None,
        block_size: int = 64,
        batch_size: int = 64,
        alphabet: str | None = None,
        tokenizer: str | None = None,
        tokenizer_path: str | None = None,
        val_fraction: float = 0.1,
        num_train: int = 4096,
        num_val: int = 256,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        kind = tokenizer or ("char" if alphabet else "byte")
        if kind not in ("byte", "char", "gpt2"):
            raise ValueError(f"TextFileDataModule: tokenizer={tokenizer!r} is not one of 'byte', 'char', 'gpt2'.")
        if kind == "gpt2" and tokenizer_path is None:
            raise ValueError("TextFileDataModule: tokenizer='gpt2' needs tokenizer_path (vocab.json + merges.txt).")
        self.tokenizer: CharTokenizer | ByteTokenizer | GPT2BPETokenizer | None = {
            "byte": ByteTokenizer,
            "char": lambda: CharTokenizer(alphabet) if alphabet else None,
            "gpt2": lambda: GPT2BPETokenizer.from_folder(cast(str, tokenizer_path)),  # not None: checked above
        }[kind]()

    def _texts(self) -> tuple[str, str]:
        h = self.hparams
        if h.root is None:
            return (
                arithmetic_corpus(h.num_train * h.block_size + 1, h.seed),
                arithmetic_corpus(h.num_val * h.block_size + 1, h.seed + 1),
            )
        root = Path(h.root)
        train_text = (root / "train.txt").read_text(encoding="utf-8")
        if (root / "val.txt").is_file():
            return train_text, (root / "val.txt").read_text(encoding="utf-8")
        cut = int(len(train_text) * (1.0 - h.val_fraction))
        return train_text[:cut], train_text[cut:]

    def setup(self, stage: str) -> None:
        train_text, val_text = self._texts()
        if self.tokenizer is None:
            self.tokenizer = CharTokenizer("".join(sorted(set(train_text) | set(val_text))))
        bs = self.hparams.block_size
        self.train_set = _TokenBlocks(torch.tensor(self.tokenizer.encode(train_text)), bs)
        self.val_set = _TokenBlocks(torch.tensor(self.tokenizer.encode(val_text)), bs)
        if len(self.train_set) == 0 or len(self.val_set) == 0:
            raise ValueError(
                f"TextFileDataModule: the text yields {len(self.train_set)} training and {len(self.val_set)} "
                f"validation blocks of {bs + 1} tokens; provide more text or a smaller block_size."
            )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)
