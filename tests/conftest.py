"""Tiny models, one or more per registered layer type (cf. Lightning ``demos/boring_classes.py``).

Every builder returns ``(model, per_sample_loss_fn, inputs)``: ``inputs`` is a tuple of tensors with the examples
first (N_EXAMPLES of them), and ``per_sample_loss_fn(model, inputs)`` returns the per-example losses, shape [n].
``LAYER_CASES`` maps each layer type to its builders; ``layer_case_params()`` parametrises over the library's
registry, so a newly registered type without a builder here fails the suite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpzero.clipping import registered_layer_types

# Tiny tensors gain nothing from intra-op threads, and with other processes on the 2 cores the OpenMP barriers of
# a multi-threaded op can stall for tens of milliseconds per call.
torch.set_num_threads(1)

N_EXAMPLES = 6
# Rows 2 and 5 are padding: they must contribute exactly zero.
DEFAULT_MASK = (True, True, False, True, True, False)

Built = tuple[nn.Module, Callable[[nn.Module, tuple[Tensor, ...]], Tensor], tuple[Tensor, ...]]


def default_mask() -> Tensor:
    return torch.tensor(DEFAULT_MASK, dtype=torch.bool)


def squared_error(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    """0.5 ||model(x) - y||^2 per example: shape [n]."""
    x, y = inputs
    out = model(x)
    return 0.5 * (out - y).square().flatten(1).sum(1)


def token_cross_entropy(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    """Sum over positions of the token cross-entropy, per example: shape [n]."""
    ids, targets = inputs
    logits = model(ids)  # [n, T, V]
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view(ids.shape[0], -1).sum(1)


def _regression(model: nn.Module, x: Tensor, out_dim_shape: tuple[int, ...]) -> Built:
    y = torch.randn(N_EXAMPLES, *out_dim_shape)
    return model, squared_error, (x, y)


# ------------------------------------------------------------------------------------------------ Linear
def linear_2d() -> Built:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    return _regression(model, torch.randn(N_EXAMPLES, 5), (3,))


def linear_3d() -> Built:
    """[n, T, D] input, T = 4: under norm_mode=auto the first layer is ghost (2T^2 <= PD), the second instantiated."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    return _regression(model, torch.randn(N_EXAMPLES, 4, 5), (4, 3))


# ------------------------------------------------------------------------------------------------ Conv
def _conv_model(conv: nn.Module, x_shape: tuple[int, ...], seed: int) -> Built:
    torch.manual_seed(seed)
    conv.reset_parameters()
    x = torch.randn(N_EXAMPLES, *x_shape)
    with torch.no_grad():
        flat = conv(x).flatten(1).shape[1]
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(flat, 2))
    return _regression(model, x, (2,))


def conv1d_basic() -> Built:
    return _conv_model(nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 9), 10)


def conv1d_reflect_dilated_grouped() -> Built:
    return _conv_model(nn.Conv1d(4, 6, 3, dilation=2, padding=2, padding_mode="reflect", groups=2), (4, 10), 11)


def conv1d_same_circular() -> Built:
    return _conv_model(nn.Conv1d(3, 4, 4, padding="same", dilation=2, padding_mode="circular", bias=False), (3, 8), 12)


def conv2d_basic() -> Built:
    return _conv_model(nn.Conv2d(2, 4, 3, padding=1), (2, 5, 5), 20)


def conv2d_strided_reflect_grouped() -> Built:
    conv = nn.Conv2d(4, 6, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, padding_mode="reflect")
    return _conv_model(conv, (4, 5, 6), 21)


def conv2d_depthwise_replicate() -> Built:
    return _conv_model(nn.Conv2d(3, 3, 3, padding=1, groups=3, padding_mode="replicate", bias=False), (3, 4, 4), 22)


def conv3d_strided_grouped() -> Built:
    conv = nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=1, dilation=(1, 1, 2), groups=2)
    return _conv_model(conv, (2, 3, 4, 5), 30)


def conv3d_reflect() -> Built:
    return _conv_model(nn.Conv3d(2, 2, 3, padding=1, padding_mode="reflect"), (2, 3, 3, 4), 31)


# ------------------------------------------------------------------------------------------------ Embedding
class EmbeddingBag(nn.Module):
    """Embedding (with a padding row), summed over positions, then a Linear head."""

    def __init__(self, padding_idx: int | None) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, padding_idx=padding_idx)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids).flatten(1, -2).sum(1)))


