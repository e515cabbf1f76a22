"""GPT task: a GPT-2-style causal language model, offline tokenizers, text data and checkpoint loading.

The default corpus is generated: lines of additions (``"37+45=82;"``), which have structure a small model learns
within a few hundred private steps (format first, then digits). Real text files can be used with
``TextFileDataModule`` (byte-level tokens by default: nothing to download, nothing learnt from the private text).
``GPTTask(checkpoint_path=...)`` starts from a Lightning checkpoint, a ``torch.save``d state dict (of ``GPT`` or
``GPTTask``) or Hugging Face GPT-2 weights (``model.safetensors`` / ``pytorch_model.bin``, with ``config.json`` when
a folder is given), mapped onto ``GPT`` without needing ``transformers``; ``GPT2BPETokenizer`` reads GPT-2's
``vocab.json`` and ``merges.txt`` from a local folder. Shapes: n examples, T positions, D features, V vocabulary.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

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


class ByteTokenizer:
    """UTF-8 bytes as tokens (V = 256): any text, no download, no vocabulary learnt from the data."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (merges are written in these)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


# GPT-2's pre-tokenizer with Python's `re`: \p{L} is [^\W\d_] and \p{N} is \d. Letters, ASCII digits, punctuation and
# whitespace split exactly as GPT-2 does; numerals outside Unicode's Nd class (e.g. "²") may split differently.
_GPT2_PIECES = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


