"""Fine-tune a Hugging Face GPT-2 with differential privacy (epsilon = 3), its code unchanged.

Commands::

    python examples/hf_finetune.py                       # a small GPT-2 from scratch on embedded text, ~1 min on CPU
    python examples/hf_finetune.py --steps 300 --epsilon 8
    python -m lightning_dpzero.train task=hf_gpt2 privacy=eps3      # the same through Hydra

Needs the hf extra (``pip install "lightning_dpzero[hf]"``). Prints the validation loss and the (epsilon, delta) spent.
"""

from __future__ import annotations

import argparse

import lightning as L
from transformers import GPT2Config, GPT2LMHeadModel

import lightning_dpzero as dpz
from lightning_dpzero.tasks import HFCausalLMTask, SyntheticArithmeticDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="logical steps (sigma is calibrated for them)")
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=128, help="expected logical batch B")
    parser.add_argument("--physical-batch-size", type=int, default=64, help="p: memory only")
    parser.add_argument("--dim", type=int, default=64, help="GPT-2 width (n_embd)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and dropout")
    args = parser.parse_args()

    L.seed_everything(args.seed)
    data = SyntheticArithmeticDataModule(num_train=4096, num_val=256, block_size=64, batch_size=args.batch_size)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=15, n_positions=64, n_embd=args.dim, n_layer=2, n_head=4,
                                      bos_token_id=None, eos_token_id=None))  # fmt: skip

    # The three lines: wrap the model, choose a DP strategy, fit.
    task = HFCausalLMTask(gpt2, lr=2e-3)
    privacy = dpz.PrivacyConfig(target_epsilon=args.epsilon, physical_batch_size=args.physical_batch_size)
    trainer = L.Trainer(strategy=dpz.DPStrategy(privacy), max_steps=args.steps, callbacks=[dpz.PrivacyBudget()],
                        logger=False, enable_checkpointing=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(task, data)

    val_loss = trainer.validate(task, data, verbose=False)[0]["val_loss"]
    dp = trainer.strategy.dp
    print(f"val_loss={val_loss:.3f} after {trainer.global_step} steps, epsilon={dp.epsilon():.2f} delta={dp.delta:.1e}")


if __name__ == "__main__":
    main()
