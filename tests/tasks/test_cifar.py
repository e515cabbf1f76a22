"""CIFAR-10 task: models, transforms, the embedded and the real-format data, training under dp and non-private."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpzero.config import _ZERO_NOISE_ENV
from lightning_dpzero.tasks import cifar
from lightning_dpzero.tasks._data import extract_tar, file_md5
from lightning_dpzero.tasks.cifar import (
    CIFAR10DataModule,
    CIFARTask,
    load_cifar10,
    random_crop,
    random_horizontal_flip,
    synthetic_cifar10,
    vit_tiny,
    wide_resnet,
)
from tests.reference import reference_clipped_sum
from tests.tasks._helpers import Capture, parameters_changed, trainer


def _cross_entropy(net: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    x, y = inputs
    return F.cross_entropy(net(x), y, reduction="none")


# ------------------------------------------------------------------------------------------------ transforms
def test_random_crop_is_a_window_of_the_zero_padded_image() -> None:
    """Reference: the crop equals slicing F.pad(image, 4) at the offsets the same generator draws."""
    image = torch.rand(3, 8, 8)
    crop = random_crop(image, padding=4, generator=torch.Generator().manual_seed(5))
    top, left = torch.randint(0, 9, (2,), generator=torch.Generator().manual_seed(5)).tolist()
    torch.testing.assert_close(crop, F.pad(image, (4, 4, 4, 4))[:, top : top + 8, left : left + 8], rtol=0, atol=0)
    crops = {tuple(random_crop(image, 4).flatten()[:5].tolist()) for _ in range(30)}
    assert len(crops) > 1, "offsets vary between calls"


def test_random_horizontal_flip_mirrors_or_keeps() -> None:
    """Reference: torch.flip on the last dim; p=1 always mirrors, p=0 never."""
    image = torch.rand(3, 4, 5)
    torch.testing.assert_close(random_horizontal_flip(image, p=1.0), image.flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(random_horizontal_flip(image, p=0.0), image, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ embedded data
def test_synthetic_images_are_deterministic_and_class_conditional() -> None:
    """Reference: a nearest-class-mean classifier fit on one split is far above chance (10%) on another split."""
    x1, y1 = synthetic_cifar10(600, seed=1, image_size=16)
    x1b, _ = synthetic_cifar10(600, seed=1, image_size=16)
    x2, y2 = synthetic_cifar10(300, seed=2, image_size=16)
    assert x1.shape == (600, 16, 16, 3) and x1.dtype == torch.uint8 and torch.equal(x1, x1b)
    assert not torch.equal(x1[:300], x2), "different seeds give different examples"
    f1, f2 = x1.flatten(1).double(), x2.flatten(1).double()
    means = torch.stack([f1[y1 == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(f2, means).argmin(1) == y2).double().mean().item()
    assert accuracy > 0.5, accuracy


def test_augmentation_defaults_off_under_dp_and_on_without() -> None:
    """Reference: DESIGN of the task: augment=None resolves from the trainer's strategy; an explicit value wins."""
    for private, expected in ((True, False), (False, True)):
        dm = CIFAR10DataModule(num_train=16, num_val=8, image_size=8)
        dm.trainer = trainer(private)
        dm.setup("fit")
        assert dm.train_set.augment is expected and dm.val_set.augment is False
    dm = CIFAR10DataModule(num_train=16, num_val=8, image_size=8, augment=True)
    dm.trainer = trainer(True)
    dm.setup("fit")
    assert dm.train_set.augment is True


# ------------------------------------------------------------------------------------------------ models
def test_models_refuse_bad_sizes_and_contain_no_batchnorm() -> None:
    with pytest.raises(ValueError, match="6k \\+ 4"):
        wide_resnet(depth=12)
    with pytest.raises(ValueError, match="patch_size"):
        vit_tiny(image_size=30, patch_size=4)
    for net in (wide_resnet(16, 4), vit_tiny()):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert sum(p.numel() for p in wide_resnet(16, 4).parameters()) == 2_748_890  # WRN-16-4, 10 classes


