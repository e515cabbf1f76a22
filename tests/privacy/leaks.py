"""What an adversary holding a run's files looks for: the key, any stream's key material, generator states.

``secret_needles`` lists byte strings that must appear in no file a run writes: the run's 256-bit key (raw and hex)
and the 128-bit Philox keys (as the two little-endian 64-bit words numpy stores them, and raw) of the first noise and
sampling streams of a rank. ``assert_no_secrets`` reads every file under the given paths byte by byte, and also
loads each torch file and walks it for generator states (torch's CPU generator state is a uint8 tensor of 5056
bytes; a CUDA one 16 bytes) and for keys that name a seed, a generator or a sampler's random state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lightning_dpzero.randomness import SecretKey

_SUSPICIOUS_KEY = re.compile(r"seed|generator|rng|random_state|\bnoise\b|rng_state", re.IGNORECASE)
_GENERATOR_STATE_SIZES = {5056, 16}


def stream_labels(rank: int, steps: int, draws: int) -> list[tuple[str | int, ...]]:
    """The labels of the noise and sampling streams a rank uses in its first ``steps`` steps."""
    labels: list[tuple[str | int, ...]] = []
    for t in range(steps):
        labels += [("noise", rank, t, d) for d in range(draws)]
        labels += [("size", t), ("sample", rank, t)]
    return labels


def secret_needles(key: bytes, rank: int, steps: int = 4, draws: int = 64) -> list[bytes]:
    """Byte strings that would let someone regenerate this rank's noise or samples."""
    secret = SecretKey(key, seeded=False)
    needles = [key, key.hex().encode()]
    for labels in stream_labels(rank, steps, draws):
        material = secret.derive(*labels)  # the stream's AES-256 key; its first 16 bytes key numpy's Philox
        needles += [material[i : i + 8] for i in range(0, 32, 8)]  # Philox keeps its key as two uint64 words
    return needles


def _files(paths: Iterable[Path]) -> list[Path]:
    found = []
    for path in paths:
        path = Path(path)
        found += [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    return found


def _encodings(needle: bytes) -> list[bytes]:
    """How a byte string can appear in a file: raw, as hex, and as pickle protocol 2 (torch.save's default) writes
    ``bytes``: decoded as latin-1, then stored as UTF-8."""
    return [needle, needle.hex().encode(), needle.decode("latin-1").encode("utf-8")]


def _walk(obj: Any, where: str, needles: list[bytes], problems: list[str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            name = str(k)
            if _SUSPICIOUS_KEY.search(name) and name not in ("noise_multiplier",):
                problems.append(f"{where}.{name}: a key that names randomness")
            _walk(v, f"{where}.{name}", needles, problems)
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            _walk(v, f"{where}[{i}]", needles, problems)
    elif isinstance(obj, torch.Tensor):
        if obj.dtype == torch.uint8 and obj.numel() in _GENERATOR_STATE_SIZES:
            problems.append(f"{where}: a uint8 tensor of {obj.numel()} bytes (a torch generator state)")
    elif isinstance(obj, torch.Generator):
        problems.append(f"{where}: a torch.Generator")
    elif isinstance(obj, (bytes, bytearray)):
        if any(n in obj for n in needles):
            problems.append(f"{where}: bytes holding secret material")
    elif isinstance(obj, str):
        if any(n.hex() in obj or n.decode("latin-1") in obj for n in needles):
            problems.append(f"{where}: a string holding secret material")
    elif isinstance(obj, int) and obj.bit_length() > 32:
        words = {
            int.from_bytes(n[i : i + 8], order)
            for n in needles
            for i in (0, 8, 16, 24)
            for order in ("little", "big")
            if len(n) >= i + 8
        }
        if obj in words or obj in {int.from_bytes(n, "little") for n in needles} | {
            int.from_bytes(n, "big") for n in needles
        }:
            problems.append(f"{where}: an integer equal to secret material")


def assert_no_secrets(paths: Iterable[Path], needles: list[bytes]) -> int:
    """Fail if any file under ``paths`` holds a needle or a generator state; returns the number of files read."""
    files = _files(paths)
    assert files, "no files to scan"
    problems: list[str] = []
    for file in files:
        data = file.read_bytes()
        for needle in needles:
            if any(form in data for form in _encodings(needle)):
                problems.append(f"{file}: holds secret bytes {needle[:8].hex()}...")
        if file.suffix in (".ckpt", ".pt") or file.name.endswith("_states.pt"):
            try:
                loaded = torch.load(file, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001 - not a torch file (DeepSpeed's helper scripts, distcp shards)
                continue
            _walk(loaded, file.name, needles, problems)
    assert not problems, "\n".join(problems[:20])
    return len(files)
