"""Modules called on inputs that hold no example data (lightning_dpzero/clipping/shared.py): positions embedded from
``arange(T)`` [T, D], T5-style relative position biases [T, T] reused by several layers, a raw-parameter bias table
with no rule. Each example gets its own gradient where the shared value meets the examples, whatever T is (T equal to
n included, where shapes cannot tell rows from positions), and a use that cannot be split is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpzero.clipping import ClippingEngine, UnsupportedLayerError
from lightning_dpzero.clipping import watch as watch_module
from lightning_dpzero.config import PrivacyConfig
from tests.conftest import token_cross_entropy
from tests.reference import reference_clipped_sum

CPU = torch.device("cpu")
N, V, D = 4, 7, 6


class Positions(nn.Module):
    """nanoGPT's idiom: positions embedded from torch.arange(T), [T, D], added to [n, T, D]."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.wpe = nn.Embedding(T, D)
        self.head = nn.Linear(D, V)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.wte(ids) + self.wpe(torch.arange(ids.shape[1])))


class RelativeBias(nn.Module):
    """T5's pattern: a bias [heads, T, T] from an embedding of relative positions, computed once and reused by every
    layer, reaching the scores through ``how``: ``add``, ``matmul`` (as a mixing matrix), ``sdpa`` (attn_mask),
    ``expand`` (explicitly to [n, heads, T, T] first) or ``masked`` (added first to a data-free [1, T, T, heads])."""

    def __init__(self, T: int, how: str = "add", layers: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.how, self.heads, self.T = how, heads, T
        self.wte = nn.Embedding(V, D)
        self.rel = nn.Embedding(2 * T - 1, heads)
        self.qk = nn.ModuleList(nn.Linear(D, 2 * D) for _ in range(layers))
        self.head = nn.Linear(D, V)

    def bias(self) -> Tensor:
        pos = torch.arange(self.T)
        values = self.rel(pos[None, :] - pos[:, None] + self.T - 1)  # [T, T, heads]
        if self.how == "masked":  # first broadcast against a data-free value with one more leading dim
            return (values + torch.zeros(1, self.T, self.T, self.heads)).permute(0, 3, 1, 2)
        return values.permute(2, 0, 1).unsqueeze(0)  # [1, heads, T, T]

    def forward(self, ids: Tensor) -> Tensor:
        n, T = ids.shape
        h = self.wte(ids)
        bias = self.bias()
        for qk in self.qk:
            q, k = qk(h).view(n, T, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [n, heads, T, D/heads]
            v = h.view(n, T, self.heads, D // self.heads).transpose(1, 2)
            if self.how == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            elif self.how == "matmul":
                out = (bias.tanh() @ v) + torch.softmax(q @ k.transpose(-1, -2), -1) @ v
            else:
                b = bias.expand(n, -1, -1, -1) if self.how == "expand" else bias
                out = torch.softmax(q @ k.transpose(-1, -2) + b, -1) @ v
            h = h + out.transpose(1, 2).reshape(n, T, D)
        return self.head(torch.tanh(h))


class BiasTable(nn.Module):
    """A raw parameter and no rule (the torch.func fallback), called with no tensor input."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * T - 1) * 0.5)

    def forward(self, T: int) -> Tensor:
        pos = torch.arange(T)
        return self.table[pos[None, :] - pos[:, None] + T - 1]  # [T, T]


class WithBiasTable(nn.Module):
    def __init__(self, T: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.bias = BiasTable(T)
        self.head = nn.Linear(D, V)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.wte(ids)
        mix = torch.softmax(h @ h.transpose(1, 2) + self.bias(ids.shape[1]), -1)  # [n, T, T]
        return self.head(mix @ h)


def _data(T: int) -> tuple[Tensor, Tensor]:
    return torch.randint(0, V, (N, T)), torch.randint(0, V, (N, T))


def _run(model: nn.Module, batches: list[tuple[Tensor, Tensor]], rows: int | None = N, **config) -> dict[str, Tensor]:
    engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clipping_function="abadi", **config))
    engine.attach()
    mask = torch.ones(N, dtype=torch.bool)
    for inputs in batches:
        with engine.recording(CPU, rows=rows):
            loss = token_cross_entropy(model, inputs).sum()
        engine.backward(loss, mask)
    return engine.pop_summed()


def _expected(model: nn.Module, batches: list[tuple[Tensor, Tensor]], **config) -> dict[str, Tensor]:
    mask = torch.ones(N, dtype=torch.bool)
    total: dict[str, Tensor] = {}
    for inputs in batches:
        one = reference_clipped_sum(model, token_cross_entropy, inputs, mask, function="abadi", **config)
        total = {k: total.get(k, 0) + v for k, v in one.items()}
    return total


def _assert_matches(got: dict[str, Tensor], expected: dict[str, Tensor], clip_norm: float) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=1e-6 * clip_norm, msg=name)


CASES = {
    "positions": Positions,
    "relative bias, add": lambda T: RelativeBias(T, "add"),
    "relative bias, matmul": lambda T: RelativeBias(T, "matmul"),
    "relative bias, sdpa attn_mask": lambda T: RelativeBias(T, "sdpa"),
    "relative bias, expand": lambda T: RelativeBias(T, "expand"),
    "relative bias, masked first": lambda T: RelativeBias(T, "masked"),
    "raw table, fallback": WithBiasTable,
}


@pytest.mark.parametrize("T", [N, 6], ids=["T == n", "T != n"])
@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
@pytest.mark.parametrize("case", list(CASES))
def test_shared_outputs_get_per_example_gradients(case: str, style: str, T: int) -> None:
    """Reference: tests/reference.py (each example alone in float64, autograd, Abadi clipping), two physical batches
    in a row (the second is watched because the first showed a shared output); rtol 1e-5."""
    torch.manual_seed(0)
    model = CASES[case](T)
    batches = [_data(T), _data(T)]
    C = 0.3
    got = _run(model, batches, clip_norm=C, clipping_style=style)
    _assert_matches(got, _expected(model, batches, clip_norm=C, style=style), C)


def test_positions_are_refused_when_the_rows_are_not_known() -> None:
    """Reference: without n (``recording(rows=None)``) nothing can be split; T == n, so shapes alone would pass the
    positions' rows as examples: refused, naming the module, before any gradient."""
    torch.manual_seed(0)
    with pytest.raises(UnsupportedLayerError, match="'wpe'.*broadcast"):
        _run(Positions(N), [_data(N)], rows=None)


def test_a_shared_output_also_combined_with_data_otherwise_is_refused() -> None:
    """Reference: the bias is added to the scores (split per example) and also mixes the hidden states through
    einsum (no per-example gradient for that use): refused, naming the module and the op, instead of dropping that
    use's gradient."""

    class AlsoEinsum(RelativeBias):
        def bias(self) -> Tensor:
            value = super().bias()
            self.last = value
            return value

        def forward(self, ids: Tensor) -> Tensor:
            logits = super().forward(ids)
            mixed = torch.einsum("bhqk,nkd->nqd", self.last, self.wte(ids))
            return logits + mixed.sum(-1, keepdim=True)

    torch.manual_seed(0)
    with pytest.raises(UnsupportedLayerError, match=r"'rel'.*`einsum`.*requires_grad_\(False\)"):
        _run(AlsoEinsum(6, "add"), [_data(6)])


@pytest.mark.parametrize("T", [N, 6], ids=["T == n", "T != n"])
def test_a_shared_output_fed_into_another_shared_module_is_refused(T: int) -> None:
    """Reference: positions embedded once and projected once (proj(wpe(arange(T)))), then added to the tokens: proj's
    per-example gradients are split where the sum meets the examples, wpe's would have to come back through proj's
    own tap. Refused naming both modules, also when T == n, where wpe's summed gradient [T, D] has n rows and would
    otherwise pass for per-example."""

    class Projected(Positions):
        def __init__(self, T: int) -> None:
            super().__init__(T)
            self.proj = nn.Linear(D, D)

        def forward(self, ids: Tensor) -> Tensor:
            return self.head(self.wte(ids) + self.proj(self.wpe(torch.arange(ids.shape[1]))))

    torch.manual_seed(0)
    with pytest.raises(UnsupportedLayerError, match=r"'wpe'.*goes into module 'proj'.*requires_grad_\(False\)"):
        _run(Projected(T), [_data(T)])


def test_models_without_shared_outputs_are_watched_on_the_first_batch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference: the op-by-op watch costs a Python call per op; it runs on the first batch, then only for models
    that showed a shared output."""
    watches = []
    real = watch_module.ForwardWatch.__init__

    def counting(self, *args, **kwargs):
        watches.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(watch_module.ForwardWatch, "__init__", counting)

    class NoShared(Positions):
        def forward(self, ids: Tensor) -> Tensor:
            return self.head(self.wte(ids) + self.wpe(torch.arange(ids.shape[1]).expand_as(ids)))

    torch.manual_seed(0)
    _run(NoShared(6), [_data(6)] * 3)
    assert len(watches) == 1
    _run(Positions(6), [_data(6)] * 3)
    assert len(watches) == 4
