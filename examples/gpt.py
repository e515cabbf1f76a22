"""Private training (or fine-tuning) of a GPT-2-style language model on byte-level text.

Commands::

    python examples/gpt.py                                    # generated arithmetic text, offline, ~1-2 min on CPU
    python examples/gpt.py --data data/text                   # train.txt (and val.txt) from a folder
    python examples/gpt.py --save gpt.pt && python examples/gpt.py --checkpoint gpt.pt --epsilon 3   # fine-tune
    python examples/gpt.py --checkpoint models/gpt2 --tokenizer gpt2 --data data/e2e --block-size 100 \
        --clip-norm 0.1 --batch-size 1024 --physical-batch-size 32 --lr 2e-3 --accelerator gpu   # Hugging Face GPT-2

``--checkpoint`` takes a Lightning .ckpt, a ``torch.save``d GPT/GPTTask state dict, or a Hugging Face GPT-2 folder
(config.json + model.safetensors or pytorch_model.bin; with ``--tokenizer gpt2`` its vocab.json and merges.txt
are read from the same folder). Prints the validation loss, the epsilon spent and a greedy continuation.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from _common import fit_and_validate  # examples/_common.py: the Trainer, fit, validation

from lightning_dpzero.tasks.gpt import GPTTask, TextFileDataModule


@torch.no_grad()
def continue_text(task: GPTTask, tokenizer, prompt: str, new_tokens: int) -> str:
    """Greedy decoding: the most likely next token, ``new_tokens`` times."""
    task.eval()
    ids = torch.tensor([tokenizer.encode(prompt)], device=task.device)
    for _ in range(new_tokens):
        logits = task.model(ids[:, -task.model.cfg.block_size :])  # [1, T, V]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return tokenizer.decode(ids[0].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="folder with train.txt (and val.txt); default: generated text")
    parser.add_argument("--tokenizer", choices=["byte", "gpt2"], default="byte")
    parser.add_argument("--checkpoint", default=None, help="initial weights (file or Hugging Face GPT-2 folder)")
    parser.add_argument("--save", default=None, help="torch.save the trained GPTTask state dict here")
    parser.add_argument("--block-size", type=int, default=32, help="T tokens per example (the privacy unit)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128, help="expected logical batch B")
    parser.add_argument("--physical-batch-size", type=int, default=64, help="p: memory only")
    parser.add_argument("--steps", type=int, default=200, help="logical steps (sigma is calibrated for them)")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--prompt", default="12+34=")
    parser.add_argument("--non-private", action="store_true")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation, augmentation, dropout")
    parser.add_argument(
        "--privacy-seed", type=int, default=None, help="DP noise and sampling (default: fresh OS entropy each run)"
    )
    args = parser.parse_args()

    L.seed_everything(args.seed)
    data = TextFileDataModule(
        root=args.data,
        block_size=args.block_size,
        batch_size=args.batch_size,
        tokenizer=args.tokenizer,
        tokenizer_path=args.checkpoint if args.tokenizer == "gpt2" else None,
    )
    model = GPTTask(
        vocab_size=256,
        block_size=args.block_size,
        n_layer=args.layers,
        n_embd=args.dim,
        lr=args.lr,
        checkpoint_path=args.checkpoint,  # its sizes replace the ones above
    )
    trainer, metrics, privacy_text = fit_and_validate(model, data, args)
    if args.save:
        torch.save(model.state_dict(), args.save)
    print(f"val_loss={metrics['val_loss']:.3f} after {trainer.global_step} steps, {privacy_text}")
    print(f"{args.prompt!r} -> {continue_text(model, data.tokenizer, args.prompt, 8)!r}")


if __name__ == "__main__":
    main()
