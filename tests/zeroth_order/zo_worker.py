"""Run by torchrun from ``test_parallel.py``: zeroth-order DP steps on 2 CPU ranks; saves what each rank saw.

    torchrun --standalone --nproc_per_node 2 tests/zeroth_order/zo_worker.py STRATEGY OUT_DIR

STRATEGY is ddp, zero3 or fsdp.

Phase 1 (sigma = 0, float64, P = 2, two stages with a proximal term): per logical step, each rank's physical
batches and masks and the weights before and after. Phase 2 (sigma = 1): the released g of each step and whether
this rank drew noise. Phase 3 (fsdp, zero3): phase 1 stopped after 2 steps and resumed from its sharded checkpoint.
Phase 4: phase 1 with 30% of the coordinates kept by SynFlow.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning_dpzero as dpz  # noqa: E402
from tests._torchrun import exit_worker  # noqa: E402
from tests.zeroth_order.test_step import Task, _zo_privacy  # noqa: E402

ZO = dict(
    num_directions=2,
    num_stages=2,
    stage_length=1,
    perturbation_scale=(1e-3, 5e-4),
    learning_rate=(0.2, 0.1),
    proximal_weight=(0.5, 0.3),
)
# DeepSpeed runs the model in fp32 (Lightning's DeepSpeed precision casts it): a larger beta keeps the fp32 rounding
# of the loss differences (~1e-7 |l| / beta) well under the tolerance.
ZO_FP32 = {**ZO, "perturbation_scale": (5e-2, 2.5e-2)}


def settings(strategy: str) -> dict:
    return ZO_FP32 if strategy == "zero3" else ZO  # FSDP2 keeps the float64 model


def _full_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = list(module.parameters())
    if params and hasattr(params[0], "full_tensor"):  # FSDP2 DTensor shards: gathered (a collective)
        return {n: p.full_tensor().detach().clone() for n, p in module.named_parameters()}
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone() for n, p in module.named_parameters()}
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class Record(L.Callback):
    """Full weights before and after each logical step (gathered under ZeRO-3), and the step's physical batches."""

    def __init__(self) -> None:
        self.before, self.after, self.batches = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append(_full_params(pl_module.net))
        self.batches.append((batch.physical_batches, batch.masks))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(_full_params(pl_module.net))


class Released(L.Callback):
    def __init__(self) -> None:
        self.ghats: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ghats.append(trainer.strategy.dp.last_update["ghat"].clone())


def _trainer(
    strategy: str, privacy: dpz.PrivacyConfig, steps: int, callbacks: list, checkpoints: Path | None = None
) -> L.Trainer:
    if strategy == "ddp":
        strat = dpz.DPDDPStrategy(privacy, process_group_backend="gloo")
    elif strategy == "fsdp":
        strat = dpz.DPFSDPStrategy(privacy, process_group_backend="gloo")
    else:
        strat = dpz.DPZeroStrategy(stage=3, privacy=privacy, process_group_backend="gloo")
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strat,
        max_steps=steps,
        callbacks=[*callbacks, *([] if checkpoints is None else [_checkpoint_every_step(checkpoints)])],
        logger=False,
        enable_checkpointing=checkpoints is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _checkpoint_every_step(directory: Path) -> L.Callback:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=directory, save_last=True, every_n_train_steps=1, save_top_k=0)


def main(strategy: str, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    if strategy == "zero3":  # tests only: skip DeepSpeed's ~35 s shared-memory comm-op build; gloo suffices
        import deepspeed.comm.torch  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    record = Record()
    trainer = _trainer(strategy, _zo_privacy(clip_norm=1.0, **settings(strategy)), 3, [record])
    task = Task()
    trainer.fit(task)
    dp = trainer.strategy.dp
    released = Released()
    noisy = _trainer(strategy, _zo_privacy(clip_norm=1.0, sigma=1.0, **settings(strategy)), 2, [released])
    noisy.fit(Task())
    pruned_record = Record()  # phase 4: 30% of the coordinates kept by SynFlow (selected before sharding)
    pruned = _trainer(
        strategy, _zo_privacy(clip_norm=1.0, prune_keep_fraction=0.3, **settings(strategy)), 3, [pruned_record]
    )
    pruned.fit(Task())
    pruning = {
        "before": pruned_record.before,
        "after": pruned_record.after,
        "batches": pruned_record.batches,
        "kept": {n: i.cpu() for n, i in pruned.strategy.dp.kept.items()},
    }
    resumed: dict = {}
    if strategy in ("fsdp", "zero3"):  # phase 3: 2 steps, a sharded checkpoint, then the third step resumed from it
        privacy = _zo_privacy(clip_norm=1.0, **settings(strategy))
        _trainer(strategy, privacy, 2, [], checkpoints=out / "ckpt").fit(Task())
        again = Record()
        resumer = _trainer(strategy, privacy, 3, [again])
        resumer.fit(Task(), ckpt_path=str(out / "ckpt" / "last.ckpt"))
        resumed = {"after": again.after, "steps": resumer.strategy.dp.ledger.accountant.steps}
    torch.save(
        {
            "resumed": resumed,
            "pruned": pruning,
            "before": record.before,
            "after": record.after,
            "batches": record.batches,
            "direction_seed": dp.directions.direction_seed,
            "key": dp.ledger.key.to_bytes(),  # seed 7's: phase 3's checkpoint must not hold it
            "steps": dp.ledger.accountant.steps,
            "world": dp.ledger.world_size,
            "wrapped": type(trainer.strategy.model).__name__,
            "optimizer": type(getattr(trainer.strategy.model, "optimizer", None)).__name__,
            "sharded": sorted(n for n, p in task.named_parameters() if hasattr(p, "full_tensor")),
            "local_numel": sum(getattr(p, "_local_tensor", p).numel() for p in task.parameters()),
            "ghats": released.ghats,
            "drew_noise": noisy.strategy.dp.ledger.noise._draws > 0,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    exit_worker()
