"""IMDb task: tokenizer, the embedded and the real-format data, the Transformer classifier under dp and non-private."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpzero.config import _ZERO_NOISE_ENV
from lightning_dpzero.tasks import imdb
from lightning_dpzero.tasks._data import file_md5
from lightning_dpzero.tasks.imdb import (
    HashingTokenizer,
    IMDBDataModule,
    IMDBTask,
    load_imdb,
    synthetic_reviews,
    transformer_classifier,
)
from tests.reference import reference_clipped_sum
from tests.tasks._helpers import Capture, parameters_changed, trainer


def test_hashing_tokenizer_is_data_independent_and_pads() -> None:
    """Reference: ids are 2 + crc32(word) mod (V - 2), computed here with zlib; [CLS] first, 0-padded, truncated."""
    import zlib

    tok = HashingTokenizer(vocab_size=100)
    assert tok.words("Great movie!<br />It's GREAT.") == ["great", "movie", "!", "it's", "great", "."]
    ids = tok.encode("Great movie!")
    assert ids == [2 + zlib.crc32(w.encode()) % 98 for w in ("great", "movie", "!")]
    batch = tok.encode_batch(["Great movie!", "a b c d e f g"], max_len=5)
    assert batch.tolist()[0] == [1, *ids, 0]
    assert batch.shape == (2, 5) and batch[1, 0] == 1 and (batch[1] > 1).sum() == 4  # truncated to max_len - 1
    with pytest.raises(ValueError, match="vocab_size"):
        HashingTokenizer(2)


def test_synthetic_reviews_have_a_learnable_label() -> None:
    """Reference: counting positive minus negative adjectives, with "not" flipping the adjective after it, recovers
    the label of every review (the generator's rule), while ignoring negation gets clearly fewer right."""
    texts, labels = synthetic_reviews(400, seed=3)
    assert texts == synthetic_reviews(400, seed=3)[0] and set(labels.tolist()) == {0, 1}

    def score(text: str, negation: bool) -> int:
        total, words = 0, text.replace(".", " .").split()
        for i, word in enumerate(words):
            sign = 1 if word in imdb._POSITIVE else -1 if word in imdb._NEGATIVE else 0
            if negation and sign and "not" in words[max(0, i - 2) : i]:
                sign = -sign
            total += sign
        return int(total > 0)

    exact = np.mean([score(t, True) == y for t, y in zip(texts, labels.tolist())])
    naive = np.mean([score(t, False) == y for t, y in zip(texts, labels.tolist())])
    assert exact == 1.0 and naive < 0.95, (exact, naive)


def _cross_entropy(net: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    ids, y = inputs
    return F.cross_entropy(net(ids), y, reduction="none")


def test_padding_does_not_change_the_prediction() -> None:
    """Reference: the same review padded to a longer row gives the same logits (key-padding mask, masked mean)."""
    torch.manual_seed(0)
    net = transformer_classifier(vocab_size=64, max_len=12, dim=16, depth=2, heads=2)
    ids = torch.tensor([[1, 5, 9, 7, 0, 0, 0, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(net(ids), net(ids[:, :4]))


def test_dp_gradient_matches_float64_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference: tests/reference.py (each real example alone, float64, clipped, summed) / B, with sigma = 0;
    the rows have different numbers of padding positions."""
    monkeypatch.setenv(_ZERO_NOISE_ENV, "1")
    torch.manual_seed(0)
    task = IMDBTask(transformer_classifier(vocab_size=128, max_len=64, dim=16, depth=1, heads=2), lr=1e-2)
    capture = Capture("net")
    dm = IMDBDataModule(num_train=24, num_val=8, max_len=64, vocab_size=128, batch_size=6)
    privacy = {"noise_multiplier": 0.0, "clip_norm": 0.5, "clipping_function": "abadi"}
    trainer(True, 2, [capture], expected_batch_size=6, physical_batch_size=4, seed=4, **privacy).fit(task, dm)
    assert len(capture.grads) == 2
    for batch, before, grads in zip(capture.batches, capture.nets, capture.grads):
        ids = torch.cat([b[0] for b in batch.physical_batches])
        y = torch.cat([b[1] for b in batch.physical_batches])
        mask = torch.cat(batch.masks)
        assert len(set((ids > 0).sum(1).tolist())) > 1, "rows of different lengths"
        expected = reference_clipped_sum(
            before, _cross_entropy, (ids, y), mask, clip_norm=0.5, style="all-layer", function="abadi"
        )
        scale = max(v.abs().max().item() for v in expected.values()) / 6.0
        for name, value in expected.items():
            torch.testing.assert_close(grads[name].double(), value / 6.0, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("private", [True, False], ids=["dp", "nonprivate"])
def test_trains_a_few_steps_on_embedded_data(private: bool) -> None:
    """Reference: the parameters move and validation reports finite val_loss and val_acc in [0, 1]."""
    task = IMDBTask(transformer_classifier(vocab_size=512, max_len=64, dim=16, depth=1, heads=2))
    before = {n: p.detach().clone() for n, p in task.net.named_parameters()}
    dm = IMDBDataModule(num_train=64, num_val=16, max_len=64, vocab_size=512, batch_size=16)
    t = trainer(private)
    t.fit(task, dm)
    metrics = t.validate(task, dm, verbose=False)[0]
    assert t.global_step == 3 and parameters_changed(before, task.net)
    assert np.isfinite(metrics["val_loss"]) and 0.0 <= metrics["val_acc"] <= 1.0


# ------------------------------------------------------------------------------------------------ real format
_REVIEWS = {
    ("train", "pos"): ["A wonderful film.<br /><br />Loved it.", "Great cast, great story."],
    ("train", "neg"): ["Dull and far too long.", "Awful script.", "I walked out."],
    ("test", "pos"): ["Brilliant!"],
    ("test", "neg"): ["Boring.", "Terrible ending, ugly sets."],
}


def _write_imdb_folder(folder: Path) -> None:
    """A tiny aclImdb tree in the official layout: {split}/{pos,neg}/{id}_{rating}.txt, plus unsup/ (ignored)."""
    for (split, label), texts in _REVIEWS.items():
        (folder / split / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            rating = 9 if label == "pos" else 2
            (folder / split / label / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
    (folder / "train" / "unsup").mkdir()
    (folder / "train" / "unsup" / "0_0.txt").write_text("not labelled", encoding="utf-8")
    (folder / "imdb.vocab").write_text("the\nand\n", encoding="utf-8")


def test_load_imdb_reads_the_folder_layout(tmp_path: Path) -> None:
    """Reference: negatives first then positives, files sorted, labels 0/1; unsup is ignored."""
    _write_imdb_folder(tmp_path / "aclImdb")
    train_texts, train_y, test_texts, test_y = load_imdb(tmp_path)
    assert train_texts == _REVIEWS[("train", "neg")] + _REVIEWS[("train", "pos")]
    assert train_y.tolist() == [0, 0, 0, 1, 1] and test_y.tolist() == [0, 0, 1]
    assert test_texts == _REVIEWS[("test", "neg")] + _REVIEWS[("test", "pos")]
    assert load_imdb(tmp_path / "aclImdb")[0] == train_texts


def test_load_imdb_extracts_the_archive_and_downloads_with_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reference: the archive (found in root, given as root, or fetched) yields the same reviews as the folder."""
    _write_imdb_folder(tmp_path / "src" / "aclImdb")
    expected = load_imdb(tmp_path / "src")
    archive = tmp_path / "a" / "aclImdb_v1.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "aclImdb", arcname="aclImdb")
    for root in (tmp_path / "a", archive):
        got = load_imdb(root)
        assert got[0] == expected[0] and got[2] == expected[2] and torch.equal(got[1], expected[1])
    monkeypatch.setattr(imdb, "IMDB_URL", archive.as_uri())
    monkeypatch.setattr(imdb, "IMDB_MD5", "f" * 32)
    with pytest.raises(ValueError, match="MD5"):
        load_imdb(tmp_path / "bad", download=True)
    monkeypatch.setattr(imdb, "IMDB_MD5", file_md5(archive))
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_imdb(tmp_path / "fetched")
    assert load_imdb(tmp_path / "fetched", download=True)[0] == expected[0]


def test_datamodule_tokenizes_real_reviews(tmp_path: Path) -> None:
    """Reference: each row is HashingTokenizer.encode_batch of the review; validation is the test split."""
    _write_imdb_folder(tmp_path / "aclImdb")
    dm = IMDBDataModule(root=str(tmp_path), max_len=8, vocab_size=256, batch_size=2)
    dm.setup("fit")
    assert len(dm.train_set) == 5 and len(dm.val_set) == 3
    ids, label = dm.train_set[3]
    expected = HashingTokenizer(256).encode_batch([_REVIEWS[("train", "pos")][0]], 8)[0]
    assert torch.equal(ids, expected) and label == 1
    assert "br" not in HashingTokenizer(256).words(_REVIEWS[("train", "pos")][0])
