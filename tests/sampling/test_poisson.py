"""Poisson sampling (DESIGN.md sections 2.1-2.2 and 4): Binomial(N, q) batch sizes, independent inclusion, fixed-shape
padded physical batches, disjoint rank shards that run the same number of physical batches.

Statistical tests fix the seeds and take their tolerances from the sampling distribution (printed with -s)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from lightning_dpzero.randomness import SecretKey
from lightning_dpzero.sampling.poisson import LogicalBatch, PoissonBatchSampler, check_replaceable, make_dp_dataloader

Z = 5.0  # tolerance in standard deviations of the statistic's sampling distribution
N, Q, STEPS, P = 2000, 0.05, 2000, 32


def make_sampler(seed: int = 1234, **overrides) -> PoissonBatchSampler:
    kwargs = dict(
        num_examples=N, sample_rate=Q, physical_batch_size=P, steps_per_epoch=STEPS, key=SecretKey.from_seed(seed)
    )
    kwargs.update(overrides)
    return PoissonBatchSampler(**kwargs)


def epoch(sampler: PoissonBatchSampler) -> list[list[tuple[int, bool]]]:
    """One epoch of the sampler's key lists, without the header each starts with."""
    return [keys[1:] for keys in sampler]


def real_indices(step: list[tuple[int, bool]]) -> list[int]:
    return [i for i, real in step if real]


@pytest.fixture(scope="module")
def draws() -> tuple[list[list[tuple[int, bool]]], torch.Tensor]:
    """STEPS logical steps of one rank (world size 1), and the [STEPS, N] inclusion matrix."""
    sampler = make_sampler()
    steps = epoch(sampler)
    included = torch.zeros(STEPS, N, dtype=torch.bool)
    for t, step in enumerate(steps):
        included[t, real_indices(step)] = True
    return steps, included


def _binomial_fourth_central_moment(n: int, p: float) -> float:
    v = n * p * (1 - p)
    return v * (1 + 3 * (n - 2) * p * (1 - p))


def test_batch_size_mean_and_variance_are_binomial(draws):
    """Reference: Binomial(N, q): mean Nq, variance Nq(1-q); tolerances Z standard errors of the sample statistics."""
    steps, included = draws
    sizes = included.sum(1).double()
    assert all(len(real_indices(s)) == int(k) for s, k in zip(steps, sizes))
    mean, var = N * Q, N * Q * (1 - Q)
    mean_bound = Z * math.sqrt(var / STEPS)
    # Var of the unbiased sample variance: (mu4 - sigma^4 (S - 3) / (S - 1)) / S
    var_se = math.sqrt((_binomial_fourth_central_moment(N, Q) - var**2 * (STEPS - 3) / (STEPS - 1)) / STEPS)
    print(f"mean {sizes.mean():.3f} vs {mean} +- {mean_bound:.3f}; var {sizes.var():.3f} vs {var} +- {Z * var_se:.3f}")
    assert abs(sizes.mean().item() - mean) <= mean_bound
    assert abs(sizes.var().item() - var) <= Z * var_se


def test_every_example_is_included_with_probability_q(draws):
    """Reference: each example's inclusion count over S steps is Binomial(S, q) (max over N with a Bonferroni z)."""
    _, included = draws
    counts = included.sum(0).double()
    sd = math.sqrt(STEPS * Q * (1 - Q))
    z_max = 5.5  # two-sided normal tail 3.8e-8 each, ~8e-5 over N = 2000 examples
    worst = (counts - STEPS * Q).abs().max().item()
    overall_bound = Z * math.sqrt(Q * (1 - Q) / (STEPS * N))
    print(f"max |count - Sq| = {worst:.1f} <= {z_max * sd:.1f}; overall frequency {counts.mean() / STEPS:.5f}")
    assert worst <= z_max * sd
    assert abs(counts.mean().item() / STEPS - Q) <= overall_bound


