"""Private IMDb sentiment classification with a small Transformer encoder, on embedded reviews or the real data set.

Commands::

    python examples/imdb.py                                   # generated template reviews, offline, ~1 min on CPU
    python examples/imdb.py --data data/imdb --download       # the real aclImdb reviews (fetched, MD5-checked)
    python examples/imdb.py --data data/imdb --num-train 0 --max-len 256 --dim 128 --batch-size 1024 --steps 500 \
        --physical-batch-size 128 --accelerator gpu          # configs/experiment/imdb_eps8.yaml's setting (GPU)
    python examples/imdb.py --non-private

Tokens are lower-cased words hashed into --vocab-size buckets: no download, no vocabulary built from the private
texts. Prints the validation accuracy and the (epsilon, delta) spent.
"""

from __future__ import annotations

import argparse

import lightning as L
from _common import fit_and_validate  # examples/_common.py: the Trainer, fit, validation

from lightning_dpzero.tasks.imdb import IMDBDataModule, IMDBTask, transformer_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="folder with aclImdb/ or aclImdb_v1.tar.gz (default: none)")
    parser.add_argument("--download", action="store_true", help="fetch aclImdb_v1.tar.gz into --data")
    parser.add_argument("--num-train", type=int, default=4096, help="N (a fixed subset of the real data; 0: all)")
    parser.add_argument("--num-val", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=48, help="tokens per review ([CLS] + the first max-len - 1)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128, help="expected logical batch B")
    parser.add_argument("--physical-batch-size", type=int, default=64, help="p: memory only")
    parser.add_argument("--steps", type=int, default=150, help="logical steps (sigma is calibrated for them)")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--non-private", action="store_true")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation, augmentation, dropout")
    parser.add_argument(
        "--privacy-seed", type=int, default=None, help="DP noise and sampling (default: fresh OS entropy each run)"
    )
    args = parser.parse_args()

    L.seed_everything(args.seed)
    net = transformer_classifier(args.vocab_size, args.max_len, dim=args.dim, depth=args.depth, heads=4)
    model = IMDBTask(net, optimizer="adamw", lr=args.lr)
    data = IMDBDataModule(
        root=args.data,
        download=args.download,
        num_train=args.num_train or None,
        num_val=args.num_val or None,
        max_len=args.max_len,
        vocab_size=args.vocab_size,
        batch_size=args.batch_size,
    )
    trainer, metrics, privacy_text = fit_and_validate(model, data, args, delta=1e-5)
    result = f"val_acc={metrics['val_acc']:.3f} val_loss={metrics['val_loss']:.3f}"
    print(f"{result} after {trainer.global_step} steps, {privacy_text}")


if __name__ == "__main__":
    main()
