"""Run by torchrun from tests/audit/test_audit_parallel.py: one-run audits on 2 CPU ranks (gloo).

    torchrun --standalone --nproc_per_node 2 tests/audit/parallel_worker.py STRATEGY OUT_DIR VARIANT:SEED ...

STRATEGY is ddp or zero3; each VARIANT:SEED is one audit (VARIANT ``ok`` or a name in tests/audit/broken.py), run in
turn in the same processes. Rank 0 writes OUT_DIR/audits.json: one summary per audit, plus what every rank saw.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning_dpzero as dpz  # noqa: E402
from lightning_dpzero.audit import AuditConfig, run_audit  # noqa: E402
from tests._torchrun import exit_worker  # noqa: E402
from tests.audit.broken import BROKEN  # noqa: E402
from tests.audit.task import TinyRegression  # noqa: E402

STEPS, SIGMA, CANARIES = 50, 1.15, 1000  # claim ~2.05 at delta = 1e-5 (the single-process tests' settings)


def audit(strategy: str, variant: str, seed: int) -> dict:
    privacy = dpz.PrivacyConfig(
        noise_multiplier=SIGMA, delta=1e-5, expected_batch_size=30, physical_batch_size=64, seed=seed
    )
    if strategy == "ddp":
        strat = dpz.DPDDPStrategy(privacy, process_group_backend="gloo")
    else:
        strat = dpz.DPZeroStrategy(stage=int(strategy[-1]), privacy=privacy, process_group_backend="gloo")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strat,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = TinyRegression()
    with BROKEN[variant]() if variant != "ok" else contextlib.nullcontext():
        result = run_audit(
            model, model.train_dataloader(), trainer=trainer, config=AuditConfig(num_canaries=CANARIES, seed=seed)
        )
    summary = result.summary()
    summary.update(variant=variant, seed=seed, rank=trainer.global_rank, world=trainer.world_size)
    print(result.summary_line(), flush=True)
    return summary


def main() -> None:
    strategy, out = sys.argv[1], Path(sys.argv[2])
    results = []
    for spec in sys.argv[3:]:
        variant, seed = spec.split(":")
        results.append(audit(strategy, variant, int(seed)))
    if results and results[0]["rank"] == 0:
        (out / "audits.json").write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
    exit_worker()
