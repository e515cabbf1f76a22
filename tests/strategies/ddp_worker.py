"""Run by torchrun from tests/strategies/test_dp_ddp.py: trains a few DP steps on 2 CPU ranks, saves what it saw.

torchrun --standalone --nproc_per_node 2 tests/strategies/ddp_worker.py MODE OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning_dpzero as dpz  # noqa: E402
from tests.strategies.test_dp_strategy import Capture, GradLog, Task, ZeroGrad  # noqa: E402


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    if mode == "oracle":
        privacy = dpz.PrivacyConfig(
            noise_multiplier=0.0, clip_norm=0.3, expected_batch_size=4, physical_batch_size=3, seed=11
        )
        task, callback, steps = Task(), Capture(), 8
    else:
        privacy = dpz.PrivacyConfig(noise_multiplier=2.0, clip_norm=0.5, expected_batch_size=16, seed=3)
        task, callback, steps = ZeroGrad(), GradLog(), 3
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=dpz.DPDDPStrategy(privacy, process_group_backend="gloo"),
        max_steps=steps,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task)
    rank = trainer.global_rank
    dp = trainer.strategy.dp
    record = {"grads": callback.grads, "epsilon": dp.epsilon(), "steps": dp.accountant.steps, "world": dp.world_size}
    if mode == "oracle":
        record["batches"] = [(b.physical_batches, b.masks) for b in callback.batches]
        record["models"] = [m.state_dict() for m in callback.models]
    torch.save(record, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
