"""GPT task additions: byte and GPT-2 BPE tokenizers, text files, checkpoint loading (ours and Hugging Face GPT-2)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dpzero.tasks.gpt import (
    ByteTokenizer,
    CharTokenizer,
    GPT2BPETokenizer,
    GPTTask,
    TextFileDataModule,
    load_gpt_checkpoint,
    load_safetensors,
)
from lightning_dpzero.tasks.tokenizers import _bytes_to_unicode
from tests.tasks._helpers import parameters_changed, trainer


def test_byte_tokenizer_round_trips_any_text() -> None:
    """Reference: Python's own UTF-8 encoding."""
    text = "naïve café — 37+45=82; 🙂\n"
    tok = ByteTokenizer()
    assert tok.encode(text) == list(text.encode("utf-8")) and tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 256


def _tiny_bpe_folder(folder: Path) -> GPT2BPETokenizer:
    """vocab.json: the 256 byte symbols, then three merged tokens; merges.txt with GPT-2's header line."""
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    merges = [("h", "e"), ("Ġ", "t"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return GPT2BPETokenizer.from_folder(folder)


def test_gpt2_bpe_applies_merges_by_rank_and_round_trips(tmp_path: Path) -> None:
    """Reference: GPT-2's byte-to-unicode table (bytes 33..126 map to themselves, space to 'Ġ' = U+0120) and BPE
    by hand: ' the' -> 'Ġ','t','h','e' -> 'Ġ','t','he' (rank 0) -> 'Ġt','he' (rank 1) -> 'Ġthe' (rank 2)."""
    table = _bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("A")] == "A" and table[ord(" ")] == "\u0120"
    tok = _tiny_bpe_folder(tmp_path / "gpt2")
    assert tok.encode(" the") == [tok.vocab["Ġthe"]]
    assert tok.encode("he") == [tok.vocab["he"]]
    assert tok.encode("the") == [tok.vocab["t"], tok.vocab["he"]]  # no 'Ġ': the pair ('t', 'he') has no merge
    text = "Hello, the world's 42 numbers_x!!  \n  naïve 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 259


def test_text_file_datamodule_tokenizers_and_held_out_split(tmp_path: Path) -> None:
    """Reference: blocks are consecutive (input, next-token target) slices of the encoded text."""
    (tmp_path / "train.txt").write_text("hello world, " * 40, encoding="utf-8")
    dm = TextFileDataModule(root=str(tmp_path), block_size=8, batch_size=4, val_fraction=0.25)
    dm.setup("fit")
    assert isinstance(dm.tokenizer, ByteTokenizer)
    x, y = dm.train_set[1]
    ids = list(("hello world, " * 40)[:390].encode())
    assert x.tolist() == ids[8:16] and y.tolist() == ids[9:17]
    assert len(dm.val_set) == (130 - 1) // 8  # the last quarter (130 characters) is held out
    char = TextFileDataModule(root=str(tmp_path), block_size=8, alphabet="helo wrd,")
    char.setup("fit")
    assert isinstance(char.tokenizer, CharTokenizer) and char.train_set[0][0].max() < 9
    embedded = TextFileDataModule(block_size=8, num_train=16, num_val=4)
    embedded.setup("fit")
    assert len(embedded.train_set) == 16 and ByteTokenizer().decode(embedded.train_set[0][0].tolist()).count("+")
    _tiny_bpe_folder(tmp_path / "gpt2")
    bpe = TextFileDataModule(root=str(tmp_path), block_size=4, tokenizer="gpt2", tokenizer_path=str(tmp_path / "gpt2"))
    bpe.setup("fit")
    assert isinstance(bpe.tokenizer, GPT2BPETokenizer)
    with pytest.raises(ValueError, match="tokenizer_path"):
        TextFileDataModule(root=str(tmp_path), tokenizer="gpt2")
    with pytest.raises(ValueError, match="'byte', 'char', 'gpt2'"):
        TextFileDataModule(root=str(tmp_path), tokenizer="bpe")


@pytest.mark.parametrize("private", [True, False], ids=["dp", "nonprivate"])
def test_trains_on_bytes_and_resumes_from_its_checkpoint(tmp_path: Path, private: bool) -> None:
    """Reference: a Lightning checkpoint (with the DP strategy's state when private) and torch.save'd state dicts
    of GPT and GPTTask all restore the same weights and sizes into a GPTTask built with other sizes."""
    task = GPTTask(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16, activation="gelu_tanh")
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    t = trainer(private)
    t.fit(task, TextFileDataModule(block_size=16, batch_size=16, num_train=64, num_val=8))
    assert t.global_step == 3 and parameters_changed(before, task.model)
    t.save_checkpoint(tmp_path / "last.ckpt")
    torch.save(task.model.state_dict(), tmp_path / "gpt.pt")
    torch.save(task.state_dict(), tmp_path / "task.pt")
    for path in ("last.ckpt", "gpt.pt", "task.pt"):
        restored = GPTTask(checkpoint_path=str(tmp_path / path), n_head=2, activation="gelu_tanh")
        assert (restored.hparams.vocab_size, restored.hparams.n_layer, restored.hparams.n_embd) == (256, 1, 16)
        for name, value in task.model.state_dict().items():
            assert torch.equal(restored.model.state_dict()[name], value), (path, name)
        assert restored.model.head.weight is restored.model.wte.weight
    assert GPTTask(checkpoint_path=str(tmp_path / "last.ckpt")).hparams.n_head == 2  # from the checkpoint


def test_vocabulary_mismatch_is_refused() -> None:
    task = GPTTask(vocab_size=15, block_size=16, n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(ValueError, match="vocab_size=256"):
        trainer(False).fit(task, TextFileDataModule(block_size=16, num_train=16, num_val=4))


# ------------------------------------------------------------------------------------------------ Hugging Face GPT-2
def _hf_gpt2_tensors(vocab: int, positions: int, layers: int, d: int, seed: int = 0) -> dict[str, Tensor]:
    """Random tensors with GPT-2's names and shapes (Conv1D weights [in, out]) plus its causal-mask buffers."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> Tensor:
        return 0.2 * torch.randn(*shape, generator=g)

    t = {"wte.weight": rnd(vocab, d), "wpe.weight": rnd(positions, d), "ln_f.weight": 1 + rnd(d), "ln_f.bias": rnd(d)}
    for i in range(layers):
        t |= {
            f"h.{i}.ln_1.weight": 1 + rnd(d),
            f"h.{i}.ln_1.bias": rnd(d),
            f"h.{i}.attn.bias": torch.tril(torch.ones(positions, positions)).view(1, 1, positions, positions),
            f"h.{i}.attn.c_attn.weight": rnd(d, 3 * d),
            f"h.{i}.attn.c_attn.bias": rnd(3 * d),
            f"h.{i}.attn.c_proj.weight": rnd(d, d),
            f"h.{i}.attn.c_proj.bias": rnd(d),
            f"h.{i}.ln_2.weight": 1 + rnd(d),
            f"h.{i}.ln_2.bias": rnd(d),
            f"h.{i}.mlp.c_fc.weight": rnd(d, 4 * d),
            f"h.{i}.mlp.c_fc.bias": rnd(4 * d),
            f"h.{i}.mlp.c_proj.weight": rnd(4 * d, d),
            f"h.{i}.mlp.c_proj.bias": rnd(d),
        }
    return t


def _hf_gpt2_logits(hf: dict[str, Tensor], ids: Tensor, n_head: int) -> Tensor:
    """GPT-2's forward written from its published definition, in float64: Conv1D is x @ W + b, gelu_new is the
    tanh approximation, attention is causal with 1/sqrt(head dim) scaling, the head is tied to wte."""
    hf = {k: v.double() for k, v in hf.items()}
    n, length = ids.shape
    d = hf["wte.weight"].shape[1]
    x = hf["wte.weight"][ids] + hf["wpe.weight"][:length]

    def ln(z: Tensor, name: str) -> Tensor:
        return F.layer_norm(z, (d,), hf[f"{name}.weight"], hf[f"{name}.bias"], eps=1e-5)

    def gelu_new(z: Tensor) -> Tensor:
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for i in range(sum(k.endswith("ln_1.weight") for k in hf)):
        p = f"h.{i}."
        q, k, v = (ln(x, p + "ln_1") @ hf[p + "attn.c_attn.weight"] + hf[p + "attn.c_attn.bias"]).split(d, -1)
        q, k, v = (z.view(n, length, n_head, d // n_head).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d // n_head)).masked_fill(~causal, float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, d)
        x = x + attended @ hf[p + "attn.c_proj.weight"] + hf[p + "attn.c_proj.bias"]
        hidden = gelu_new(ln(x, p + "ln_2") @ hf[p + "mlp.c_fc.weight"] + hf[p + "mlp.c_fc.bias"])
        x = x + hidden @ hf[p + "mlp.c_proj.weight"] + hf[p + "mlp.c_proj.bias"]
    return ln(x, "ln_f") @ hf["wte.weight"].T


def _write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """The safetensors layout, written by hand: u64 header length, JSON header, raw little-endian bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in tensors.items():
        blob = tensor.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


@pytest.mark.parametrize("layout", ["folder-safetensors", "folder-bin", "file-safetensors"])
def test_hugging_face_gpt2_weights_give_gpt2_logits(tmp_path: Path, layout: str) -> None:
    """Reference: _hf_gpt2_logits, GPT-2's forward computed directly from the Hugging Face tensors in float64."""
    hf = _hf_gpt2_tensors(vocab=50, positions=12, layers=2, d=16)
    folder = tmp_path / "gpt2"
    folder.mkdir()
    config = {"n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 12, "vocab_size": 50}
    (folder / "config.json").write_text(json.dumps({**config, "activation_function": "gelu_new"}))
    if layout == "folder-bin":  # GPT2LMHeadModel.state_dict(): "transformer." prefix and the tied lm_head
        torch.save({**{f"transformer.{k}": v for k, v in hf.items()}, "lm_head.weight": hf["wte.weight"]},
                   folder / "pytorch_model.bin")  # fmt: skip
        path = folder
    else:
        _write_safetensors(folder / "model.safetensors", hf)
        path = folder if layout == "folder-safetensors" else folder / "model.safetensors"
    if layout != "folder-bin":
        read = load_safetensors(folder / "model.safetensors")
        assert read.keys() == hf.keys() and all(torch.equal(read[k], hf[k]) for k in hf)
    task = GPTTask(checkpoint_path=str(path), n_head=4, activation="gelu_tanh").double()
    assert (task.hparams.vocab_size, task.hparams.block_size, task.hparams.n_layer) == (50, 12, 2)
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(task.model(ids), _hf_gpt2_logits(hf, ids, n_head=4), rtol=1e-10, atol=1e-10)
    state, sizes = load_gpt_checkpoint(path)
    assert sizes["activation"] == "gelu_tanh" and (layout == "file-safetensors" or sizes["n_head"] == 4)


def test_unknown_checkpoint_contents_are_refused(tmp_path: Path) -> None:
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither GPT, GPTTask nor Hugging Face GPT-2"):
        load_gpt_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_gpt_checkpoint(tmp_path / "missing")
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="header past its end"):
        load_safetensors(tmp_path / "bad.safetensors")
