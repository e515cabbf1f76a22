"""Hugging Face transformers models, unchanged (tiny configs, no downloads), against the float64 per-example oracle.

GPT-2 (``Conv1D`` with its transposed weight, positions ``wpe(arange(T)[None])`` computed once for the batch, a tied
head), Llama (``LlamaRMSNorm`` through the torch.func fallback), OPT (learned positions in an ``nn.Embedding``
subclass; feed-forward layers on rows flattened to [n * T, D]), BERT (positions and token types computed once), ViT
(raw class token and position embeddings owned by ``ViTEmbeddings``), a sequence-first ``nn.TransformerEncoder`` (the
examples followed through the transpose to dim 1), T5 (``T5LayerNorm`` through the fallback; its
relative attention bias [T, T, heads] computed once from positions and reused by every layer, split per example where
it meets the scores: clipping/shared.py)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_dpzero as dpz
from lightning_dpzero.clipping import ClippingEngine
from lightning_dpzero.config import PrivacyConfig
from tests.reference import reference_clipped_sum

transformers = pytest.importorskip("transformers", reason="the transformers tests need the `hf` extra")

N, T, V = 4, 6, 50
C = 0.5  # small enough that every example is clipped by Abadi's min(1, C / norm)


def _quiet(config):
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    return config


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=V, n_positions=32, attn_pdrop=0.0,
                                  embd_pdrop=0.0, resid_pdrop=0.0)  # fmt: skip
    return transformers.GPT2LMHeadModel(_quiet(cfg))


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=V, max_position_embeddings=32)  # fmt: skip
    return transformers.LlamaForCausalLM(_quiet(cfg))


def _opt() -> nn.Module:
    cfg = transformers.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=V,
                                 max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0)  # fmt: skip
    return transformers.OPTForCausalLM(_quiet(cfg))


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  vocab_size=V, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.BertForSequenceClassification(_quiet(cfg))


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=8, patch_size=4, num_channels=3, num_labels=3, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.ViTForImageClassification(cfg)


def _t5() -> nn.Module:
    """Two layers in the encoder and the decoder: each stack's relative bias is reused by its second layer."""
    cfg = transformers.T5Config(d_model=16, d_ff=32, num_layers=2, num_heads=2, vocab_size=V, d_kv=8, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(_quiet(cfg))


def _torch_transformer() -> nn.Module:
    """torch's own ``nn.Transformer`` as Lightning's demo builds it (batch_first ``nn.MultiheadAttention`` through the
    fallback, a causal mask, an output flattened to [n * T, V]), with dropout 0: the reference runs each example
    alone and cannot draw the forward's masks (its dropout is tested in test_layers.py)."""
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=V, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.0)


class _SequenceFirstLM(nn.Module):
    """torch's classic language-model layout (pytorch/examples' word_language_model): tokens transposed to [T, n],
    an ``nn.TransformerEncoder`` left at its default ``batch_first=False`` with a causal mask, logits [T, n, V]."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, V)

    def forward(self, ids: Tensor) -> Tensor:
        src = self.emb(ids.t())  # [T, n, E]
        causal = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.head(self.encoder(src, mask=causal, is_causal=True))  # [T, n, V]


def sequence_first_loss(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    """Next-token cross-entropy from [T, n, V] logits, averaged over each example's tokens: [n]."""
    (ids,) = inputs
    logits = model(ids)[:-1].permute(1, 2, 0)  # [n, V, T - 1]
    return F.cross_entropy(logits, ids[:, 1:], reduction="none").mean(1)


