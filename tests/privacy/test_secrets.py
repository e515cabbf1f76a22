"""Secrets stay secret (DESIGN.md section 7): full-entropy keys, nothing that regenerates the noise in any file a run
writes, fresh randomness on resume. The 2-process strategies are covered by
``tests/strategies/test_parallel.py::test_checkpoints_hold_no_secret_and_resume_draws_fresh_noise``."""

from __future__ import annotations

import math
import pickle

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import lightning_dpzero as dpz
from lightning_dpzero import randomness
from lightning_dpzero.noise import GaussianNoise
from lightning_dpzero.randomness import SecretKey
from lightning_dpzero.sampling.poisson import PoissonBatchSampler
from tests.privacy.leaks import assert_no_secrets, secret_needles
from tests.strategies.parallel_worker import NoiseRecorder
from tests.strategies.test_dp_strategy import Task

CPU = torch.device("cpu")


def _normal(key: SecretKey, *labels) -> torch.Tensor:
    return key.standard_normal(torch.Size([4096]), CPU, *labels)


def _sampler(key: SecretKey) -> PoissonBatchSampler:
    return PoissonBatchSampler(num_examples=1000, sample_rate=0.05, physical_batch_size=8, steps_per_epoch=4, key=key)


@pytest.mark.parametrize("high", [2**32, 2**40, 2**63, 2**200])
def test_seeds_that_share_their_low_32_bits_give_different_streams(high: int) -> None:
    """Reference: torch's CPU generator, for which seeds 5 and 5 + 2^32 give the same stream; every bit of a seed
    counts here (SHA-256 of the whole integer)."""
    a, b = SecretKey.from_seed(5), SecretKey.from_seed(5 + high)
    assert torch.equal(
        torch.randn(8, generator=torch.Generator().manual_seed(5)),
        torch.randn(8, generator=torch.Generator().manual_seed(5 + 2**32)),
    )  # the weakness this avoids
    assert not torch.equal(_normal(a, "noise", 0, 0, 0), _normal(b, "noise", 0, 0, 0))
    assert [_sampler(a).sample_step() for _ in range(4)] != [_sampler(b).sample_step() for _ in range(4)]


def test_keys_come_from_the_os_with_256_bits_and_are_never_pickled() -> None:
    """Reference: randomness.py (32 bytes from ``secrets``; a pickled OS key comes back as a different key)."""
    keys = {SecretKey.from_os().to_bytes() for _ in range(64)}
    assert len(keys) == 64 and all(len(k) == 32 for k in keys)
    key = SecretKey.from_os()
    blob = pickle.dumps(key)
    assert key.to_bytes() not in blob and pickle.loads(blob) != key
    seeded = SecretKey.from_seed(11)
    assert pickle.loads(pickle.dumps(seeded)) == seeded  # no more secret than the seed in the pickled config
    assert "SecretKey(<256 bits" in repr(key) and key.to_bytes().hex() not in repr(key)


def test_keyed_noise_is_gaussian_and_its_streams_are_independent() -> None:
    """Reference: N(0, std^2): mean, std and kurtosis within 6 standard errors; streams of other ranks, steps and
    draws uncorrelated (|r| < 6 / sqrt(n)); the same labels give the same draw (a seeded run is reproducible)."""
    std, n = 0.7, 200_000
    noise = GaussianNoise(SecretKey.from_seed(3), rank=0)
    noise.start_step(4)
    x = noise.sample(torch.Size([n]), std=std, device=CPU)
    y = noise.sample(torch.Size([n]), std=std, device=CPU)  # the step's second draw
    assert x.dtype == torch.float32
    assert abs(x.mean().item()) < 6 * std / math.sqrt(n)
    assert abs(x.std().item() / std - 1) < 6 / math.sqrt(2 * n)
    assert abs(((x / x.std()) ** 4).mean().item() - 3.0) < 6 * math.sqrt(24 / n)
    other_rank = GaussianNoise(SecretKey.from_seed(3), rank=1)
    other_rank.start_step(4)
    other_step = GaussianNoise(SecretKey.from_seed(3), rank=0)
    other_step.start_step(5)
    for z in (
        y,
        other_rank.sample(torch.Size([n]), std=std, device=CPU),
        other_step.sample(torch.Size([n]), std=std, device=CPU),
    ):
        assert abs(torch.corrcoef(torch.stack([x, z]))[0, 1].item()) < 6 / math.sqrt(n)
    again = GaussianNoise(SecretKey.from_seed(3), rank=0)
    again.start_step(4)
    assert torch.equal(again.sample(torch.Size([n]), std=std, device=CPU), x)