def test_inclusion_is_independent_across_consecutive_steps(draws):
    """Reference: independent steps: corr(x_t,i, x_t+1,i) ~ N(0, 1/M) and corr(|B_t|, |B_t+1|) ~ N(0, 1/(S-1))."""
    _, included = draws
    x = included.double()
    a, b = x[:-1].flatten(), x[1:].flatten()
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    r_bound = Z / math.sqrt(a.numel())
    sizes = x.sum(1)
    r_sizes = torch.corrcoef(torch.stack([sizes[:-1], sizes[1:]]))[0, 1].item()
    r_sizes_bound = Z / math.sqrt(STEPS - 1)
    both = (x[:-1] * x[1:]).mean().item()
    print(
        f"inclusion corr {r:.2e} (bound {r_bound:.2e}); size corr {r_sizes:.3f} (bound {r_sizes_bound:.3f}); "
        f"P(both) {both:.5f} vs q^2 {Q * Q:.5f}"
    )
    assert abs(r) <= r_bound
    assert abs(r_sizes) <= r_sizes_bound


def test_padding_layout(draws):
    """Reference: DESIGN.md section 2.2: padded length = max(1, ceil(L / p)) * p; padding rows copy a real example."""
    steps, _ = draws
    for step in steps:
        real = real_indices(step)
        assert len(step) % P == 0 and len(step) >= P
        assert len(step) == max(1, math.ceil(len(real) / P)) * P
        assert [flag for _, flag in step] == [True] * len(real) + [False] * (len(step) - len(real))
        real_set = set(real)
        assert len(real_set) == len(real) and all(0 <= i < N for i in real)
        assert not real or all(i in real_set for i, flag in step if not flag)


def test_empty_sample_yields_one_fully_masked_physical_batch():
    """Reference: DESIGN.md section 2.2 (an empty sample is a valid step: one physical batch of padding)."""
    sampler = make_sampler(num_examples=5, sample_rate=1e-12, physical_batch_size=4, steps_per_epoch=3)
    for step in epoch(sampler):
        assert len(step) == 4 and not any(flag for _, flag in step)
        assert all(0 <= i < 5 for i, _ in step)
    dataset = TensorDataset(torch.arange(5.0).unsqueeze(1))
    loader = make_dp_dataloader(DataLoader(dataset, batch_size=4), sampler)
    for logical in loader:
        assert len(logical) == 1
        (batch,), (mask,) = logical.physical_batches, logical.masks
        assert batch[0].shape == (4, 1) and mask.dtype == torch.bool and not mask.any()


def test_rank_with_empty_shard_pads_with_a_valid_index():
    """Reference: LogicalBatch docstring (padding rows are copies of a real example: a valid dataset index)."""
    sampler = make_sampler(
        num_examples=1, sample_rate=0.5, physical_batch_size=2, steps_per_epoch=3, rank=1, world_size=2
    )
    for step in epoch(sampler):
        assert not any(flag for _, flag in step)
        assert all(0 <= i < 1 for i, _ in step), step


def test_two_ranks_have_disjoint_shards_and_equal_physical_batches():
    """Reference: DESIGN.md 2.1-2.2: rank r owns r, r+W, ...; same number of physical batches; union ~ B(N, q)."""
    n, q, p, steps = 101, 0.1, 4, 400
    ranks = [
        make_sampler(
            num_examples=n,
            sample_rate=q,
            physical_batch_size=p,
            steps_per_epoch=steps,
            rank=r,
            world_size=2,
            seed=7,  # the run's key is shared; each rank draws from its own streams of it
        )
        for r in range(2)
    ]
    seen = torch.zeros(n, dtype=torch.long)
    union_sizes = []
    for step0, step1 in zip(*map(epoch, ranks)):
        assert len(step0) == len(step1)
        assert len(step0) == max(1, math.ceil(max(len(real_indices(step0)), len(real_indices(step1))) / p)) * p
        r0, r1 = real_indices(step0), real_indices(step1)
        assert all(i % 2 == 0 for i in r0) and all(i % 2 == 1 for i in r1)
        union = r0 + r1
        assert len(set(union)) == len(union) and all(0 <= i < n for i in union)
        seen[union] += 1
        union_sizes.append(len(union))
    sizes = torch.tensor(union_sizes, dtype=torch.float64)
    bound = Z * math.sqrt(n * q * (1 - q) / steps)
    print(f"union size mean {sizes.mean():.3f} vs {n * q} +- {bound:.3f}")
    assert abs(sizes.mean().item() - n * q) <= bound
    assert bool((seen > 0).all()), "every index of both shards is sampled at some step"
    assert abs(seen.sum().item() / (steps * n) - q) <= Z * math.sqrt(q * (1 - q) / (steps * n))


