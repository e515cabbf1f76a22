"""Budget safety (property-based), the secure noise generator, out-of-memory hints and torch.compile."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import lightning_dpzero as dpz
from lightning_dpzero.config import Accountant
from lightning_dpzero.noise import SecureGaussianNoise
from lightning_dpzero.step import DPStep, PrivacyBudgetExhausted
from tests.accounting.test_accounting import direct_epsilon
from tests.strategies.test_dp_strategy import Task, ZeroGrad


# ----------------------------------------------------------------------------------------------- budget safety
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(50, 20_000),
    batch_fraction=st.floats(0.001, 0.2),
    target=st.floats(0.3, 12.0),
    planned=st.integers(1, 150),
    run_factor=st.sampled_from([0.5, 1.0, 3.0]),  # stop early (max_steps), as planned, or a resumed run that asks more
    extra_limit=st.one_of(st.none(), st.floats(0.05, 12.0)),  # a PrivacyBudget(max_epsilon=...) of its own
    fixed_sigma=st.one_of(st.none(), st.floats(0.5, 5.0)),
)
def test_epsilon_never_exceeds_the_budget_and_equals_dp_accounting(
    n, batch_fraction, target, planned, run_factor, extra_limit, fixed_sigma
) -> None:
    """Reference: dp-accounting's RdpAccountant on the recorded history. Whatever the plan and however many steps
    are asked for, the steps taken keep epsilon <= the budget, and a run that stopped early stopped only because
    one more step would have exceeded it."""
    b = max(1, round(batch_fraction * n))
    if fixed_sigma is not None:
        config = dpz.PrivacyConfig(noise_multiplier=fixed_sigma, expected_batch_size=b, physical_batch_size=8)
    else:
        config = dpz.PrivacyConfig(target_epsilon=target, expected_batch_size=b, physical_batch_size=8)
    dp = DPStep(config).ledger
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=b)
    try:
        dp.bind_data(loader, planned_steps=lambda _: planned, owner="test")
    except ValueError as err:
        assert "cannot be reached" in str(err) or "too small for the noise sampler" in str(err)  # nothing runs
        return
    if extra_limit is not None:  # what PrivacyBudget(max_epsilon=...) does
        dp.epsilon_limit = extra_limit if dp.epsilon_limit is None else min(dp.epsilon_limit, extra_limit)
    asked = max(1, int(planned * run_factor))
    taken = 0
    while taken < asked and dp.may_step():
        dp.release([])
        taken += 1
    assert dp.accountant is not None
    limit = dp.epsilon_limit
    eps = direct_epsilon(Accountant.RDP, dp.accountant.history, dp.delta) if taken else 0.0
    assert dp.epsilon() == pytest.approx(eps, rel=1e-9, abs=1e-12)
    if limit is None:
        assert taken == asked
        return
    assert eps <= limit * (1 + 1e-9)
    if taken < asked:  # stopped by the budget: the next step would have exceeded it
        nxt = direct_epsilon(Accountant.RDP, [(dp.noise_multiplier, dp.sample_rate, taken + 1)], dp.delta)
        assert nxt > limit
        assert not dp.may_step()  # and release() raises PrivacyBudgetExhausted (tested below)


def test_a_step_past_the_budget_is_refused_by_the_step_itself() -> None:
    """Whatever a callback or loop does, the ledger refuses to release a step that would exceed the budget."""
    trainer = _trainer(dpz.PrivacyConfig(target_epsilon=1.0, expected_batch_size=8, physical_batch_size=8))
    trainer.fit(Task())
    dp = trainer.strategy.dp.ledger
    while dp.may_step():
        dp.release([])
    with pytest.raises(PrivacyBudgetExhausted, match="past the budget of 1.0"):
        dp.release([])
    assert dp.epsilon() <= 1.0


# ------------------------------------------------------------------------------------------------- secure noise
def test_secure_noise_has_std_sigma_c_over_b_and_never_repeats() -> None:
    """Reference: N(0, std^2) moments within 6 standard errors; two draws uncorrelated; nothing to checkpoint."""
    noise = SecureGaussianNoise()
    x = noise.sample(torch.Size([400_001]), std=0.3, device=torch.device("cpu"))
    y = noise.sample(torch.Size([400_001]), std=0.3, device=torch.device("cpu"))
    n = x.numel()
    assert x.dtype == torch.float32
    assert abs(x.std().item() / 0.3 - 1) < 6 / math.sqrt(2 * n)
    assert abs(x.mean().item()) < 6 * 0.3 / math.sqrt(n)
    kurtosis = ((x / x.std()) ** 4).mean().item()
    assert abs(kurtosis - 3.0) < 6 * math.sqrt(24 / n)  # Gaussian tails, not uniform or Laplace
    assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < 6 / math.sqrt(n)
    assert not hasattr(noise, "state_dict")  # nothing that could be checkpointed


def test_secure_rng_trains_and_refuses_a_seed() -> None:
    privacy = dpz.PrivacyConfig(noise_multiplier=2.0, clip_norm=0.5, expected_batch_size=16, secure_rng=True)
    trainer = L.Trainer(
        strategy=dpz.DPStrategy(privacy), max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    task = ZeroGrad(lr=1.0)
    before = task.lin.weight.detach().clone()
    trainer.fit(task)
    assert isinstance(trainer.strategy.dp.ledger.noise, SecureGaussianNoise)
    update = (before - task.lin.weight.detach()).flatten()
    assert update.std().item() == pytest.approx(2.0 * 0.5 / 16 * math.sqrt(2), rel=0.05)  # two steps of noise
    with pytest.raises(ValueError, match="secure_rng=True.*cannot be seeded"):
        dpz.PrivacyConfig(noise_multiplier=1.0, secure_rng=True, seed=3)


# ------------------------------------------------------------------------------------------- out of memory
class HugeBatch(Task):
    def training_step(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class HugeBatchCPU(Task):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")


def _trainer(privacy: dpz.PrivacyConfig) -> L.Trainer:
    return L.Trainer(
        strategy=dpz.DPStrategy(privacy), max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


@pytest.mark.parametrize("task", [HugeBatch, HugeBatchCPU])
def test_out_of_memory_names_physical_batch_size(task) -> None:
    privacy = dpz.PrivacyConfig(  # fixed: the batch has 8 rows even when the Poisson sample has fewer
        noise_multiplier=1.0, expected_batch_size=16, physical_batch_size=8, physical_batch_shapes="fixed"
    )
    with pytest.raises(torch.OutOfMemoryError, match=r"physical batch of 8 examples.*physical_batch_size.*B = qN"):
        _trainer(privacy).fit(task())


# ----------------------------------------------------------------------------------------------- torch.compile
class CompiledSubmodule(Task):
    def __init__(self) -> None:
        super().__init__()
        self.net.head = torch.compile(self.net.head)


def test_torch_compile_is_refused_clearly() -> None:
    privacy = dpz.PrivacyConfig(noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"torch.compile is not supported under DP \('net.head'"):
        _trainer(privacy).fit(CompiledSubmodule())
    with pytest.raises(ValueError, match="torch.compile is not supported under DP"):
        _trainer(privacy).fit(torch.compile(Task()))