def _embedding_ids(shape: tuple[int, ...]) -> Tensor:
    ids = torch.randint(0, 10, (N_EXAMPLES, *shape))
    ids.view(N_EXAMPLES, -1)[:, 0] = 0  # the padding token in every example
    ids.view(N_EXAMPLES, -1)[:, 1] = ids.view(N_EXAMPLES, -1)[:, 2]  # a repeated token in every example
    return ids


def embedding_padding_idx() -> Built:
    torch.manual_seed(40)
    return _regression(EmbeddingBag(padding_idx=0), _embedding_ids((5,)), (3,))


def embedding_3d_ids() -> Built:
    torch.manual_seed(41)
    return _regression(EmbeddingBag(padding_idx=None), _embedding_ids((2, 3)), (3,))


# ------------------------------------------------------------------------------------------------ norms
def layer_norm_sequence() -> Built:
    torch.manual_seed(50)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2))
    return _regression(model, torch.randn(N_EXAMPLES, 4, 5), (4, 2))


def layer_norm_2d_shape_first() -> Built:
    """LayerNorm over the last two dims, as the first layer (its input is the data), and one without bias."""
    torch.manual_seed(51)
    model = nn.Sequential(nn.LayerNorm((3, 4)), nn.Flatten(), nn.Linear(24, 5), nn.LayerNorm(5, bias=False))
    return _regression(model, 2.0 * torch.randn(N_EXAMPLES, 2, 3, 4) + 1.0, (5,))


def group_norm_conv() -> Built:
    torch.manual_seed(60)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    return _regression(model, torch.randn(N_EXAMPLES, 2, 5, 5), (2,))


def group_norm_1d_and_flat() -> Built:
    torch.manual_seed(61)
    model = nn.Sequential(nn.Conv1d(2, 6, 3), nn.GroupNorm(3, 6), nn.Flatten(), nn.Linear(6 * 4, 6), nn.GroupNorm(2, 6))
    return _regression(model, torch.randn(N_EXAMPLES, 2, 6), (6,))


def rms_norm_sequence() -> Built:
    torch.manual_seed(62)
    model = nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.Tanh(), nn.Linear(6, 2), nn.RMSNorm([2], eps=1e-3))
    with torch.no_grad():
        model[1].weight.add_(0.3 * torch.randn(6))  # a trained-looking scale, not all ones
    return _regression(model, torch.randn(N_EXAMPLES, 3, 5), (3, 2))


def instance_norm_1d() -> Built:
    # conv bias=False: instance norm removes per-channel constants, so a conv bias would have exactly zero
    # gradient, which fp32 rounding turns into noise that automatic param-wise clipping then amplifies
    torch.manual_seed(63)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, bias=False), nn.InstanceNorm1d(4, affine=True), nn.Tanh(), nn.Flatten(), nn.Linear(16, 2)
    )
    with torch.no_grad():
        model[1].weight.add_(0.3 * torch.randn(4))
        model[1].bias.add_(0.3 * torch.randn(4))
    return _regression(model, torch.randn(N_EXAMPLES, 2, 6), (2,))


def instance_norm_2d_running_stats() -> Built:
    torch.manual_seed(64)
    norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)  # training mode: per-example statistics
    model = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), norm, nn.Tanh(), nn.Flatten(), nn.Linear(36, 2))
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(4))
    return _regression(model, torch.randn(N_EXAMPLES, 2, 5, 5), (2,))


def instance_norm_3d() -> Built:
    torch.manual_seed(65)
    model = nn.Sequential(
        nn.Conv3d(2, 3, 2, bias=False), nn.InstanceNorm3d(3, affine=True), nn.Flatten(), nn.Linear(24, 2)
    )
    with torch.no_grad():
        model[1].bias.add_(0.3 * torch.randn(3))
    return _regression(model, torch.randn(N_EXAMPLES, 2, 3, 3, 3), (2,))


LAYER_CASES: dict[type[nn.Module], list[Callable[[], Built]]] = {
    nn.Linear: [linear_2d, linear_3d],
    nn.Conv1d: [conv1d_basic, conv1d_reflect_dilated_grouped, conv1d_same_circular],
    nn.Conv2d: [conv2d_basic, conv2d_strided_reflect_grouped, conv2d_depthwise_replicate],
    nn.Conv3d: [conv3d_strided_grouped, conv3d_reflect],
    nn.Embedding: [embedding_padding_idx, embedding_3d_ids],
    nn.LayerNorm: [layer_norm_sequence, layer_norm_2d_shape_first],
    nn.GroupNorm: [group_norm_conv, group_norm_1d_and_flat],
    nn.RMSNorm: [rms_norm_sequence],
    nn.InstanceNorm1d: [instance_norm_1d],
    nn.InstanceNorm2d: [instance_norm_2d_running_stats],
    nn.InstanceNorm3d: [instance_norm_3d],
}
CONV_CASES = [build for kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d) for build in LAYER_CASES[kind]]


