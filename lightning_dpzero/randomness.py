"""The run's secret key and the counter-based random streams derived from it.

Every random draw of the DP step (Poisson sample sizes, which examples are sampled, the Gaussian noise) comes from a
stream addressed by *labels*: (purpose, rank, logical step or sample index, draw number). A stream is rebuilt from
its labels and the key whenever it is needed, so there is no generator state to keep, checkpoint or leak:

- the key is 256 bits, from the operating system (``secrets``) unless the user fixes ``PrivacyConfig.seed``;
- a stream's key is SHA-256(key, labels). CPU noise is AES-256 in counter mode under the stream's 256-bit key (the
  ``cryptography`` package, OpenSSL: a cryptographically secure stream, ~0.12 ns per byte with AES-NI), made
  Gaussian by ``gaussian_from_bits``. Poisson sampling, which needs numpy's binomial draws and permutations, uses
  numpy's ``Philox`` with the first 128 bits of its stream's key (torch's CPU generator keeps only 32 bits of a seed,
  and its Mersenne Twister state can be recovered from its outputs). CUDA noise is torch's Philox with a 64-bit seed
  and a 62-bit starting offset (126 bits) per stream, drawn on the device in float64 (``normal_via_float64``);
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
import math
import secrets
from collections.abc import Callable

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["SecretKey", "gaussian_from_bits", "normal_via_float64"]

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
            return normal_via_float64(shape, device, self.torch_generator(device, *labels))
        return torch.from_numpy(gaussian_from_bits(math.prod(shape), self.key_stream(*labels))).view(shape).to(device)

    def key_stream(self, *labels: str | int) -> Callable[[int], bytes]:
        """The stream ``labels`` as bytes: AES-256 in counter mode under the stream's key, from counter 0.

        Each call returns the next ``n`` bytes of the stream. The stream's key is used for this stream only, so the
        fixed starting counter never repeats a (key, counter) pair.
        """
        encryptor = Cipher(algorithms.AES(self.derive(*labels)), modes.CTR(bytes(16))).encryptor()
        return lambda n: encryptor.update(bytes(n))

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


_FLOAT64_CHUNK = 1 << 24  # coordinates drawn in float64 at once on CUDA: 128 MiB of temporary


def normal_via_float64(shape: torch.Size, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """An fp32 tensor of N(0, 1) samples from torch's float64 sampler, ``_FLOAT64_CHUNK`` coordinates at a time.

    Privacy:
        On CUDA torch's float32 sampler is Box-Muller on 32-bit uniforms (cuRAND's ``curand_normal4``): its radius
        stops at sqrt(66 ln 2) = 6.76 standard deviations. Its float64 sampler (``curand_normal2_double``) takes
        53-bit uniforms, out to sqrt(108 ln 2) = 8.65 (docs/design.md, "Randomness and secrets", on what the cutoff
        costs). The generator continues from chunk to chunk: no stream is drawn twice.
    """
    out = torch.empty(shape, device=device, dtype=torch.float32)
    for chunk in out.view(-1).split(_FLOAT64_CHUNK):
        chunk.copy_(torch.empty(chunk.numel(), device=device, dtype=torch.float64).normal_(generator=generator))
    return out


_PAIRS = 1 << 15  # Box-Muller pairs per block: a block's 384 KiB of bits and its temporaries stay in cache
_RADIUS_SCALE = np.float32(2.0**-63)
_ANGLE_SCALE = np.float32(2.0 * math.pi * 2.0**-24)


def gaussian_from_bits(n: int, bits: Callable[[int], bytes]) -> np.ndarray:
    """``n`` fp32 N(0, 1) samples made from the random bytes that ``bits(k)`` returns, ``k`` at a time.

    Box-Muller in blocks of ``_PAIRS`` pairs: each pair takes 12 bytes, a 63-bit uniform ``u`` in (0, 1) for the
    radius ``sqrt(-2 ln u)`` and a 24-bit uniform angle in (0, 2 pi); the block's first half of the coordinates is
    the radii times the cosines, the second half times the sines. The layout depends on ``n`` alone, so the same
    bits give the same samples on any number of threads.

    Privacy:
        The 63-bit radius keeps the tail out to ``sqrt(128 ln 2)`` = 9.42 standard deviations per pair (32-bit
        uniforms would stop it at 6.7): the radius is cut only where its probability is below 2^-64. Computed in
        float32 (``u`` to 24 significant bits); like every float sampler it does not address floating-point attacks
        on the low-order bits (Mironov 2012).
    """
    out = np.empty(n, dtype=np.float32)
    for first in range(0, n, 2 * _PAIRS):
        count = min(2 * _PAIRS, n - first)
        pairs = (count + 1) // 2
        raw = np.frombuffer(bits(12 * pairs), dtype=np.uint8)
        # the radius: 63 bits as a non-negative int64, (k + 0.5) / 2^63 in (0, 1]
        radius = (raw[: 8 * pairs].view(np.uint64) >> np.uint64(1)).view(np.int64).astype(np.float32)
        radius += np.float32(0.5)
        radius *= _RADIUS_SCALE
        np.log(radius, out=radius)
        radius *= np.float32(-2.0)
        np.sqrt(radius, out=radius)
        angle = (raw[8 * pairs :].view(np.uint32) >> np.uint32(8)).astype(np.float32)  # the top 24 bits
        angle += np.float32(0.5)
        angle *= _ANGLE_SCALE
        cos, sin = np.cos(angle), np.sin(angle, out=angle)
        block = out[first : first + count]
        np.multiply(radius, cos, out=block[:pairs])
        np.multiply(radius[: count - pairs], sin[: count - pairs], out=block[pairs:])
    return out
