"""Offline tokenizers for the language-model tasks: characters of a fixed alphabet, bytes, and GPT-2's byte-level BPE
read from local files (``vocab.json``, ``merges.txt``)."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path

__all__ = ["ByteTokenizer", "CharTokenizer", "GPT2BPETokenizer"]


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
