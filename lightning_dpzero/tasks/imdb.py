"""IMDb sentiment classification: a Transformer encoder classifier over hashed word tokens, real or embedded data.

Shapes: n examples, S token positions (``max_len``), D features, V vocabulary (hash buckets), K=2 classes.

The real data set is the ``aclImdb_v1.tar.gz`` release (``aclImdb/{train,test}/{pos,neg}/*.txt``), read from a
local ``root`` or downloaded (MD5-checked) when ``download=True``. Without ``root`` the data module generates an
offline stand-in: short reviews built from templates, whose sentiment sentences may be negated ("was not great"),
so word order matters a little.

The tokenizer needs no download and, unlike a vocabulary built from the training texts, reveals nothing about them:
lower-cased words (and punctuation marks) are hashed into V - 2 buckets (CRC-32), id 0 is padding, id 1 a leading
``[CLS]`` token that every example has (so no example is all padding).
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dpzero.tasks._common import ClassifierTask, EncoderBlock
from lightning_dpzero.tasks._data import download_and_verify, extract_tar

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict

__all__ = [
    "IMDB_MD5",
    "IMDB_URL",
    "HashingTokenizer",
    "IMDBDataModule",
    "IMDBTask",
    "TransformerClassifier",
    "load_imdb",
    "synthetic_reviews",
    "transformer_classifier",
]

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_MD5 = "7c2ac02c03563afcf9b574c7e56c153a"
_ARCHIVE, _FOLDER = "aclImdb_v1.tar.gz", "aclImdb"
_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


class HashingTokenizer:
    """Words -> ids by hashing: no vocabulary file, no download, nothing learnt from the data.

    Args:
        vocab_size: V; ids 2..V-1 are hash buckets (collisions are rare for V >> distinct words in use).

    Ids: 0 = padding, 1 = ``[CLS]`` (prepended by ``encode_batch``).
    """

    pad_id, cls_id = 0, 1

    def __init__(self, vocab_size: int = 16384) -> None:
        if vocab_size < 3:
            raise ValueError(f"HashingTokenizer: vocab_size={vocab_size} must be at least 3 (padding, [CLS], words).")
        self.vocab_size = vocab_size

    def words(self, text: str) -> list[str]:
        """Lower-cased words and punctuation marks; IMDb's ``<br />`` line breaks are dropped."""
        return _WORD.findall(text.replace("<br />", " ").lower())

    def encode(self, text: str) -> list[int]:
        buckets = self.vocab_size - 2
        return [2 + zlib.crc32(word.encode("utf-8")) % buckets for word in self.words(text)]

    def encode_batch(self, texts: list[str], max_len: int) -> Tensor:
        """[CLS] + the first ``max_len - 1`` word ids of each text, padded with 0: int64 [len(texts), max_len]."""
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        for i, text in enumerate(texts):
            row = [self.cls_id, *self.encode(text)[: max_len - 1]]
            ids[i, : len(row)] = torch.tensor(row)
        return ids