def lm_loss(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    """Next-token cross-entropy, averaged over each example's tokens: [n]."""
    (ids,) = inputs
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def class_loss(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    x, y = inputs
    key = "pixel_values" if x.is_floating_point() else "input_ids"
    return F.cross_entropy(model(**{key: x}).logits, y, reduction="none")


def seq2seq_loss(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    (ids,) = inputs
    logits = model(input_ids=ids, decoder_input_ids=ids).logits
    return F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)


def demo_loss(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    """The demo's log-probabilities of its own input (encoder and decoder both read it), averaged per example: [n]."""
    (ids,) = inputs
    return F.nll_loss(model(ids, ids), ids.flatten(), reduction="none").view(ids.shape).mean(1)


def _tokens(n: int, length: int = T) -> tuple[Tensor, ...]:
    return (torch.randint(0, V, (n, length)),)


def _labelled_tokens(n: int) -> tuple[Tensor, ...]:
    return torch.randint(0, V, (n, T)), torch.randint(0, 3, (n,))


def _images(n: int) -> tuple[Tensor, ...]:
    return torch.randn(n, 3, 8, 8), torch.randint(0, 3, (n,))


MODELS = {
    "gpt2": (_gpt2, lm_loss, _tokens),
    "llama": (_llama, lm_loss, _tokens),
    "opt": (_opt, lm_loss, _tokens),
    "bert": (_bert, class_loss, _labelled_tokens),
    "vit": (_vit, class_loss, _images),
    "t5": (_t5, seq2seq_loss, _tokens),
    "torch_transformer": (_torch_transformer, demo_loss, _tokens),
    "torch_sequence_first": (_SequenceFirstLM, sequence_first_loss, _tokens),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_clipped_sum_matches_the_float64_reference(name: str) -> None:
    """Reference: tests/reference.py (each example alone through a float64 copy of the model, autograd, Abadi clipping
    to C, summed). rtol 1e-5 of each parameter's sum, atol 1e-6 C (an attention key bias has a zero gradient)."""
    torch.manual_seed(0)
    build, loss_fn, data = MODELS[name]
    _assert_matches_the_reference(build().train(), loss_fn, data(N))


def _assert_matches_the_reference(model: nn.Module, loss_fn, inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """The engine's clipped sum of one physical batch of N examples against reference_clipped_sum, twice: the first
    batch is watched (watch.py) and tapped by copy, the second runs as every later one (outputs of built-in layers
    tapped in place). Returns the reference."""
    mask = torch.ones(N, dtype=torch.bool)
    engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=C, clipping_function="abadi"))
    engine.attach()
    results = []
    for _ in range(2):
        with engine.recording(torch.device("cpu"), rows=N):
            loss = loss_fn(model, inputs).sum()
        engine.backward(loss, mask)
        results.append(engine.pop_summed())
    engine.detach()
    expected = reference_clipped_sum(model, loss_fn, inputs, mask, clip_norm=C, style="all-layer", function="abadi")
    for batch, got in enumerate(results):
        assert set(got) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(
                got[key].double(), value, rtol=1e-5, atol=1e-6 * C, msg=lambda m, k=key, b=batch: f"batch {b}, {k}: {m}"
            )
    return expected


class HFTask(L.LightningModule):
    def __init__(self, net: nn.Module, loss_fn, data: tuple[Tensor, ...]) -> None:
        super().__init__()
        self.net, self.loss_fn = net, loss_fn
        self.rows = [tuple(t[i] for t in data) for i in range(data[0].shape[0])]

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.loss_fn(self.net, tuple(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=4)


def _dp_trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        strategy=dpz.DPStrategy(dpz.PrivacyConfig(noise_multiplier=1.0, expected_batch_size=8, physical_batch_size=4)),
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_trains_under_dp_with_no_change_to_the_model(name: str) -> None:
    """Reference: the per-example self-check (rows, losses, buffers, autograd's per-example norms) passes and two
    logical steps are taken and accounted."""
    torch.manual_seed(0)
    build, loss_fn, data = MODELS[name]
    trainer = _dp_trainer(2)
    trainer.fit(HFTask(build(), loss_fn, data(32)))
    assert trainer.strategy.dp.ledger.accountant.steps == 2


@pytest.mark.parametrize("length", [N, 2 * N], ids=["T=n", "T=2n"])
def test_t5_relative_bias_matches_the_reference_whatever_t(length: int) -> None:
    """Reference: as test_clipped_sum_matches_the_float64_reference, at sequence lengths that shapes cannot tell from
    the example dimension (T equal to n, a multiple of n), where rows of the bias [T, T, heads] could pass as
    examples."""
    torch.manual_seed(0)
    expected = _assert_matches_the_reference(_t5().train(), seq2seq_loss, _tokens(N, length))
    biases = [k for k in expected if k.endswith("relative_attention_bias.weight")]
    assert len(biases) == 2 and all(float(expected[k].norm()) > 1e-3 for k in biases)


def test_every_model_is_also_tested_on_two_processes() -> None:
    """Reference: tests/strategies/test_parallel.py runs each of these models under dp_ddp, dp_zero3 and dp_fsdp."""
    from tests.strategies.test_parallel import _HF_MODELS

    assert set(_HF_MODELS) == set(MODELS)


class _SquareWeightTwoLayouts(nn.Module):
    """One square weight used by an nn.Linear (as [out, in]) and by GPT-2's Conv1D (as [in, out], transposed)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 5)
        self.conv1d = transformers.pytorch_utils.Conv1D(5, 5)
        self.conv1d.weight = self.linear.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.conv1d(torch.tanh(self.linear(x)))


@pytest.mark.parametrize("norm_mode", ["ghost", "instantiate", "auto"])
def test_a_weight_shared_by_layers_that_lay_it_out_differently(norm_mode):
    """Reference: reference_clipped_sum. The cross term of the two uses' per-example gradients must be taken in the
    parameter's layout: their factored matrices have the same shape but one is the other's transpose."""
    torch.manual_seed(3)
    model = _SquareWeightTwoLayouts()
    inputs = (torch.randn(N, 3, 5), torch.randn(N, 3, 5))

    def loss_fn(net: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        return (net(batch[0]) * batch[1]).sum((1, 2))

    mask = torch.ones(N, dtype=torch.bool)
    engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=C, clipping_function="abadi",
                                                 norm_mode=norm_mode))  # fmt: skip
    engine.attach()
    with engine.recording(torch.device("cpu"), rows=N):
        loss = loss_fn(model, inputs).sum()
    engine.backward(loss, mask)
    got = engine.pop_summed()
    expected = reference_clipped_sum(model, loss_fn, inputs, mask, clip_norm=C, style="all-layer", function="abadi")
    for key, value in expected.items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-5, atol=1e-6 * C, msg=key)
