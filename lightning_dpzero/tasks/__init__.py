"""Ready-made tasks: a LightningModule, a LightningDataModule and model builders for each.

- ``cifar``: CIFAR-10 classification, GroupNorm Wide-ResNet or a small ViT (``CIFARTask``, ``CIFAR10DataModule``).
- ``imdb``: IMDb sentiment, a Transformer encoder over hashed words (``IMDBTask``, ``IMDBDataModule``).
- ``gpt``: GPT-2-style language model, byte/char/GPT-2 tokenizers, checkpoint loading (``GPTTask``,
  ``TextFileDataModule``, ``SyntheticArithmeticDataModule``).
- ``hf``: any Hugging Face causal LM, unchanged, on the GPT data modules (``HFCausalLMTask``; the ``hf`` extra).

Every data module runs offline on generated data with learnable structure when no ``root`` is given, and reads the
real data set (or downloads it with ``download=True``) otherwise. Every model is clippable per example by the DP
strategies, and ``training_step`` returns per-example losses, so the same module trains with and without DP.
"""

from lightning_dpzero.tasks.cifar import (
    CIFAR10DataModule,
    CIFARTask,
    VisionTransformer,
    WideResNet,
    vit_tiny,
    wide_resnet,
)
from lightning_dpzero.tasks.gpt import (
    GPT,
    ByteTokenizer,
    CharTokenizer,
    GPT2BPETokenizer,
    GPTConfig,
    GPTTask,
    SyntheticArithmeticDataModule,
    TextFileDataModule,
    load_gpt_checkpoint,
)
from lightning_dpzero.tasks.hf import HFCausalLMTask
from lightning_dpzero.tasks.imdb import (
    HashingTokenizer,
    IMDBDataModule,
    IMDBTask,
    TransformerClassifier,
    transformer_classifier,
)

__all__ = [
    "GPT",
    "ByteTokenizer",
    "CIFAR10DataModule",
    "CIFARTask",
    "CharTokenizer",
    "GPT2BPETokenizer",
    "GPTConfig",
    "GPTTask",
    "HFCausalLMTask",
    "HashingTokenizer",
    "IMDBDataModule",
    "IMDBTask",
    "SyntheticArithmeticDataModule",
    "TextFileDataModule",
    "TransformerClassifier",
    "VisionTransformer",
    "WideResNet",
    "load_gpt_checkpoint",
    "transformer_classifier",
    "vit_tiny",
    "wide_resnet",
]
