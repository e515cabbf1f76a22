"""Secrets stay secret (DESIGN.md section 7): full-entropy keys, nothing that regenerates the noise in any file a run
writes, fresh randomness on resume. The 2-process strategies are covered by
``tests/strategies/test_parallel.py::test_checkpoints_hold_no_secret_and_resume_draws_fresh_noise``."""

from __future__ import annotations

import math
import pickle

import lightning as L
import numpy as np
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


def test_a_stream_is_aes_256_in_counter_mode_under_its_labels_key() -> None:
    """Reference: AES-256 of the counter blocks 0, 1, 2, ... (big-endian, 128 bits) under SHA-256(key, labels),
    through ``cryptography``'s ECB mode; successive calls continue the stream; other labels give another stream."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key, labels = SecretKey.from_seed(7), ("noise", 1, 2, 3)
    stream = key.key_stream(*labels)
    got = stream(40) + stream(200)
    ecb = Cipher(algorithms.AES(key.derive(*labels)), modes.ECB()).encryptor()
    want = ecb.update(b"".join(i.to_bytes(16, "big") for i in range(15)))
    assert got == want[:240]
    assert key.key_stream("noise", 1, 2, 4)(240) != got


def _box_muller_float64(raw: bytes) -> np.ndarray:
    """Float64 Box-Muller on the layout of ``gaussian_from_bits`` (one block): 8-byte radius words, then 4-byte
    angle words; radius from (k + 1/2) / 2^63 with k the word's top 63 bits, angle from its top 24 bits."""
    pairs = len(raw) // 12
    words = np.frombuffer(raw[: 8 * pairs], dtype=np.uint64)
    u = np.array([((int(w) >> 1) + 0.5) * 2.0**-63 for w in words])
    theta = ((np.frombuffer(raw[8 * pairs :], dtype=np.uint32) >> 8).astype(np.float64) + 0.5) * (2 * math.pi / 2**24)
    radius = np.sqrt(-2.0 * np.log(u))
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)])


def test_gaussian_from_bits_matches_a_float64_box_muller_on_the_same_bits() -> None:
    """Reference: ``_box_muller_float64`` on the same bytes, random and extreme (radius words 0 and 2^64 - 1, angle
    words 0 and 2^32 - 1): squared radius within 1e-6 (1 + r^2), angle within 1e-5 where r > 0.01. The smallest
    radius word gives the largest radius, sqrt(128 ln 2) = 9.42: the tail reaches 9.42 standard deviations."""
    pairs = 4096
    radius_words = np.random.default_rng(0).integers(0, 2**64, pairs, dtype=np.uint64, endpoint=False)
    angle_words = np.random.default_rng(1).integers(0, 2**32, pairs, dtype=np.uint32, endpoint=False)
    radius_words[:4] = [0, 0, 2**64 - 1, 2**64 - 1]
    angle_words[:4] = [0, 2**32 - 1, 0, 2**32 - 1]
    raw = radius_words.tobytes() + angle_words.tobytes()
    got = randomness.gaussian_from_bits(2 * pairs, lambda n: raw[:n]).astype(np.float64)
    want = _box_muller_float64(raw)
    (x, y), (x0, y0) = got.reshape(2, pairs), want.reshape(2, pairs)
    r2, r2_want = x**2 + y**2, x0**2 + y0**2
    assert np.all(np.abs(r2 - r2_want) <= 1e-6 * (1 + r2_want))
    far = r2_want > 1e-4
    angle_error = np.angle(np.exp(1j * (np.arctan2(y, x) - np.arctan2(y0, x0))))
    assert np.all(np.abs(angle_error[far]) < 1e-5)
    assert math.isclose(math.sqrt(r2[0]), math.sqrt(128 * math.log(2)), rel_tol=1e-6)
    assert r2[2] < 1e-6 and np.isfinite(got).all()
    odd = randomness.gaussian_from_bits(2 * pairs - 1, lambda n: raw[:n])  # an odd count drops the last sine
    assert np.array_equal(odd, got[:-1].astype(np.float32))


