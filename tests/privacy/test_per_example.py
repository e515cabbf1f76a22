"""The per-example self-check (DESIGN.md section 7, lightning_dpzero/selfcheck.py): models and losses that are not
per-example are refused by behaviour, whatever their shapes; per-example ones train, dropout and metrics included.

The sensitivity harness (``sensitivity``) trains one logical step under ``dp`` with sigma = 0 (the test switch) and
q = 1, so the logical batch is the whole dataset, on D and on D minus its first example, and returns
||S(D) - S(D')|| / C for the summed clipped gradient S = grad * B (B = qN). With the check bypassed it shows that
each refused model really leaks (> C); with the check, the same run is refused with a message naming the cause."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_dpzero as dpz
from lightning_dpzero.config import _ZERO_NOISE_ENV
from lightning_dpzero.selfcheck import SelfCheck

T, D, V = 8, 6, 11  # sequence length equal to the physical batch size p below: shapes cannot tell rows apart
P = 8


@pytest.fixture(autouse=True)
def zero_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_ZERO_NOISE_ENV, "1")


def _data(n: int, seed: int = 0) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(features [T, D], token ids [T], labels [T] with -100 padding of varying length) per example."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        labels = torch.randint(0, V, (T,), generator=g)
        labels[T - 1 - i % (T - 1) :] = -100  # rows differ in how many tokens count
        rows.append((torch.randn(T, D, generator=g) * 3, torch.randint(0, V, (T,), generator=g), labels))
    return rows


class Model(L.LightningModule):
    """A small sequence model; ``kind`` makes it (or its loss) not per-example in one of the ways users do."""

    def __init__(self, kind: str = "ok", data: list | None = None, lr: float = 0.1, dropout: float = 0.3) -> None:
        super().__init__()
        self.kind, self.data, self.lr = kind, data if data is not None else _data(P), lr
        self.proj = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.tok = nn.Embedding(V, D)
        self.wpe = nn.Embedding(T, D)
        if kind == "relative_bias":
            self.rel = nn.Embedding(2 * T, 1)
        self.head = nn.Linear(D, V)
        self.drop = nn.Dropout(dropout)
        if kind == "instance_norm":
            self.inorm = nn.InstanceNorm1d(D, affine=True, track_running_stats=True)
        if kind == "counter":
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=V, ignore_index=-100)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        n = x.shape[0]
        if self.kind == "mean0":
            x = x - x.mean(0, keepdim=True)
        if self.kind == "seq_first":  # [T, n, D] through the layers (T == n here), back to [n, T, D]
            h = self.norm(self.proj(x.transpose(0, 1))).transpose(0, 1)
        else:
            h = self.norm(self.proj(x))  # [n, T, D]
        if self.kind == "batchnorm":  # a hand-written batch norm
            h = (h - h.mean(0)) / (h.std(0) + 1e-5)
        if self.kind == "cumsum":
            h = h.cumsum(0)
        if self.kind == "batch_attention":  # every example attends to every example
            flat = h.reshape(n, -1)
            h = (torch.softmax(flat @ flat.T / flat.shape[1] ** 0.5, dim=1) @ flat).view_as(h)
        if self.kind == "instance_norm":
            h = self.inorm(h.transpose(1, 2)).transpose(1, 2)
        if self.kind == "counter":
            self.calls += 1  # data-independent: allowed
        h = h + self.tok(ids)
        if self.kind == "shared_positions":  # positions computed once for the batch (T == p: shapes agree)
            h = h + self.wpe(torch.arange(T, device=h.device)).unsqueeze(0)
        else:
            h = h + self.wpe(torch.arange(T, device=h.device).expand(n, T))
        if self.kind == "relative_bias":  # T5-style bias from relative positions, shared by the batch: [T, T]
            rel = torch.arange(T)[None, :] - torch.arange(T)[:, None] + T - 1
            scores = h @ h.transpose(1, 2) / D**0.5 + self.rel(rel).squeeze(-1)
            h = torch.softmax(scores, -1) @ h
        h = self.drop(torch.tanh(h))
        logits = self.head(h)
        if self.kind == "outside":  # the head's weight used again outside its module
            logits = logits + F.linear(h, self.head.weight) * 0.5
        return logits  # [n, T, V]

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor | dict[str, Tensor]:
        x, ids, labels = batch
        if self.kind == "reorder":  # rows reversed inside training_step: the padding mask no longer follows them
            x, ids, labels = x.flip(0), ids.flip(0), labels.flip(0)
        logits = self(x, ids)
        self.accuracy(logits.flatten(0, 1), labels.flatten())
        self.log("train_acc", self.accuracy)
        if self.kind == "token_mean":  # Hugging Face style: one mean over every non-ignored token of the batch
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # [n, T]
        losses = tokens.sum(1) / (labels != -100).sum(1).clamp(min=1)
        return {"loss": losses.mean(), "per_example_loss": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=P)


class Gradients(Callback):
    def __init__(self) -> None:
        self.grads: Tensor | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = torch.cat([p.grad.flatten().double() for p in pl_module.parameters() if p.grad is not None])


def _fit(model: L.LightningModule, *, steps: int = 1, callbacks=(), **privacy) -> L.Trainer:
    config = dict(noise_multiplier=0.0, clip_norm=1.0, clipping_function="abadi", sample_rate=1.0,
                  physical_batch_size=P)  # fmt: skip
    config.update(privacy)
    trainer = L.Trainer(
        strategy=dpz.DPStrategy(dpz.PrivacyConfig(**config)),
        max_steps=steps,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    return trainer


def sensitivity(kind: str, n: int = P) -> float:
    """||S(D) - S(D minus example 0)|| / C after one step with sigma = 0 and q = 1 (see the module docstring);
    example 0 is an outlier (features x 50), the one an adversary would add."""
    data = _data(n)
    data[0] = (data[0][0] * 50, *data[0][1:])
    sums = []
    for rows in (data, data[1:]):
        torch.manual_seed(0)
        model, grads = Model(kind, rows, dropout=0.0), Gradients()  # no dropout: rows sit at other positions in D'
        _fit(model, callbacks=[grads])
        sums.append(grads.grads * len(rows))  # B = qN = N
    return (sums[0] - sums[1]).norm().item()


@pytest.fixture
def unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The self-check bypassed: what the run would release without it."""
    monkeypatch.setattr(SelfCheck, "due", lambda self, step: False)


