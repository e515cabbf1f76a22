"""CIFAR-10 image classification: GroupNorm Wide-ResNet (or a small ViT), real or embedded data.

Shapes: n examples, C=3 channels, H=W=32 pixels (any size for the embedded data), K=10 classes, D features.

The real data set is the standard python-pickle release (``cifar-10-python.tar.gz``, extracting to
``cifar-10-batches-py/`` with ``data_batch_1..5`` and ``test_batch``), read from a local ``root`` or downloaded
(with its MD5 checked) when ``download=True``. Without ``root`` the data module generates an offline stand-in:
class-conditional 32x32 images (a smooth random template per class, randomly shifted, contrast-jittered and noised),
which a small network learns within a few hundred private steps.

The models contain no BatchNorm (it mixes examples, which per-example clipping cannot allow): the Wide-ResNet uses
GroupNorm, as in De et al. 2022 (arXiv:2204.13650), without their weight standardisation and augmentation
multiplicity; the ViT uses LayerNorm and ``DPMultiheadAttention``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_dpzero.strategies.query import is_private
from lightning_dpzero.tasks._common import ClassifierTask, EncoderBlock
from lightning_dpzero.tasks._data import download_and_verify, extract_tar

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "CIFAR10DataModule",
    "CIFARTask",
    "VisionTransformer",
    "WideResNet",
    "load_cifar10",
    "random_crop",
    "random_horizontal_flip",
    "synthetic_cifar10",
    "vit_tiny",
    "wide_resnet",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
_ARCHIVE, _FOLDER = "cifar-10-python.tar.gz", "cifar-10-batches-py"
# Per-channel mean and std of the CIFAR-10 training images (public constants, not computed from the private data).
_MEAN = (0.4914, 0.4822, 0.4465)
_STD = (0.2470, 0.2435, 0.2616)


# ------------------------------------------------------------------------------------------------ models
def _group_count(groups: int, channels: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups`` (GroupNorm needs groups | channels)."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


class _WideBlock(nn.Module):
    """Pre-activation residual block: GN -> ReLU -> conv3x3(stride) -> GN -> ReLU -> conv3x3, plus shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_group_count(groups, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_group_count(groups, out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        reshape = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if reshape else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.norm2(self.conv1(out))))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis 2016) with GroupNorm instead of BatchNorm.

    Args:
        depth: 6k + 4 layers (10, 16, 22, 28, 40): k residual blocks in each of three stages.
        width: the widening factor; stage widths are 16w, 32w, 64w.
        num_classes: K.
        groups: GroupNorm groups (reduced to a divisor where a width is not a multiple).
        in_channels: C.

    Input [n, C, H, W] -> logits [n, K] (global average pooling, so any H, W >= 4 work).
    """

    def __init__(
        self, depth: int = 16, width: int = 4, num_classes: int = 10, groups: int = 16, in_channels: int = 3
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth={depth} must be 6k + 4 with k >= 1 (10, 16, 22, 28, 40).")
        if width < 1:
            raise ValueError(f"WideResNet: width={width} must be a positive integer.")
        per_stage = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks = []
        for stage in range(3):
            for i in range(per_stage):
                cin = widths[stage] if i == 0 else widths[stage + 1]
                stride = 2 if (i == 0 and stage > 0) else 1
                blocks.append(_WideBlock(cin, widths[stage + 1], stride, groups))
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(_group_count(groups, widths[3]), widths[3])
        self.head = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))  # [n, 64w, H/4, W/4]
        return self.head(F.relu(self.norm(x)).mean((2, 3)))  # [n, K]


class VisionTransformer(nn.Module):
    """A small ViT: conv patch embedding, class token and learned positions (both ``nn.Embedding`` looked up per
    example, so no output is broadcast over the examples), pre-LN encoder blocks, linear head on the class token.

    Args:
        image_size: H = W.
        patch_size: P; ``image_size`` must be a multiple. S = (H/P)^2 + 1 tokens.
        num_classes: K.
        dim: D.
        depth: encoder blocks.
        heads: attention heads (divide D).
        mlp_ratio: feed-forward width in units of D.
        in_channels: C.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 2.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"VisionTransformer: image_size={image_size} is not a multiple of patch_size={patch_size}."
            )
        self.num_tokens = (image_size // patch_size) ** 2 + 1
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls = nn.Embedding(1, dim)
        self.pos = nn.Embedding(self.num_tokens, dim)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.cls.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        patches = self.patch(x).flatten(2).transpose(1, 2)  # [n, S-1, D]
        if patches.shape[1] + 1 != self.num_tokens:
            raise ValueError(
                f"VisionTransformer: got {tuple(x.shape[2:])} images, built for {self.num_tokens - 1} patches."
            )
        cls = self.cls(torch.zeros(n, 1, dtype=torch.long, device=x.device))  # [n, 1, D]: one lookup per example
        positions = torch.arange(self.num_tokens, device=x.device).expand(n, -1)  # [n, S]
        h = torch.cat([cls, patches], 1) + self.pos(positions)  # [n, S, D]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))  # [n, K]


def wide_resnet(depth: int = 16, width: int = 4, num_classes: int = 10, groups: int = 16) -> WideResNet:
    """WRN-``depth``-``width`` with GroupNorm(``groups``): WRN-16-4 (2.7M parameters) is De et al.'s CIFAR-10 model."""
    return WideResNet(depth=depth, width=width, num_classes=num_classes, groups=groups)


def vit_tiny(
    image_size: int = 32, patch_size: int = 4, num_classes: int = 10, dim: int = 192, depth: int = 6, heads: int = 3
) -> VisionTransformer:
    """A ViT for 32x32 images (64 patches of 4x4 plus a class token); 1.8M parameters at the defaults."""
    return VisionTransformer(image_size, patch_size, num_classes, dim, depth, heads)


class CIFARTask(ClassifierTask):
    """Image classification with per-example cross-entropy (see ``ClassifierTask``).

    Args:
        net: the classifier (``wide_resnet(...)``, ``vit_tiny(...)`` or any module [n, C, H, W] -> [n, K]);
            ``None`` builds WRN-16-4.
        num_classes: K.
        optimizer: ``sgd`` or ``adamw``.
        lr: learning rate. Under DP the update is the noisy clipped sum divided by B, so with C = 1 and
            large B the usual DP-SGD rates are large (De et al.: 2 to 4 with plain SGD).
        momentum: SGD momentum, or AdamW's beta1.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        num_classes: int = 10,
        optimizer: str = "sgd",
        lr: float = 2.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            net if net is not None else wide_resnet(num_classes=num_classes),
            num_classes=num_classes,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        self.save_hyperparameters(ignore=["net"])


# ------------------------------------------------------------------------------------------------ transforms
def random_crop(image: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad ``image`` [C, H, W] by ``padding`` pixels on each side and cut a random H x W window (torchvision's
    ``RandomCrop(H, padding)``)."""
    _, h, w = image.shape
    padded = F.pad(image, (padding, padding, padding, padding))  # [C, H + 2p, W + 2p]
    top, left = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
    return padded[:, top : top + h, left : left + w]


def random_horizontal_flip(image: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Mirror ``image`` [C, H, W] left-right with probability ``p``."""
    return image.flip(-1) if torch.rand((), generator=generator).item() < p else image


class _ImageDataset(Dataset):
    """uint8 images [N, H, W, C] and labels [N] -> (standardised float image [C, H, W], label)."""

    def __init__(self, images: Tensor, labels: Tensor, augment: bool) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(_MEAN).view(3, 1, 1)
        self.std = torch.tensor(_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i].permute(2, 0, 1).float() / 255.0  # [C, H, W] in [0, 1]
        if self.augment:
            x = random_horizontal_flip(random_crop(x, padding=4))
        return (x - self.mean) / self.std, self.labels[i]


# ------------------------------------------------------------------------------------------------ data
def synthetic_cifar10(
    num_examples: int, *, seed: int, image_size: int = 32, num_classes: int = 10, template_seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Class-conditional images with learnable structure, as uint8 [N, H, W, 3] and int64 labels [N].

    Each class has a smooth random colour template (4x4 noise, bilinearly upsampled), shared by every split through
    ``template_seed``. An example is its class template shifted by up to H/8 pixels, contrast-jittered (x0.6-1.4)
    and noised (std 0.15). ``seed`` picks the examples: use different seeds for train and validation.
    """
    templates_gen = torch.Generator().manual_seed(template_seed)
    low = torch.rand(num_classes, 3, 4, 4, generator=templates_gen)
    templates = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)  # [K,3,H,W]
    shift = max(1, image_size // 8)
    padded = F.pad(templates, (shift, shift, shift, shift), mode="reflect")  # [K, 3, H + 2s, W + 2s]
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_examples,), generator=gen)
    offsets = torch.randint(0, 2 * shift + 1, (num_examples, 2), generator=gen).tolist()
    contrast = 0.6 + 0.8 * torch.rand(num_examples, 1, 1, 1, generator=gen)
    crops = torch.stack(
        [padded[c, :, t : t + image_size, s : s + image_size] for c, (t, s) in zip(labels.tolist(), offsets)]
    )  # [N, 3, H, W]
    images = 0.5 + contrast * (crops - 0.5) + 0.15 * torch.randn(crops.shape, generator=gen)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # [N, H, W, 3]
    return images, labels


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch files (dicts of numpy arrays, lists and bytes) and nothing else: a pickle that
    names any other callable is refused rather than executed."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"load_cifar10: the batch file refers to {module}.{name}, which a CIFAR-10 batch never does; "
                "refusing to load it (the file is not the official data set)."
            )
        return super().find_class(module, name)