def test_state_dict_is_a_public_counter_that_continues_a_seeded_stream():
    """Reference: the uninterrupted sampler's next steps (resumed through torch.save / torch.load, same seed). The
    state is the draw counter alone: a sampler with another key continues from it with different draws."""
    original = make_sampler(num_examples=300, steps_per_epoch=5, seed=3)
    for _ in range(5):
        original.sample_step()
    assert original.state_dict() == {"position": 5}
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    expected = [original.sample_step() for _ in range(7)]

    resumed = make_sampler(num_examples=300, steps_per_epoch=5, seed=3)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert [resumed.sample_step() for _ in range(7)] == expected

    fresh = make_sampler(num_examples=300, steps_per_epoch=5, key=SecretKey.from_os())
    fresh.load_state_dict({"position": 5})
    assert [fresh.sample_step() for _ in range(7)] != expected


def test_epochs_continue_the_stream():
    """Reference: PoissonBatchSampler.set_epoch docstring (every step a fresh draw; len is steps_per_epoch)."""
    sampler = make_sampler(num_examples=300, steps_per_epoch=4)
    assert len(sampler) == 4
    first = epoch(sampler)
    sampler.set_epoch(1)
    second = epoch(sampler)
    assert len(first) == len(second) == 4 and first != second
    assert sampler.sampler is sampler


def _tagging_collate(calls: list[int]):
    def collate(examples):
        calls.append(len(examples))
        xs, ys = zip(*examples)
        return {"x": torch.stack(xs), "y": torch.stack(ys), "tag": "user-collate"}

    return collate


def test_make_dp_dataloader_yields_fixed_shape_masked_physical_batches():
    """Reference: a twin sampler with the same seeds (the indices) and the user's collate_fn (the batch format)."""
    n, q, p, steps = 40, 0.25, 4, 6
    dataset = TensorDataset(torch.randn(n, 3), torch.arange(n))
    calls: list[int] = []
    user = DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=_tagging_collate(calls))
    kwargs = dict(num_examples=n, sample_rate=q, physical_batch_size=p, steps_per_epoch=steps, seed=5)
    loader = make_dp_dataloader(user, make_sampler(**kwargs))
    twin = make_sampler(**kwargs)
    assert len(loader) == steps
    logical_steps = 0
    for t, (logical, keys) in enumerate(zip(loader, epoch(twin))):
        logical_steps += 1
        assert isinstance(logical, LogicalBatch) and len(logical) == len(keys) // p
        assert logical.sample_index == t and logical.sample_rate == q
        assert logical.indices == [[i for i, _ in keys[j * p : (j + 1) * p]] for j in range(len(logical))]
        for j, (batch, mask) in enumerate(logical):
            chunk = keys[j * p : (j + 1) * p]
            assert batch["tag"] == "user-collate"
            assert batch["x"].shape == (p, 3) and batch["y"].shape == (p,)
            assert mask.dtype == torch.bool and mask.shape == (p,)
            assert mask.tolist() == [flag for _, flag in chunk]
            assert batch["y"].tolist() == [i for i, _ in chunk]
            torch.testing.assert_close(batch["x"], dataset.tensors[0][batch["y"]], rtol=0, atol=0)
    assert logical_steps == steps
    assert calls and all(size == p for size in calls)


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.arange(10.0))


class _SizedStream(_Stream):
    def __len__(self) -> int:
        return 10