class TransformerClassifier(nn.Module):
    """Token + position embeddings, pre-LN encoder blocks with a key-padding mask, masked mean pooling, linear head.

    Args:
        vocab_size: V (id 0 is padding).
        max_len: S, the longest sequence (size of the position table).
        num_classes: K.
        dim: D.
        depth: encoder blocks.
        heads: attention heads (divide D).
        mlp_ratio: feed-forward width in units of D.
        dropout: dropout in the blocks.

    Input ids [n, S'] (S' <= S, 0 = padding, at least one non-padding id per row) -> logits [n, K].
    """

    def __init__(
        self,
        vocab_size: int = 16384,
        max_len: int = 256,
        num_classes: int = 2,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=HashingTokenizer.pad_id)
        self.positions = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.tokens.weight[HashingTokenizer.pad_id].zero_()

    def forward(self, ids: Tensor) -> Tensor:
        n, s = ids.shape
        padding = ids == HashingTokenizer.pad_id  # [n, S]: True where there is no token
        positions = torch.arange(s, device=ids.device).expand(n, -1)  # [n, S]: one row per example
        h = self.tokens(ids) + self.positions(positions)  # [n, S, D]
        for block in self.blocks:
            h = block(h, padding)
        keep = (~padding).unsqueeze(-1).to(h.dtype)  # [n, S, 1]
        pooled = (self.norm(h) * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # [n, D]
        return self.head(pooled)  # [n, K]


def transformer_classifier(
    vocab_size: int = 16384, max_len: int = 256, dim: int = 128, depth: int = 2, heads: int = 4, dropout: float = 0.0
) -> TransformerClassifier:
    """The IMDb model: 2.5M parameters at the defaults, 2.1M of them in the token table."""
    return TransformerClassifier(vocab_size, max_len, 2, dim, depth, heads, 4.0, dropout)


class IMDBTask(ClassifierTask):
    """Binary sentiment classification with per-example cross-entropy (see ``ClassifierTask``).

    Args:
        net: the classifier (ids [n, S] -> [n, 2]); ``None`` builds ``transformer_classifier(vocab_size, max_len)``.
        vocab_size: V, used when ``net`` is None; must match the data module's tokenizer.
        max_len: S, used when ``net`` is None.
        optimizer: ``adamw`` or ``sgd``.
        lr: learning rate.
        momentum: AdamW's beta1 or SGD momentum.
        weight_decay: weight decay.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        vocab_size: int = 16384,
        max_len: int = 256,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            net if net is not None else transformer_classifier(vocab_size, max_len),
            num_classes=2,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        # With a given net, vocab_size and max_len are unused: recording their defaults would contradict the data
        # module's (Lightning refuses to log hyperparameters that disagree).
        self.save_hyperparameters(ignore=["net"] if net is None else ["net", "vocab_size", "max_len"])


# ------------------------------------------------------------------------------------------------ data
_POSITIVE = (
    "great wonderful brilliant moving excellent superb charming delightful memorable beautiful funny gripping"
).split()
_NEGATIVE = "awful boring terrible dull clumsy painful forgettable bland tedious ugly predictable messy".split()
_SUBJECTS = (
    "the movie",
    "this film",
    "the acting",
    "the plot",
    "the script",
    "the ending",
    "the soundtrack",
    "the camera work",
    "the cast",
    "the story",
    "every scene",
    "the dialogue",
)
_INTENSIFIERS = ("", "really ", "truly ", "quite ", "very ", "rather ")
_FILLERS = (
    "i saw it on a rainy sunday.",
    "my friend recommended it to me.",
    "it runs for about two hours.",
    "the cinema was half empty.",
    "i watched it with my family.",
    "it came out last year.",
    "the popcorn was cold.",
    "we went to the late show.",
    "it is based on a novel.",
    "there is a long chase in the middle.",
)


def synthetic_reviews(num_examples: int, *, seed: int) -> tuple[list[str], Tensor]:
    """Template reviews with a learnable label, and int64 labels [N] (1 = positive).

    A review has 1-3 sentences that state its label ("the plot was truly dull.") and 0-2 neutral ones, shuffled.
    A sentence is negated with probability 0.25, and then carries an adjective of the opposite polarity ("the plot
    was not brilliant." in a negative review): counting adjectives alone gets about a fifth of the reviews wrong,
    reading "not" gets them all right.
    """
    gen = torch.Generator().manual_seed(seed)

    def pick(options: tuple[str, ...] | list[str]) -> str:
        return options[int(torch.randint(len(options), (), generator=gen))]

    texts, labels = [], []
    for _ in range(num_examples):
        label = int(torch.randint(2, (), generator=gen))
        sentences = []
        for _ in range(int(torch.randint(1, 4, (), generator=gen))):
            negate = bool(torch.rand((), generator=gen) < 0.25)
            adjective = pick(_POSITIVE if bool(label) != negate else _NEGATIVE)  # "not" flips the polarity
            sentences.append(f"{pick(_SUBJECTS)} was {'not ' if negate else ''}{pick(_INTENSIFIERS)}{adjective}.")
        sentences += [pick(_FILLERS) for _ in range(int(torch.randint(0, 3, (), generator=gen)))]
        order = torch.randperm(len(sentences), generator=gen).tolist()
        texts.append(" ".join(sentences[i] for i in order))
        labels.append(label)
    return texts, torch.tensor(labels, dtype=torch.long)


def _imdb_folder(root: Path, download: bool) -> Path:
    """Find ``aclImdb/`` under ``root`` (or ``root`` itself), extracting or downloading the archive."""
    for folder in (root, root / _FOLDER):
        if (folder / "train" / "pos").is_dir():
            return folder
    archive = root if root.is_file() else root / _ARCHIVE
    if not archive.is_file() and download:
        download_and_verify(IMDB_URL, archive, IMDB_MD5, owner="load_imdb")
    if archive.is_file():
        extract_tar(archive, archive.parent, owner="load_imdb")
        if (archive.parent / _FOLDER / "train" / "pos").is_dir():
            return archive.parent / _FOLDER
        raise FileNotFoundError(f"load_imdb: {str(archive)!r} did not contain {_FOLDER}/train/pos.")
    raise FileNotFoundError(
        f"load_imdb: no IMDb data at {str(root)!r}: expected {_FOLDER}/{{train,test}}/{{pos,neg}}/*.txt or "
        f"{_ARCHIVE}. Pass download=True to fetch it ({IMDB_URL}), or leave root unset for the embedded data."
    )


def _read_split(folder: Path) -> tuple[list[str], Tensor]:
    texts, labels = [], []
    for label, name in ((0, "neg"), (1, "pos")):
        files = sorted((folder / name).glob("*.txt"))
        texts += [f.read_text(encoding="utf-8") for f in files]
        labels += [label] * len(files)
    if not texts:
        raise FileNotFoundError(f"load_imdb: no reviews in {str(folder)!r}/{{pos,neg}}/*.txt.")
    return texts, torch.tensor(labels, dtype=torch.long)


def load_imdb(root: str | Path, download: bool = False) -> tuple[list[str], Tensor, list[str], Tensor]:
    """The Large Movie Review Dataset (Maas et al. 2011) from ``root``: ``aclImdb/`` (or that folder itself), or
    ``aclImdb_v1.tar.gz`` (in ``root`` or as ``root``), extracted next to itself. The ``unsup`` reviews are ignored.

    Args:
        root: a folder or the archive.
        download: fetch the archive into ``root`` (MD5-checked) when neither is there.

    Returns:
        train texts, train labels int64 [N] (1 = pos), test texts, test labels; negatives first, files sorted.

    Raises:
        FileNotFoundError: nothing found and ``download`` is false.
    """
    folder = _imdb_folder(Path(root), download)
    return (*_read_split(folder / "train"), *_read_split(folder / "test"))


def _subset(texts: list[str], labels: Tensor, count: int | None, seed: int) -> tuple[list[str], Tensor]:
    if count is None or count >= len(labels):
        return texts, labels
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:count]
    return [texts[i] for i in keep.tolist()], labels[keep]


class IMDBDataModule(L.LightningDataModule):
    """IMDb reviews from ``root`` (validation = the test split), or the embedded template reviews when ``root`` is
    None; tokenized once in ``setup`` to fixed-length id rows [N, max_len].

    Args:
        root: folder holding ``aclImdb/`` or ``aclImdb_v1.tar.gz`` (or the archive itself); ``None``: generated.
        download: fetch the archive into ``root`` when missing (needs network; MD5-checked).
        num_train: N. Real data: ``None`` keeps all 25000, a number takes a fixed random subset. Embedded data:
            the number generated (``None``: 4096).
        num_val: the same for validation (real: 25000 test reviews; embedded default 512).
        max_len: S: [CLS] plus the first S-1 tokens of each review.
        vocab_size: V of the ``HashingTokenizer``.
        batch_size: the DataLoader batch size: the expected logical batch B when the privacy config sets none.
        num_workers: DataLoader worker processes.
        seed: seeds the embedded data and the subsets.
    """

    if TYPE_CHECKING:  # save_hyperparameters() stores them as an AttributeDict; Lightning declares any MutableMapping

        @property
        def hparams(self) -> AttributeDict: ...

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        num_train: int | None = None,
        num_val: int | None = None,
        max_len: int = 256,
        vocab_size: int = 16384,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = HashingTokenizer(vocab_size)

    def prepare_data(self) -> None:
        if self.hparams.root is not None and self.hparams.download:
            _imdb_folder(Path(self.hparams.root), download=True)

    def setup(self, stage: str) -> None:
        h = self.hparams
        if h.root is None:
            train = synthetic_reviews(h.num_train or 4096, seed=h.seed)
            val = synthetic_reviews(h.num_val or 512, seed=h.seed + 1)
        else:
            train_texts, train_labels, test_texts, test_labels = load_imdb(h.root, download=h.download)
            train = _subset(train_texts, train_labels, h.num_train, h.seed)
            val = _subset(test_texts, test_labels, h.num_val, h.seed + 1)
        self.train_set = TensorDataset(self.tokenizer.encode_batch(train[0], h.max_len), train[1])
        self.val_set = TensorDataset(self.tokenizer.encode_batch(val[0], h.max_len), val[1])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, shuffle=True, num_workers=self.hparams.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