def _read_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One batch file -> uint8 images [n, 32, 32, 3] and int64 labels [n]."""
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"load_cifar10: {str(path)!r} has no 'data'/'labels' entries; is it a CIFAR-10 batch?")
    images = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)  # rows: 1024 R, 1024 G, 1024 B
    return images.permute(0, 2, 3, 1).contiguous(), torch.as_tensor(labels, dtype=torch.long)


def _cifar_folder(root: Path, download: bool) -> Path:
    """Find ``cifar-10-batches-py`` under ``root`` (or ``root`` itself), extracting or downloading the archive."""
    for folder in (root, root / _FOLDER):
        if (folder / "data_batch_1").is_file():
            return folder
    archive = root if root.is_file() else root / _ARCHIVE
    if not archive.is_file() and download:
        download_and_verify(CIFAR10_URL, archive, CIFAR10_MD5, owner="load_cifar10")
    if archive.is_file():
        extract_tar(archive, archive.parent, owner="load_cifar10")
        if (archive.parent / _FOLDER / "data_batch_1").is_file():
            return archive.parent / _FOLDER
        raise FileNotFoundError(f"load_cifar10: {str(archive)!r} did not contain {_FOLDER}/data_batch_1.")
    raise FileNotFoundError(
        f"load_cifar10: no CIFAR-10 data at {str(root)!r}: expected {_FOLDER}/data_batch_1..5 and test_batch, or "
        f"{_ARCHIVE}. Pass download=True to fetch it ({CIFAR10_URL}), or leave root unset for the embedded data."
    )


def load_cifar10(root: str | Path, download: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The python-pickle CIFAR-10 release from ``root``: ``cifar-10-batches-py/`` (or that folder itself), or
    ``cifar-10-python.tar.gz`` (in ``root`` or as ``root``), which is extracted next to itself.

    Args:
        root: a folder or the archive.
        download: fetch the archive into ``root`` (MD5-checked) when neither is there.

    Returns:
        train images uint8 [50000, 32, 32, 3], train labels int64 [50000], test images, test labels.

    Raises:
        FileNotFoundError: nothing found and ``download`` is false.
        pickle.UnpicklingError: a batch file refers to anything but numpy arrays.
    """
    folder = _cifar_folder(Path(root), download)
    parts = [_read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _read_batch(folder / "test_batch")
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]), test_x, test_y


