"""The Hydra task and experiment configs compose, instantiate and train (tiny sizes), via the entry point's run()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

import lightning_dpzero
from lightning_dpzero.tasks.cifar import CIFARTask, WideResNet
from lightning_dpzero.tasks.gpt import GPT2BPETokenizer, GPTTask, TextFileDataModule
from lightning_dpzero.tasks.imdb import IMDBDataModule, IMDBTask
from lightning_dpzero.train import run
from tests.tasks._helpers import trainer
from tests.tasks.test_gpt_task import _hf_gpt2_tensors, _tiny_bpe_folder, _write_safetensors

CONFIGS = Path(lightning_dpzero.__file__).resolve().parent / "configs"
TINY = {
    "cifar10": [
        "task.model.net.depth=10",
        "task.model.net.groups=4",
        "task.data.num_train=64",
        "task.data.num_val=16",
        "task.data.image_size=8",
        "task.data.batch_size=16",
    ],
    "imdb": [
        "task.model.net.dim=16",
        "task.model.net.depth=1",
        "task.data.num_train=64",
        "task.data.num_val=16",
        "task.data.max_len=64",
        "task.data.vocab_size=512",
        "task.data.batch_size=16",
    ],
    "gpt": ["task.model.n_embd=16", "task.data.num_train=64", "task.data.num_val=8", "task.data.batch_size=16"],
    "hf_gpt2": [
        "task.model.config.n_embd=16",
        "task.model.config.n_layer=1",
        "task.data.num_train=64",
        "task.data.num_val=8",
        "task.data.batch_size=16",
    ],
}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("task", sorted(TINY))
def test_task_config_trains_privately(task: str) -> None:
    """Reference: the config's model and data instantiate and train 2 DP steps; validation reports val_loss."""
    if task.startswith("hf_"):
        pytest.importorskip("transformers")
    cfg = _compose([f"task={task}", *TINY[task]])
    model, data = instantiate(cfg.task.model), instantiate(cfg.task.data)
    t = trainer(True, 2, physical_batch_size=8, expected_batch_size=16)
    t.fit(model, data)
    metrics = t.validate(model, data, verbose=False)[0]
    assert t.global_step == 2 and torch.isfinite(torch.tensor(metrics["val_loss"]))


def test_entry_point_runs_the_cifar10_task(tmp_path: Path) -> None:
    """Reference: run() (python -m lightning_dpzero.train) trains task=cifar10 and reports epsilon <= the target."""
    cfg = _compose(["task=cifar10", *TINY["cifar10"], "trainer.max_steps=2", "trainer.val_check_interval=2"])
    with open_dict(cfg):
        for key, value in (("plot", False), ("rich_progress_bar", False)):
            if key in cfg:
                cfg[key] = value
        cfg.trainer.logger = False
        cfg.trainer.enable_progress_bar = False
    summary = run(cfg, root_dir=tmp_path)
    assert summary["steps"] == 2 and 0 < summary["epsilon"] <= 8.0


def test_cifar10_experiments_compose_with_de_et_al_settings() -> None:
    """Reference: the experiment files' documented settings (WRN-16-4, B = 4096, C = 1, delta = 1e-5, no momentum,
    no augmentation); the real-data root is mandatory."""
    for name, epsilon, steps in (("cifar10_eps8", 8.0, 2468), ("cifar10_eps3", 3.0, 1500)):
        cfg = _compose([f"experiment={name}"])
        privacy = instantiate(cfg.privacy)
        assert (privacy.target_epsilon, privacy.delta, privacy.clip_norm) == (epsilon, 1e-5, 1.0)
        assert privacy.expected_batch_size == cfg.task.data.batch_size == 4096 and cfg.trainer.max_steps == steps
        assert cfg.task.data.augment is False and cfg.task.model.momentum == 0.0
        model = instantiate(cfg.task.model)
        assert isinstance(model, CIFARTask) and isinstance(model.net, WideResNet)
        assert sum(p.numel() for p in model.net.parameters()) == 2_748_890  # WRN-16-4


def test_experiments_need_the_real_data(tmp_path: Path) -> None:
    """Reference: without the data at the configured root, setup fails and names download=True (no silent fallback
    to the generated data)."""
    for name in ("cifar10_eps8", "imdb_eps8"):
        data = instantiate(_compose([f"experiment={name}", f"task.data.root={tmp_path / name}"]).task.data)
        with pytest.raises(FileNotFoundError, match="download=True"):
            data.setup("fit")


def test_imdb_experiment_composes() -> None:
    cfg = _compose(["experiment=imdb_eps8"])
    assert cfg.task.data.root == "data/imdb"
    assert isinstance(instantiate(cfg.task.model), IMDBTask)
    data = instantiate(cfg.task.data)
    assert isinstance(data, IMDBDataModule) and data.hparams.max_len == 256
    assert instantiate(cfg.privacy).expected_batch_size == 1024


def test_gpt_finetune_experiment_fine_tunes_a_hugging_face_folder(tmp_path: Path) -> None:
    """Reference: with a (tiny) GPT-2 folder holding weights, config.json, vocab.json and merges.txt, the experiment
    loads the weights into the model, the BPE tokenizer into the data, and trains 2 DP steps."""
    _tiny_bpe_folder(tmp_path / "gpt2")  # vocabulary of 259 tokens
    hf = _hf_gpt2_tensors(vocab=259, positions=16, layers=1, d=16)
    _write_safetensors(tmp_path / "gpt2" / "model.safetensors", hf)
    config = {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 16, "vocab_size": 259}
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(config))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "train.txt").write_text("the name is the eagle; the food is english. " * 30)
    (tmp_path / "text" / "val.txt").write_text("the area is the city centre. " * 10)
    cfg = _compose(
        [
            "experiment=gpt_finetune_eps3",
            f"task.model.checkpoint_path={tmp_path / 'gpt2'}",
            f"task.data.root={tmp_path / 'text'}",
            "task.data.block_size=16",
            "task.data.batch_size=16",
        ]
    )
    assert instantiate(cfg.privacy).clip_norm == 0.1
    model, data = instantiate(cfg.task.model), instantiate(cfg.task.data)
    assert isinstance(model, GPTTask) and model.hparams.n_head == 2 and model.hparams.activation == "gelu_tanh"
    assert isinstance(data, TextFileDataModule) and isinstance(data.tokenizer, GPT2BPETokenizer)
    torch.testing.assert_close(model.model.blocks[0].fc.weight, hf["h.0.mlp.c_fc.weight"].T)
    t = trainer(True, 2, clip_norm=0.1)
    t.fit(model, data)
    assert t.global_step == 2
