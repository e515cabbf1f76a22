"""Private CIFAR-10 classification with a GroupNorm Wide-ResNet, on the embedded images or the real data set.

Commands::

    python examples/cifar10.py                                     # generated 16x16 images, offline, ~1-2 min on CPU
    python examples/cifar10.py --data data/cifar10 --download      # the real CIFAR-10 (fetched, MD5-checked)
    python examples/cifar10.py --data data/cifar10 --num-train 0 --depth 16 --width 4 --batch-size 4096 --steps 2468 \
        --lr 2 --momentum 0 --physical-batch-size 256 --accelerator gpu      # De et al.'s WRN-16-4 setting (GPU)
    python examples/cifar10.py --non-private                       # the same model without DP (lr / 10, augmented)

Prints the validation accuracy and the (epsilon, delta) spent.
"""

from __future__ import annotations

import argparse

import lightning as L
from _common import fit_and_validate  # examples/_common.py: the Trainer, fit, validation

from lightning_dpzero.tasks.cifar import CIFAR10DataModule, CIFARTask, vit_tiny, wide_resnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default=None, help="folder with cifar-10-batches-py/ or the .tar.gz (default: generated)"
    )
    parser.add_argument("--download", action="store_true", help="fetch cifar-10-python.tar.gz into --data")
    parser.add_argument("--image-size", type=int, default=16, help="side of the generated images (real ones: 32)")
    parser.add_argument("--model", choices=["wrn", "vit"], default="wrn")
    parser.add_argument("--depth", type=int, default=10, help="WRN depth 6k+4 (16 in De et al.)")
    parser.add_argument("--width", type=int, default=1, help="WRN widening factor (4 in De et al.)")
    parser.add_argument("--num-train", type=int, default=5000, help="N (a fixed subset of the real data; 0: all)")
    parser.add_argument("--batch-size", type=int, default=128, help="expected logical batch B")
    parser.add_argument("--physical-batch-size", type=int, default=64, help="p: memory only")
    parser.add_argument("--steps", type=int, default=60, help="logical steps (sigma is calibrated for them)")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--non-private", action="store_true")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation, augmentation, dropout")
    parser.add_argument(
        "--privacy-seed", type=int, default=None, help="DP noise and sampling (default: fresh OS entropy each run)"
    )
    args = parser.parse_args()

    L.seed_everything(args.seed)
    image_size = 32 if args.data else args.image_size
    net = wide_resnet(args.depth, args.width) if args.model == "wrn" else vit_tiny(image_size, dim=64, depth=2, heads=2)
    lr = args.lr / 10 if args.non_private else args.lr
    model = CIFARTask(net, optimizer="sgd", lr=lr, momentum=args.momentum)
    data = CIFAR10DataModule(
        root=args.data,
        download=args.download,
        num_train=args.num_train or None,
        num_val=500,
        image_size=image_size,
        batch_size=args.batch_size,
    )
    trainer, metrics, privacy_text = fit_and_validate(model, data, args, delta=1e-5)
    result = f"val_acc={metrics['val_acc']:.3f} val_loss={metrics['val_loss']:.3f}"
    print(f"{result} after {trainer.global_step} steps, {privacy_text}")


if __name__ == "__main__":
    main()