def _subset(images: Tensor, labels: Tensor, count: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed random subset of ``count`` examples (all of them when ``count`` is None)."""
    if count is None or count >= len(labels):
        return images, labels
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:count]
    return images[keep], labels[keep]


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 from ``root`` (validation = the test split), or the embedded generated stand-in when ``root`` is None.

    Args:
        root: folder holding ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz`` (or the archive itself).
            ``None``: generated data (offline).
        download: fetch the archive into ``root`` when missing (needs network; MD5-checked).
        num_train: training examples N. Real data: ``None`` keeps all 50000, a number takes a fixed random subset.
            Embedded data: the number generated (``None``: 10000).
        num_val: the same for the validation split (real: 10000 test images; embedded default 1000).
        image_size: side of the embedded images (the real ones are 32).
        batch_size: the DataLoader batch size: the expected logical batch B when the privacy config sets none.
        augment: random crop (padding 4) and horizontal flip on the training images. ``None``: on for
            non-private training, off under a DP strategy (augmenting without augmentation multiplicity mostly
            hurts DP-SGD).
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
        image_size: int = 32,
        batch_size: int = 256,
        augment: bool | None = None,
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        if self.hparams.root is not None and self.hparams.download:
            _cifar_folder(Path(self.hparams.root), download=True)

    def setup(self, stage: str) -> None:
        h = self.hparams
        if h.root is None:
            train = synthetic_cifar10(h.num_train or 10000, seed=h.seed, image_size=h.image_size)
            val = synthetic_cifar10(h.num_val or 1000, seed=h.seed + 1, image_size=h.image_size)
        else:
            train_x, train_y, test_x, test_y = load_cifar10(h.root, download=h.download)
            train = _subset(train_x, train_y, h.num_train, h.seed)
            val = _subset(test_x, test_y, h.num_val, h.seed + 1)
        augment = h.augment if h.augment is not None else not is_private(self.trainer)
        self.train_set = _ImageDataset(*train, augment=augment)
        self.val_set = _ImageDataset(*val, augment=False)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, shuffle=True, num_workers=self.hparams.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