def test_a_large_draw_is_made_of_independent_streams_and_the_same_on_any_number_of_threads(monkeypatch) -> None:
    """A CPU draw of more than randomness._PART coordinates is filled in parts, each its own stream, side by side.
    Reference: the same draw with 1 thread and with 2 (a seeded run reproduces its noise on any machine); every part
    differs from the others and from the first part's coordinates drawn alone (no stream used twice); neighbouring
    parts uncorrelated (|r| < 6 / sqrt(part)); the whole N(0, 1) (mean, std within 6 standard errors)."""
    monkeypatch.setattr(randomness, "_PART", 4096)
    key, n = SecretKey.from_seed(11), 4096 * 5 + 100
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = key.standard_normal(torch.Size([n]), CPU, "noise", 0, 1, 2)
        torch.set_num_threads(1)
        one = key.standard_normal(torch.Size([n]), CPU, "noise", 0, 1, 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    parts = list(two.split(4096))
    assert len(parts) == 6
    for a, b in zip(parts[:-2], parts[1:-1]):
        assert not torch.equal(a, b)
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 6 / math.sqrt(4096)
    alone = key.standard_normal(torch.Size([4096]), CPU, "noise", 0, 1, 2)  # the unsplit stream of these labels
    assert not torch.equal(alone, parts[0])
    assert abs(two.mean().item()) < 6 / math.sqrt(n)
    assert abs(two.std().item() - 1) < 6 / math.sqrt(2 * n)


def test_a_single_device_run_writes_no_secret_and_its_checkpoints_cannot_regenerate_its_noise(tmp_path) -> None:
    """Reference: tests/privacy/leaks.py. A default run (OS key) with full and weights-only checkpoints after every
    step and a CSV log: no file holds the key, its streams' key material or a generator state; resuming from the
    checkpoint after step 1 (what its holder can do) draws noise for steps 1 and 2 unrelated to the run's."""
    privacy = dpz.PrivacyConfig(noise_multiplier=1.0, expected_batch_size=8, physical_batch_size=8)
    full = ModelCheckpoint(dirpath=tmp_path / "full", every_n_train_steps=1, save_top_k=-1)
    weights = ModelCheckpoint(
        dirpath=tmp_path / "weights", every_n_train_steps=1, save_top_k=-1, save_weights_only=True, mode="max"
    )
    original = NoiseRecorder()
    trainer = L.Trainer(
        strategy=dpz.DPStrategy(privacy),
        max_steps=3,
        callbacks=[original, full, weights, dpz.PrivacyBudget()],
        logger=CSVLogger(tmp_path / "logs"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Task())
    key = trainer.strategy.dp.ledger.key.to_bytes()
    scanned = assert_no_secrets([tmp_path], secret_needles(key, rank=0))
    assert scanned >= 7  # 3 + 3 checkpoints and the metrics

    resumed = NoiseRecorder()
    holder = L.Trainer(
        strategy=dpz.DPStrategy(privacy),
        max_steps=3,
        callbacks=[resumed],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    holder.fit(Task(), ckpt_path=tmp_path / "full" / "epoch=0-step=1.ckpt")
    assert holder.strategy.dp.ledger.accountant.steps == 3
    for step in (1, 2):
        a, b = original.draws[(step, 0)], resumed.draws[(step, 0)]
        assert not torch.equal(a, b)
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 6 / math.sqrt(a.numel())


def test_secure_rng_draws_differ_even_with_the_same_key() -> None:
    """Reference: SecureGaussianNoise (OS entropy per draw): two runs with one key still draw unrelated noise."""
    config = dpz.PrivacyConfig(noise_multiplier=1.0, secure_rng=True)
    a, b = dpz.DPStep(config), dpz.DPStep(config)
    b.ledger.set_rank(0, 1, key=a.ledger.key.to_bytes())
    x = a.ledger.noise.sample(torch.Size([4096]), std=1.0, device=CPU)
    y = b.ledger.noise.sample(torch.Size([4096]), std=1.0, device=CPU)
    assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < 6 / math.sqrt(4096)
