"""Public random directions z and their in-place application, one module at a time, with an exact restore.

Directions. z ~ N(0, I) over the trainable coordinates is never stored: it is regenerated from a public seed. A
parameter's coordinates (its flattened tensor, or only its kept coordinates when pruned) are cut into blocks of
``BLOCK`` entries, and block b of parameter ``name`` for direction j of logical step t is drawn, in fp32, from a
generator seeded with ``mix(direction_seed, t, j, crc32(name), b)``. Any contiguous slice of z can thus be
regenerated on its own, identically in the perturbation and in the update (and, under sharding, by the rank that
owns the slice), whatever the order of the calls.

Perturbation with an exact restore. A floating-point round trip theta + beta z - 2 beta z + beta z is not theta
(every add rounds, and the drift accumulates over steps). Instead, the parameters are perturbed lazily, module by
module: a forward pre-hook on each module that owns trainable parameters copies them (the "backup"), writes
theta + s beta z in place, and the module's forward hook copies the backup back. Restoring is a copy, so it is
bit-exact; and only one module's own parameters are held twice at any time (the largest module, e.g. a token
embedding; with pruning only its kept entries), plus one block of z. A parameter shared by several modules (tied
weights) is perturbed with the same z by whichever module runs first and restored when the last one returns.
Under FSDP2 the hooks run between FSDP's gather and its release, and perturb the gathered parameter the module
computes with (read through the module's attribute), never the rank's shard.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["BLOCK", "DirectionSampler", "Perturber", "block_seed"]

BLOCK = 1 << 16  # entries of z per generator seed: the granularity at which a slice of z is regenerated
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def block_seed(direction_seed: int, step: int, direction: int, name: str, block: int) -> int:
    """The 63-bit generator seed of one block of z (public: z carries no information about the data)."""
    x = direction_seed & _MASK64
    for word in (step, direction, zlib.crc32(name.encode()), block):
        x = _splitmix64(x ^ (word & _MASK64))
    return x >> 1


class DirectionSampler:
    """Regenerates slices of the public directions z.

    Args:
        direction_seed: the run's public direction seed (identical on every rank).
    """

    def __init__(self, direction_seed: int) -> None:
        self.direction_seed = direction_seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def blocks(
        self, *, step: int, direction: int, name: str, total: int, lo: int, hi: int, device: torch.device
    ) -> Iterator[tuple[int, int, Tensor]]:
        """Yield (start, end, z[start:end]) covering entries [lo, hi) of a parameter's z, block by block.

        Args:
            total: the length of the parameter's z (its numel, or its number of kept coordinates): block b always
                holds min(BLOCK, total - b BLOCK) draws, so a slice is the same whoever regenerates it.
        Returns:
            fp32 slices of shape [end - start], each within one block.
        """
        gen = self._generator(device)
        for b in range(lo // BLOCK, -(-hi // BLOCK)):
            first = b * BLOCK
            start, end = max(lo, first), min(hi, first + BLOCK)
            gen.manual_seed(block_seed(self.direction_seed, step, direction, name, b))
            z = torch.randn(min(BLOCK, total - first), generator=gen, device=device)  # [block length]
            yield start, end, z[start - first : end - first]

    def full(self, *, step: int, direction: int, name: str, numel: int, device: torch.device) -> Tensor:
        """z for all ``numel`` entries of one parameter (tests and references only: full size)."""
        blocks = self.blocks(step=step, direction=direction, name=name, total=numel, lo=0, hi=numel, device=device)
        parts = [z for _, _, z in blocks]
        return torch.cat(parts) if parts else torch.zeros(0, device=device)


@dataclass
class _Perturbation:
    step: int
    direction: int
    scale: float  # s * beta: +beta or -beta


class Perturber:
    """Forward hooks that evaluate the model at theta + s beta z while a ``perturbed`` context is open.

    Args:
        model: the module whose forward passes are perturbed.
        params: canonical name -> trainable parameter (each shared parameter once).
        kept: canonical name -> sorted flat indices of its kept coordinates (int64), or ``None`` for all of them.
            A parameter with no kept coordinate is left out of ``params`` by the caller.
        directions: the public direction generator.
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        kept: dict[str, Tensor | None],
        directions: DirectionSampler,
    ) -> None:
        self.model, self.params, self.kept, self.directions = model, params, kept, directions
        names = {id(p): name for name, p in params.items()}
        # module -> [(canonical name, attribute)]: the hooks read the parameter through the module's attribute,
        # which under FSDP2 holds the gathered (unsharded) parameter during the module's forward.
        self._owned: dict[nn.Module, list[tuple[str, str]]] = {}
        for module in model.modules():
            own = [(names[id(p)], attr) for attr, p in module.named_parameters(recurse=False) if id(p) in names]
            if own:
                self._owned[module] = own
        self._handles: list[RemovableHandle] = []
        self._active: _Perturbation | None = None
        self._depth: dict[str, int] = {}
        self._backup: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (perturbed tensor, its exact values)
        self.seen: set[str] = set()  # parameters perturbed at least once (coverage check of the first step)

    def install(self) -> None:
        if self._handles:
            return
        for module in self._owned:
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            # prepend: restore before any other forward hook (e.g. a sharded engine releasing gathered parameters)
            self._handles.append(module.register_forward_hook(self._post_hook, prepend=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def perturbed(self, *, step: int, direction: int, scale: float) -> Iterator[None]:
        """Forward passes inside see every trainable parameter at theta + scale * z_direction."""
        assert self._active is None, "nested perturbation"
        self._active = _Perturbation(step, direction, scale)
        try:
            yield
        finally:
            self._active = None
            for name in list(self._backup):  # a forward that raised left its modules perturbed: restore them
                self._restore(name)
            self._depth.clear()

    # ---------------------------------------------------------------------------------------------- hooks
    def _pre_hook(self, module: nn.Module, args: object) -> None:
        if self._active is None:
            return
        for name, attr in self._owned[module]:
            depth = self._depth.get(name, 0)
            if depth == 0:
                self._perturb(name, getattr(module, attr))
            self._depth[name] = depth + 1

    def _post_hook(self, module: nn.Module, args: object, output: object) -> None:
        if self._active is None:
            return
        for name, _ in self._owned[module]:
            self._depth[name] -= 1
            if self._depth[name] == 0:
                self._restore(name)

    @torch.no_grad()
    def _perturb(self, name: str, param: Tensor) -> None:
        """Write theta + s beta z into ``param``: the parameter itself, or under FSDP2 its gathered copy."""
        active = self._active
        assert active is not None
        flat = _flat(param, name)
        idx = self.kept[name]
        backup = flat.clone() if idx is None else flat.index_select(0, idx)  # [n] or [k]: the exact values
        values = flat if idx is None else backup.clone()
        for lo, hi, z in self.directions.blocks(
            step=active.step,
            direction=active.direction,
            name=name,
            total=values.numel(),
            lo=0,
            hi=values.numel(),
            device=flat.device,
        ):
            values[lo:hi].add_(z.to(values.dtype), alpha=active.scale)
        if idx is not None:
            flat.index_copy_(0, idx, values)
        self._backup[name] = (flat, backup)
        self.seen.add(name)

    @torch.no_grad()
    def _restore(self, name: str) -> None:
        flat, backup = self._backup.pop(name)
        idx = self.kept[name]
        if idx is None:
            flat.copy_(backup)
        else:
            flat.index_copy_(0, idx, backup)


def _flat(param: Tensor, name: str) -> Tensor:
    """A 1-D view of ``param``'s storage (writes go to the parameter)."""
    data = param.detach()
    if not data.is_contiguous():
        raise ValueError(
            f"zeroth-order: parameter {name!r} is not contiguous; it is perturbed in place through a flat view. "
            "Make it contiguous (e.g. `param.data = param.data.contiguous()`) before training."
        )
    return data.view(-1)