@dataclass(frozen=True)
class LayerCase:
    layer_type: type[nn.Module]
    build: Callable[[], Built]

    def __call__(self) -> Built:
        return self.build()


def _missing(layer_type: type[nn.Module]) -> Callable[[], Built]:
    def build() -> Built:
        pytest.fail(
            f"{layer_type.__name__} is registered in lightning_dpzero.clipping but has no tiny model in "
            "tests/conftest.py LAYER_CASES; add one so its rule is checked against the reference."
        )

    build.__name__ = "missing_fixture"
    return build


def layer_case_params() -> list:
    """One pytest.param per (registered layer type, tiny model); a registered type without a model fails."""
    params = []
    for layer_type in registered_layer_types():
        builders = LAYER_CASES.get(layer_type) or [_missing(layer_type)]
        for build in builders:
            params.append(pytest.param(LayerCase(layer_type, build), id=f"{layer_type.__name__}-{build.__name__}"))
    return params


# ------------------------------------------------------------------------------------------------ sharing
class TiedGPT(nn.Module):
    """GPT-style: the token embedding's weight is also the output projection's (as in nanoGPT)."""

    def __init__(self, vocab: int = 11, dim: int = 8, head_bias: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.ln = nn.LayerNorm(dim)
        self.mlp = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=head_bias)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = self.wte(ids)
        h = h + torch.tanh(self.mlp(self.ln(h)))
        return self.lm_head(h)


def tied_gpt(head_bias: bool = False, seq_len: int = 5) -> Built:
    torch.manual_seed(70)
    model = TiedGPT(head_bias=head_bias)
    ids = torch.randint(0, 11, (N_EXAMPLES, seq_len))
    if seq_len > 3:
        ids[:, 1] = ids[:, 3]  # a token repeated within each example
    targets = torch.randint(0, 11, (N_EXAMPLES, seq_len))
    return model, token_cross_entropy, (ids, targets)


class TwiceLinear(nn.Module):
    """The same Linear called twice in one forward pass, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        return self.head(self.lin(h))


def twice_linear(seq_len: int | None = 4) -> Built:
    torch.manual_seed(80)
    shape = (N_EXAMPLES, 6) if seq_len is None else (N_EXAMPLES, seq_len, 6)
    x = torch.randn(*shape)
    return _regression(TwiceLinear(), x, (2,) if seq_len is None else (seq_len, 2))


SHARING_CASES: dict[str, Callable[[], Built]] = {
    "tied_gpt": tied_gpt,
    "tied_gpt_head_bias": lambda: tied_gpt(head_bias=True),
    "tied_gpt_single_token": lambda: tied_gpt(seq_len=1),
    "twice_linear_seq": twice_linear,
    "twice_linear_flat": lambda: twice_linear(None),
}


@pytest.fixture(params=list(SHARING_CASES), ids=list(SHARING_CASES))
def sharing_case(request: pytest.FixtureRequest) -> Built:
    """A model with tied weights or a module called twice (cross terms between uses of one parameter)."""
    return SHARING_CASES[request.param]()


# ------------------------------------------------------------------------------------- end-to-end commands
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that start several processes run last (in their order): on 2 cores, ranks that share the machine with
    the background commands wait on each other's collectives many times longer (an audit of 150 steps: 13 s alone,
    144 s beside them)."""
    items.sort(key=lambda item: item.get_closest_marker("distributed") is not None)


@pytest.fixture(autouse=True)
def _machine_to_the_ranks(request: pytest.FixtureRequest) -> None:
    """Before a test that starts several processes: the background commands still queued or running finish."""
    if request.node.get_closest_marker("distributed") is not None:
        from tests import _warm

        _warm.drain()


def pytest_collection_finish(session: pytest.Session) -> None:
    """A test module with ``start_commands(items)`` gets its selected items now: it submits the commands those
    tests will check (tests/_warm.py runs them in the background, two at a time), so that they run beside the
    single-threaded unit tests on the core those leave idle, and are done by the time their tests come."""
    if session.config.option.collectonly:
        return
    modules: dict = {}
    for item in session.items:
        if isinstance(item, pytest.Function):
            modules.setdefault(item.module, []).append(item)
    for module, items in modules.items():
        start = getattr(module, "start_commands", None)
        if start is not None:
            start(items)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests import _warm

    _warm.shutdown()