@pytest.mark.parametrize(
    "net",
    [lambda: wide_resnet(10, 1, groups=4), lambda: vit_tiny(8, 4, dim=16, depth=1, heads=2)],
    ids=["wrn", "vit"],
)
def test_dp_gradient_matches_float64_reference(monkeypatch: pytest.MonkeyPatch, net) -> None:
    """Reference: tests/reference.py (each real example alone, float64, clipped, summed) / B, with sigma = 0.

    Proves the task models are DP-correct under the engine: every parameter clipped per example, no example mixing
    (GroupNorm, not BatchNorm), nothing broadcast over examples (ViT class token and positions), padding rows zero.
    """
    monkeypatch.setenv(_ZERO_NOISE_ENV, "1")
    torch.manual_seed(0)
    task = CIFARTask(net(), lr=0.05)
    capture = Capture("net")
    dm = CIFAR10DataModule(num_train=24, num_val=8, image_size=8, batch_size=6)
    privacy = {"noise_multiplier": 0.0, "clip_norm": 0.5, "clipping_function": "abadi"}
    trainer(True, 2, [capture], expected_batch_size=6, physical_batch_size=4, seed=3, **privacy).fit(task, dm)
    assert len(capture.grads) == 2
    for batch, before, grads in zip(capture.batches, capture.nets, capture.grads):
        x = torch.cat([b[0] for b in batch.physical_batches])
        y = torch.cat([b[1] for b in batch.physical_batches])
        mask = torch.cat(batch.masks)
        expected = reference_clipped_sum(
            before, _cross_entropy, (x, y), mask, clip_norm=0.5, style="all-layer", function="abadi"
        )
        # fp32 vs float64 through ten conv layers: entries near zero get an absolute floor of 1e-6 x the largest
        scale = max(v.abs().max().item() for v in expected.values()) / 6.0
        for name, value in expected.items():
            torch.testing.assert_close(grads[name].double(), value / 6.0, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("private", [True, False], ids=["dp", "nonprivate"])
def test_trains_a_few_steps_on_embedded_data(private: bool) -> None:
    """Reference: the parameters move and validation reports finite val_loss and val_acc in [0, 1]."""
    task = CIFARTask(wide_resnet(10, 1, groups=4), lr=0.1, momentum=0.9)
    before = {n: p.detach().clone() for n, p in task.net.named_parameters()}
    dm = CIFAR10DataModule(num_train=64, num_val=16, image_size=16, batch_size=16)
    t = trainer(private)
    t.fit(task, dm)
    metrics = t.validate(task, dm, verbose=False)[0]
    assert t.global_step == 3 and parameters_changed(before, task.net)
    assert np.isfinite(metrics["val_loss"]) and 0.0 <= metrics["val_acc"] <= 1.0


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="optimizer='adam'.*'sgd', 'adamw'"):
        CIFARTask(wide_resnet(10, 1), optimizer="adam")


# ------------------------------------------------------------------------------------------------ real format
def _write_cifar_folder(folder: Path, per_batch: int = 2, test: int = 3) -> tuple[np.ndarray, list[int]]:
    """A tiny cifar-10-batches-py in the official layout: protocol-2 pickles of dicts with bytes keys."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        all_data.append(data)
        all_labels += labels
    meta = {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return np.concatenate(all_data), all_labels


def _tar_gz(source: Path, archive: Path, arcname: str) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname)


def test_load_cifar10_reads_the_pickle_layout(tmp_path: Path) -> None:
    """Reference: row k of a batch's data is 1024 red, 1024 green, 1024 blue values in row-major pixel order."""
    data, labels = _write_cifar_folder(tmp_path / "cifar-10-batches-py")
    train_x, train_y, test_x, test_y = load_cifar10(tmp_path)
    assert train_x.shape == (10, 32, 32, 3) and test_x.shape == (3, 32, 32, 3) and train_x.dtype == torch.uint8
    expected = torch.from_numpy(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy())
    torch.testing.assert_close(torch.cat([train_x, test_x]), expected, rtol=0, atol=0)
    assert torch.cat([train_y, test_y]).tolist() == labels
    assert train_x[1, 2, 5, 1].item() == data[1, 1024 + 2 * 32 + 5]  # example 1, row 2, column 5, green
    again = load_cifar10(tmp_path / "cifar-10-batches-py")  # the folder itself also works
    assert torch.equal(again[0], train_x)


def test_load_cifar10_extracts_the_archive_and_downloads_with_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reference: the archive (found in root, given as root, or fetched) yields the same arrays as the folder."""
    _write_cifar_folder(tmp_path / "src" / "cifar-10-batches-py")
    expected = load_cifar10(tmp_path / "src")
    archive = tmp_path / "a" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    _tar_gz(tmp_path / "src" / "cifar-10-batches-py", archive, "cifar-10-batches-py")
    for root in (tmp_path / "a", archive):
        for got, want in zip(load_cifar10(root), expected):
            assert torch.equal(got, want)
    monkeypatch.setattr(cifar, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(cifar, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(ValueError, match="MD5"):
        load_cifar10(tmp_path / "bad", download=True)
    assert not list((tmp_path / "bad").glob("*")), "a corrupt download is deleted"
    monkeypatch.setattr(cifar, "CIFAR10_MD5", file_md5(archive))
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_cifar10(tmp_path / "fetched")
    got = load_cifar10(tmp_path / "fetched", download=True)
    assert torch.equal(got[0], expected[0]) and (tmp_path / "fetched" / "cifar-10-python.tar.gz").is_file()


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_load_cifar10_refuses_pickles_that_call_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_folder(folder)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="print, which a CIFAR-10 batch never does"):
        load_cifar10(tmp_path)


def test_extract_tar_refuses_members_outside_the_target(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ValueError, match="unsafe member"):
        extract_tar(archive, tmp_path / "out", owner="test")
    assert not (tmp_path / "escaped.txt").exists()


def test_datamodule_reads_real_format_and_subsets(tmp_path: Path) -> None:
    """Reference: items are (standardised float [3, 32, 32], label) from the uint8 pixels; num_train subsets."""
    _write_cifar_folder(tmp_path / "cifar-10-batches-py")
    train_x, train_y, _, _ = load_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), num_train=4, augment=False, batch_size=2)
    dm.setup("fit")
    assert len(dm.train_set) == 4 and len(dm.val_set) == 3
    x, y = dm.train_set[0]
    mean, std = torch.tensor(cifar._MEAN).view(3, 1, 1), torch.tensor(cifar._STD).view(3, 1, 1)
    index = next(i for i in range(10) if torch.equal(train_x[i], dm.train_set.images[0]))
    torch.testing.assert_close(x, (train_x[index].permute(2, 0, 1).float() / 255 - mean) / std)
    assert y == train_y[index]
