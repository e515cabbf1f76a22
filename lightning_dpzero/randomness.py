"""The run's secret key and the counter-based random streams derived from it.

Every random draw of the DP step (Poisson sample sizes, which examples are sampled, the Gaussian noise) comes from a
stream addressed by *labels*: (purpose, rank, logical step or sample index, draw number). A stream is rebuilt from
its labels and the key whenever it is needed, so there is no generator state to keep, checkpoint or leak:

- the key is 256 bits, from the operating system (``secrets``) unless the user fixes ``PrivacyConfig.seed``;
- a stream's generator is keyed with SHA-256(key, labels): on CPU numpy's ``Philox`` with a 128-bit key (torch's CPU
  generator keeps only 32 bits of a seed, and its Mersenne Twister state can be recovered from its outputs); a large
  CPU draw is split into parts of a fixed size, each the stream of its labels and its part number, filled in
  parallel; on CUDA torch's Philox with a 64-bit seed and a 62-bit starting offset (126 bits) per stream, drawn on
  the device;
- a checkpoint stores the public counters only (logical steps taken, samples drawn). A resumed run with an OS key
  draws a fresh key: its noise and samples are new and independent, which is valid DP (adaptive composition). With
  an explicit seed the key is rebuilt from the seed, so the counters give a bit-identical continuation.

Privacy:
    Whoever holds the key can regenerate every noise draw and subtract it from the released weights. It lives in the
    process's memory only: it is never logged, never written to a checkpoint, and not pickled (a pickled
    ``SecretKey`` is replaced by a fresh one when unpickled, e.g. in a spawned process, which then receives rank 0's
    key at set-up).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["SecretKey"]

_KEY_BYTES = 32  # 256 bits: the run's key
_OFFSET_MASK = (1 << 62) - 4  # CUDA Philox offsets: a multiple of 4 (torch's check), far from overflow


class SecretKey:
    """A run's 256-bit secret, from which every DP random stream is derived.

    Args:
        key: 32 bytes.
        seeded: whether the key was derived from a user's seed (then a resumed run rebuilds it; with an OS key a
            resumed run must draw a new one).
    """

    __slots__ = ("_key", "seeded")

    def __init__(self, key: bytes, *, seeded: bool) -> None:
        if len(key) != _KEY_BYTES:
            raise ValueError(f"SecretKey needs {_KEY_BYTES} bytes, got {len(key)}.")
        self._key = bytes(key)
        self.seeded = seeded

    @classmethod
    def from_os(cls) -> SecretKey:
        """256 bits from the operating system's cryptographically secure generator."""
        return cls(secrets.token_bytes(_KEY_BYTES), seeded=False)

    @classmethod
    def from_seed(cls, seed: int) -> SecretKey:
        """The key of a reproducible run: SHA-256 of the seed (any integer, every bit of it counts)."""
        digits = str(int(seed)).encode()
        return cls(hashlib.sha256(b"lightning_dpzero/seed/" + digits).digest(), seeded=True)

    def to_bytes(self) -> bytes:
        """The raw key, for sharing it with the other ranks of the run (in memory, over the process group)."""
        return self._key

    def derive(self, *labels: str | int) -> bytes:
        """32 bytes for the stream ``labels``: SHA-256(key, labels), one-way in the key."""
        h = hashlib.sha256(self._key)
        for label in labels:
            h.update(b"\x00" + str(label).encode())
        return h.digest()

    def numpy_generator(self, *labels: str | int) -> np.random.Generator:
        """A numpy ``Generator`` on ``Philox`` with a 128-bit key: the stream ``labels``."""
        return np.random.Generator(np.random.Philox(key=int.from_bytes(self.derive(*labels)[:16], "little")))

    def torch_generator(self, device: torch.device, *labels: str | int) -> torch.Generator:
        """A torch generator on ``device`` (CUDA: Philox) positioned at the start of the stream ``labels``."""
        digest = self.derive(*labels)
        gen = torch.Generator(device=device)
        gen.manual_seed(int.from_bytes(digest[:8], "little"))
        gen.set_offset(int.from_bytes(digest[8:16], "little") & _OFFSET_MASK)
        return gen

    def standard_normal(self, shape: torch.Size, device: torch.device, *labels: str | int) -> torch.Tensor:
        """An fp32 tensor of N(0, 1) samples of ``shape`` on ``device``, from the stream ``labels``."""
        if device.type == "cuda":
            return torch.empty(shape, device=device).normal_(generator=self.torch_generator(device, *labels))
        out = torch.empty(shape, dtype=torch.float32)
        flat = out.numpy().reshape(-1)
        if flat.size <= _PART:
            if flat.size:
                self.numpy_generator(*labels).standard_normal(out=flat, dtype=np.float32)
            return out.to(device)

        # A large draw: parts of _PART coordinates, each its own stream (labels, "part", j), filled side by side
        # (numpy fills without the GIL). The parts depend on the size alone, not on the threads: a seeded run draws
        # the same noise on any machine.
        def fill(j: int) -> None:
            part = flat[j * _PART : (j + 1) * _PART]
            self.numpy_generator(*labels, "part", j).standard_normal(out=part, dtype=np.float32)

        parts = range(-(-flat.size // _PART))
        workers = min(len(parts), torch.get_num_threads())
        if workers > 1:
            list(_pool(workers).map(fill, parts))
        else:
            for j in parts:
                fill(j)
        return out.to(device)

    def __repr__(self) -> str:
        return f"SecretKey(<256 bits, {'from a seed' if self.seeded else 'from the OS'}>)"

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # An OS key is never serialised: pickled (a spawned process, a deep copy), it comes back as a fresh one, and
        # the strategies share rank 0's key with every rank at set-up. A seeded key is no more secret than the
        # PrivacyConfig.seed it comes from, which is pickled with the config anyway.
        if self.seeded:
            return (_seeded_key, (self._key,))
        return (SecretKey.from_os, ())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretKey) and secrets.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self.derive("hash"))


def _seeded_key(key: bytes) -> SecretKey:
    return SecretKey(key, seeded=True)


_PART = 1 << 18  # coordinates per stream of a large CPU draw: ~3 ms of one core each, ~10 us to key
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (process, workers) -> threads (a forked child makes its own)


def _pool(workers: int) -> ThreadPoolExecutor:
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="lightning_dpzero-noise")
    return _POOLS[key]