def test_keyed_draws_are_standard_normal_in_the_body_and_the_tails() -> None:
    """Reference: scipy's N(0, 1). 2^20 draws of one seeded stream: Kolmogorov-Smirnov distance below 3 / sqrt(n)
    (a false alarm has probability < 1e-7), and the counts beyond 2, 3 and 4 standard deviations each within 6 of
    their standard deviations of the expected count."""
    from scipy import stats

    n = 1 << 20
    x = SecretKey.from_seed(5).standard_normal(torch.Size([n]), CPU, "noise", 0, 0, 0).double().numpy()
    assert stats.kstest(x, "norm").statistic < 3 / math.sqrt(n)
    for t in (2.0, 3.0, 4.0):
        expected = n * 2 * stats.norm.sf(t)
        assert abs(np.count_nonzero(np.abs(x) > t) - expected) < 6 * math.sqrt(expected), t


def test_a_draw_of_several_blocks_continues_its_stream_and_is_the_same_on_any_number_of_threads(monkeypatch) -> None:
    """A draw is made in blocks of ``randomness._PAIRS`` pairs from one stream. Reference: the same draw on 1 and on
    2 threads (a seeded run reproduces its noise on any machine); no block repeats another (the stream continues);
    neighbouring blocks uncorrelated (|r| < 6 / sqrt(block)); the whole N(0, 1) (mean, std within 6 standard
    errors)."""
    monkeypatch.setattr(randomness, "_PAIRS", 2048)
    key, n, block = SecretKey.from_seed(11), 4096 * 5 + 101, 4096
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = key.standard_normal(torch.Size([n]), CPU, "noise", 0, 1, 2)
        torch.set_num_threads(1)
        one = key.standard_normal(torch.Size([n]), CPU, "noise", 0, 1, 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    blocks = list(two.split(block))
    assert len(blocks) == 6
    for a, b in zip(blocks[:-2], blocks[1:-1]):
        assert not torch.equal(a, b)
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 6 / math.sqrt(block)
    assert abs(two.mean().item()) < 6 / math.sqrt(n)
    assert abs(two.std().item() - 1) < 6 / math.sqrt(2 * n)


def test_the_cuda_path_draws_float64_in_chunks_that_continue_the_stream(monkeypatch) -> None:
    """``normal_via_float64`` (the CUDA path; run here with a CPU generator). Reference: torch's float64 sampler, cast
    to fp32: the same generator state gives the same draw; chunks of ``_FLOAT64_CHUNK`` continue the generator (no
    chunk repeats another, neighbours uncorrelated within 6 / sqrt(chunk)); N(0, 1) moments within 6 standard errors;
    empty and 0-d shapes."""
    monkeypatch.setattr(randomness, "_FLOAT64_CHUNK", 4096)
    n = 4096 * 4 + 7
    x = randomness.normal_via_float64(torch.Size([n]), CPU, torch.Generator().manual_seed(3))
    assert x.dtype == torch.float32 and x.shape == (n,)
    assert torch.equal(x, randomness.normal_via_float64(torch.Size([n]), CPU, torch.Generator().manual_seed(3)))
    first = torch.empty(4096, dtype=torch.float64).normal_(generator=torch.Generator().manual_seed(3)).float()
    assert torch.equal(x[:4096], first)
    chunks = list(x.split(4096))
    for a, b in zip(chunks[:-2], chunks[1:-1]):
        assert not torch.equal(a, b)
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 6 / math.sqrt(4096)
    assert abs(x.mean().item()) < 6 / math.sqrt(n) and abs(x.std().item() - 1) < 6 / math.sqrt(2 * n)
    assert randomness.normal_via_float64(torch.Size([0, 3]), CPU, torch.Generator()).shape == (0, 3)
    assert randomness.normal_via_float64(torch.Size([]), CPU, torch.Generator()).shape == ()


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