@pytest.mark.parametrize(
    ("make_loader", "error", "needle"),
    [
        (
            lambda ds: DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler([1.0] * len(ds), len(ds))),
            ValueError,
            "custom sampler",
        ),
        (
            lambda ds: DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 4, drop_last=False)),
            ValueError,
            "custom batch sampler",
        ),
        (lambda ds: DataLoader(ds, batch_size=None), ValueError, r"batch_size=None \(each item is taken as a batch\)"),
        (lambda ds: DataLoader(_Stream(), batch_size=4), TypeError, "iterable-style"),
        (lambda ds: DataLoader(_SizedStream(), batch_size=4), (TypeError, ValueError), None),
        (lambda ds: [ds[i] for i in range(4)], TypeError, "torch DataLoader"),
    ],
    ids=[
        "weighted-sampler",
        "batch-sampler",
        "no-batching",
        "iterable-dataset",
        "sized-iterable-dataset",
        "not-a-loader",
    ],
)
def test_check_replaceable_refuses(make_loader, error, needle):
    """Reference: DESIGN.md section 6 (shuffling/custom samplers are refused: their batches are not Poisson)."""
    dataset = TensorDataset(torch.randn(10, 2))
    with pytest.raises(error, match=needle):
        check_replaceable(make_loader(dataset), "DPStrategy")


@pytest.mark.parametrize(
    "make_loader",
    [
        lambda ds: DataLoader(ds, batch_size=4, shuffle=True),
        lambda ds: DataLoader(ds, batch_size=4, shuffle=False),
        lambda ds: DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, num_replicas=2, rank=0)),
    ],
    ids=["shuffle", "sequential", "distributed-sampler"],
)
def test_check_replaceable_accepts_plain_loaders(make_loader):
    """Reference: check_replaceable docstring (shuffle=True/False and Lightning's DistributedSampler are replaced)."""
    check_replaceable(make_loader(TensorDataset(torch.randn(10, 2))), "DPStrategy")


@pytest.mark.parametrize("p", [1, 3, 8, 64])
def test_few_shapes_hold_every_row_with_at_most_four_sizes(p: int) -> None:
    """Reference: PrivacyConfig.physical_batch_shapes ("few"): full batches of p first, then the smallest of p,
    ceil(p/2), ceil(p/4), ceil(p/8) holding the rest; a fully masked batch takes the smallest; "fixed" is p each."""
    from lightning_dpzero.sampling.poisson import physical_sizes

    choices = {math.ceil(p / 2**k) for k in range(4)}
    for num_physical in range(1, 4):
        for rows in range(0, num_physical * p + 1):
            assert physical_sizes(rows, p, num_physical, "fixed") == [p] * num_physical
            sizes = physical_sizes(rows, p, num_physical, "few")
            assert len(sizes) == num_physical and set(sizes) <= choices and sum(sizes) >= rows
            full, rest = divmod(rows, p)
            assert sizes[:full] == [p] * full
            if rest:  # the partly filled batch: no smaller allowed size would hold it
                assert sizes[full] >= rest and all(c < rest for c in choices if c < sizes[full])
            assert all(s == min(choices) for s in sizes[full + (1 if rest else 0) :])


def test_few_shapes_keep_the_sample_and_cut_the_padding():
    """Reference: the same key gives the same Poisson samples under both shapes (the padding differs only); with
    p = 64 and B = 128 the padded rows fall from ~1/4 of the real rows to ~6% (-s prints both), and two ranks still
    run the same number of physical batches."""
    kwargs = dict(num_examples=4096, sample_rate=128 / 4096, physical_batch_size=64, steps_per_epoch=300, seed=3)
    fixed, few = make_sampler(**kwargs), make_sampler(**kwargs, shapes="few")
    padded = {"fixed": 0, "few": 0}
    real_total = 0
    for name, sampler in (("fixed", fixed), ("few", few)):
        for keys in sampler:
            header, step = keys[0], keys[1:]
            assert sum(header.sizes) == len(step)
            padded[name] += len(step) - len(real_indices(step))
            real_total += len(real_indices(step)) if name == "fixed" else 0
    assert [real_indices(s) for s in epoch(make_sampler(**kwargs))] == [
        real_indices(s) for s in epoch(make_sampler(**kwargs, shapes="few"))
    ]
    print(f"padded / real rows: fixed {padded['fixed'] / real_total:.3f}, few {padded['few'] / real_total:.3f}")
    assert padded["fixed"] / real_total > 0.15 and padded["few"] / real_total < 0.08
    ranks = [make_sampler(**{**kwargs, "num_examples": 4097}, shapes="few", rank=r, world_size=2) for r in range(2)]
    for keys0, keys1 in zip(*ranks):
        assert len(keys0[0].sizes) == len(keys1[0].sizes)