class GPT2BPETokenizer:
    """GPT-2's byte-level BPE from local files (``vocab.json``, ``merges.txt``), for fine-tuning GPT-2 weights.

    Args:
        vocab: token string -> id (the contents of ``vocab.json``).
        merges: the merge rules in priority order, each a pair of token strings (``merges.txt`` minus its header).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
        self.vocab = vocab
        self.inverse = {i: token for token, i in vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def from_folder(cls, folder: str | Path) -> GPT2BPETokenizer:
        """Read ``vocab.json`` and ``merges.txt`` from ``folder`` (a Hugging Face GPT-2 model folder)."""
        folder = Path(folder)
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(vocab, merges)  # type: ignore[arg-type]

    @property
    def vocab_size(self) -> int:
        return max(self.inverse) + 1

    def _bpe(self, piece: str) -> list[str]:
        if piece in self._cache:
            return self._cache[piece]
        word = list(piece)
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in _GPT2_PIECES.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.vocab[token] for token in self._bpe(mapped)]
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.inverse[i] for i in ids)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


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


# ------------------------------------------------------------------------------------------------ checkpoints
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Read a ``.safetensors`` file without the ``safetensors`` package.

    The format: an 8-byte little-endian header length, a JSON header mapping each name to its dtype, shape and
    byte range (``data_offsets``, relative to the end of the header), then the raw little-endian tensor bytes.

    Raises:
        ValueError: a truncated file, an unknown dtype, or a byte range that does not match the shape.
    """
    raw = Path(path).read_bytes()
    if len(raw) < 8:
        raise ValueError(f"load_safetensors: {str(path)!r} is too short to be a safetensors file.")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if 8 + header_len > len(raw):
        raise ValueError(f"load_safetensors: {str(path)!r} declares a {header_len}-byte header past its end.")
    header = json.loads(raw[8 : 8 + header_len])
    data = memoryview(raw)[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"load_safetensors: tensor {name!r} has unsupported dtype {info['dtype']!r}.")
        start, end = info["data_offsets"]
        shape = info["shape"]
        if end - start != math.prod(shape) * dtype.itemsize or end > len(data):
            raise ValueError(f"load_safetensors: tensor {name!r}: byte range {start}..{end} does not fit {shape}.")
        flat = torch.frombuffer(bytearray(data[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(shape)
    return tensors


# Hugging Face GPT-2 names -> ours. Its Conv1D stores weights as [in, out]: transposed to nn.Linear's [out, in].
_HF_BLOCK = {
    "ln_1.weight": ("ln1.weight", False),
    "ln_1.bias": ("ln1.bias", False),
    "attn.c_attn.weight": ("attn.qkv.weight", True),
    "attn.c_attn.bias": ("attn.qkv.bias", False),
    "attn.c_proj.weight": ("attn.proj.weight", True),
    "attn.c_proj.bias": ("attn.proj.bias", False),
    "ln_2.weight": ("ln2.weight", False),
    "ln_2.bias": ("ln2.bias", False),
    "mlp.c_fc.weight": ("fc.weight", True),
    "mlp.c_fc.bias": ("fc.bias", False),
    "mlp.c_proj.weight": ("out.weight", True),
    "mlp.c_proj.bias": ("out.bias", False),
}
_HF_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # the causal-mask buffers: not parameters


def _from_hf_gpt2(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``GPT2Model``/``GPT2LMHeadModel`` tensors -> a ``GPT`` state dict (tied head)."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    ours: dict[str, Tensor] = {}
    for key, value in hf.items():
        if key in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
            ours[key] = value
        elif key == "lm_head.weight":
            if not torch.equal(value, hf["wte.weight"]):
                raise ValueError("load_gpt_checkpoint: lm_head.weight differs from wte.weight; GPT ties them.")
        elif match := re.fullmatch(r"h\.(\d+)\.(.+)", key):
            if _HF_BUFFERS.fullmatch(key):
                continue
            if match.group(2) not in _HF_BLOCK:
                raise ValueError(f"load_gpt_checkpoint: unexpected GPT-2 tensor {key!r}.")
            name, transpose = _HF_BLOCK[match.group(2)]
            ours[f"blocks.{match.group(1)}.{name}"] = value.t().contiguous() if transpose else value
        else:
            raise ValueError(f"load_gpt_checkpoint: unexpected GPT-2 tensor {key!r}.")
    ours["head.weight"] = ours["wte.weight"]
    return ours


def _read_weights(path: Path) -> Any:
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    # weights_only: a checkpoint file can never run code while it is read
    return torch.load(path, map_location="cpu", weights_only=True)


def load_gpt_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weights for ``GPT`` from any of the formats below, and the model sizes they imply.

    - a Lightning checkpoint of ``GPTTask`` (``trainer.save_checkpoint``): ``state_dict`` with ``model.`` keys;
      its ``hyper_parameters`` give ``n_head`` and ``activation``;
    - a ``torch.save``d state dict of ``GPT`` or of ``GPTTask`` (``.pt``/``.pth``/``.bin``);
    - Hugging Face GPT-2 weights: a folder with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``
      (or one of those files; then ``n_head`` must come from the caller), mapped by name, Conv1D weights transposed.

    Args:
        path: the file or folder.

    Returns:
        (state dict with ``GPT``'s keys, sizes) where sizes holds ``vocab_size``, ``block_size``, ``n_layer``,
        ``n_embd`` (from the tensor shapes) and ``n_head``/``activation`` where the checkpoint records them.

    Raises:
        FileNotFoundError: no weights at ``path``.
        ValueError: tensors that match none of the formats.
    """
    path = Path(path)
    config: dict[str, Any] = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        files = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        if not files:
            raise FileNotFoundError(f"load_gpt_checkpoint: no model.safetensors or pytorch_model.bin in {str(path)!r}.")
        path = files[0]
    elif not path.is_file():
        raise FileNotFoundError(f"load_gpt_checkpoint: no checkpoint at {str(path)!r}.")
    loaded = _read_weights(path)
    sizes: dict[str, Any] = {}
    if isinstance(loaded, dict) and "state_dict" in loaded:  # Lightning checkpoint
        hparams = loaded.get("hyper_parameters") or {}
        sizes.update({k: hparams[k] for k in ("n_head", "activation") if k in hparams})
        loaded = loaded["state_dict"]
    if any(k.removeprefix("transformer.").startswith("h.0.") for k in loaded):
        state = _from_hf_gpt2(loaded)
        sizes["activation"] = "gelu_tanh" if config.get("activation_function", "gelu_new") == "gelu_new" else "gelu"
        if "n_head" in config:
            sizes["n_head"] = config["n_head"]
    else:
        state = {k.removeprefix("model."): v for k, v in loaded.items()}
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise ValueError(
            f"load_gpt_checkpoint: {str(path)!r} holds neither GPT, GPTTask nor Hugging Face GPT-2 weights "
            f"(first keys: {list(loaded)[:5]})."
        )
    state.setdefault("head.weight", state["wte.weight"])
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    sizes.update(
        vocab_size=state["wte.weight"].shape[0],
        n_embd=state["wte.weight"].shape[1],
        block_size=state["wpe.weight"].shape[0],
        n_layer=max(layers) + 1 if layers else 0,
    )
    return state, sizes


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