def test_a_per_example_model_passes_and_its_sensitivity_is_at_most_c() -> None:
    """Reference: the DP bound (removing one example moves the summed clipped gradient by <= C); the check passes
    with dropout and a torchmetrics metric in training_step (their state is restored after the check)."""
    assert sensitivity("ok") <= 1 + 1e-5
    counts = []

    class Updates(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            counts.append(int(pl_module.accuracy._update_count))

    trainer = _fit(Model("ok"), steps=2, callbacks=[Updates()])
    check = trainer.strategy.dp.ledger.self_check
    assert check.last_step == 0 and len(check.seconds) == 1
    assert counts[0] == 1  # the step's one physical batch; the check's two forwards were undone


LEAKS = {
    "mean0": r"module 'proj': rows of its input other than the changed example's moved.*mixes examples",
    "batchnorm": r"module 'head': rows of its input other than the changed example's moved.*mixes examples",
    "cumsum": r"module 'head': rows of its input other than the changed example's moved",
    "batch_attention": r"module 'head': rows of its input other than the changed example's moved",
    "token_mean": r"module 'head': rows of its output gradient .*loss normalised over the whole batch",
    "reorder": r"module 'proj': rows of its input .*a reordering of rows",
}


@pytest.mark.parametrize("kind", list(LEAKS))
def test_models_that_mix_examples_are_refused(kind: str) -> None:
    """Reference: each case's message names the module (or the loss) and the fix; the refusal comes before the first
    optimizer step, so nothing is released."""
    model = Model(kind)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(dpz.PerExampleCheckError, match=LEAKS[kind]):
        _fit(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kind", ["mean0", "cumsum"])
def test_the_check_on_fewer_rows_than_p_still_refuses(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference: the check runs on SelfCheck.ROWS rows of the physical batch; here 4 of p = T = 8, so that the rows
    the check sees differ from T while the run's own p equals T (the case shapes cannot tell): still refused."""
    monkeypatch.setattr(SelfCheck, "ROWS", 4)
    model = Model(kind)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(dpz.PerExampleCheckError, match=r"module '(proj|head)'"):
        _fit(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("seed", [45, 47, 52, 0, 1])
def test_the_swapped_row_reveals_a_batch_normalised_loss_whatever_the_sample(seed: int) -> None:
    """Reference: the token-mean loss is refused for every Poisson sample. The check swaps in the example that
    differs most from the replaced one; with the first differing one instead, the samples of privacy seeds 45, 47 and
    52 swapped two rows with the same number of counted tokens, the batch's normaliser did not move and the run
    trained (2 of 30 unseeded runs)."""
    with pytest.raises(dpz.PerExampleCheckError, match=LEAKS["token_mean"]):
        _fit(Model("token_mean"), seed=seed)


@pytest.mark.parametrize("rows", [P, 4], ids=["the check on p rows", "the check on 4 of p rows"])
@pytest.mark.parametrize("kind", ["shared_positions", "relative_bias", "seq_first"])
def test_shared_outputs_and_moved_examples_pass_and_their_sensitivity_is_at_most_c(
    kind: str, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reference: the DP bound, and the check's autograd reference (per-example norms of rows 0 and 1). Positions
    embedded once as wpe(arange(T)) [T, D], a T5-style relative bias [T, T], and layers run sequence-first on
    [T, p, D] after a transpose, all with T == p, where shapes cannot tell positions from examples: the shared
    values are split where they meet the examples and the transpose is followed (clipping/watch.py), so the check
    passes (also when it sees fewer rows than p) and one outlier moves the released sum by at most C."""
    monkeypatch.setattr(SelfCheck, "ROWS", rows)
    assert sensitivity(kind) <= 1 + 1e-5
    trainer = _fit(Model(kind), steps=2)
    assert trainer.strategy.dp.ledger.accountant.steps == 2


def test_a_refused_model_really_leaks(unchecked: None) -> None:
    """Reference: the DP bound. Without the check, ``x - x.mean(0)`` lets one outlier move the released sum by
    ~2.7 C (every other example's clipped gradient turns with it); the refused cases leak in this way, by amounts
    that depend on the data an adversary picks."""
    assert sensitivity("mean0") > 2.0


def test_a_parameter_used_outside_its_module_is_refused() -> None:
    """Reference: autograd's per-example gradient of the head's weight (two uses) against the engine's (one use)."""
    with pytest.raises(
        dpz.PerExampleCheckError, match=r"parameter 'head.weight' \(module 'head'\).*outside its module"
    ):
        _fit(Model("outside"))


def test_a_buffer_written_from_the_data_is_refused_and_a_data_independent_one_is_not() -> None:
    """Reference: InstanceNorm's running statistics after two batches that differ in one example differ (a leak);
    a call counter is the same after both (allowed, and counted once per real forward: the check restores it)."""
    with pytest.raises(dpz.PerExampleCheckError, match=r"buffer 'inorm.running_mean'.*track_running_stats=False"):
        _fit(Model("instance_norm"))
    model = Model("counter")
    _fit(model, steps=2)
    assert int(model.calls) == 2


def test_the_check_repeats_every_k_steps_and_can_run_only_first() -> None:
    """Reference: PrivacyConfig.self_check_every (first step, then every k logical steps; None: the first only)."""
    trainer = _fit(Model("ok"), steps=5, self_check_every=2)
    assert len(trainer.strategy.dp.ledger.self_check.seconds) == 3  # steps 0, 2, 4
    trainer = _fit(Model("ok"), steps=3, self_check_every=None)
    assert len(trainer.strategy.dp.ledger.self_check.seconds) == 1
    with pytest.raises(ValueError, match="self_check_every.*cannot be switched off"):
        dpz.PrivacyConfig(noise_multiplier=1.0, self_check_every=0)


def test_a_scalar_mean_loss_that_is_per_example_passes() -> None:
    """Reference: a scalar mean of per-example losses (every row weighted equally) is additive: the check's unclipped
    sum equals autograd's gradient, and no other row moves."""

    class Scalar(Model):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]

    _fit(Scalar("ok"), steps=1)


@pytest.mark.parametrize(("kind", "refused"), [("ok", False), ("mean0", True), ("instance_norm", False)])
def test_zeroth_order_runs_the_check_on_its_losses_and_buffers(kind: str, refused: bool) -> None:
    """Reference: zeroth-order has no taps: its check compares the per-example losses (and buffers) of the two
    batches, in eval mode as its finite differences are taken (so InstanceNorm's running statistics, used but never
    written in eval mode, pass)."""
    privacy = dict(method="zeroth_order", zeroth_order={"learning_rate": 0.01})
    if not refused:
        trainer = _fit(Model(kind), **privacy)
        assert len(trainer.strategy.dp.ledger.self_check.seconds) == 1
        return
    with pytest.raises(dpz.PerExampleCheckError, match="per-example losses: losses of other examples moved"):
        _fit(Model(kind), **privacy)


def test_rows_other_than_the_changed_one_move_only_beyond_rounding() -> None:
    """selfcheck._others_moved: equal rows (also NaN in both) and rounding-level differences are not movement; any
    other row's real difference is, whatever the changed row does."""
    from lightning_dpzero.selfcheck import _others_moved

    x = torch.randn(6, 4, 3)
    y = x.clone()
    y[2] += 5.0  # the changed row
    assert not _others_moved(x, y, changed=2)
    x[4, 1, 1] = y[4, 1, 1] = float("nan")
    assert not _others_moved(x, y, changed=2)
    y[0] = x[0] * (1 + 1e-7)  # rounding
    assert not _others_moved(x, y, changed=2)
    y[5, 0, 0] += 1e-3 * float(x.abs().max())
    assert _others_moved(x, y, changed=2)
    assert _others_moved(x.bfloat16(), (y + 0.5).bfloat16(), changed=2)
