"""Run by torchrun from the 2-process tests: a few DP steps on 2 CPU ranks; saves what each rank saw.

    torchrun --standalone --nproc_per_node 2 tests/strategies/parallel_worker.py STRATEGY MODE OUT_DIR

STRATEGY is ddp, zero1, zero2, zero3, fsdp or fsdp_own (zero3_buffered, fsdp_buffered: the clipped sums reduced once
per logical step); MODE is oracle (sigma = 0, gradients vs the reference),
bf16 (the same under DPPrecision("bf16-mixed")), noise (a zero-gradient model), resume (checkpoint secrets and
the ledger across a resume), or straight / crash / recover
(the fault test). Recorded per step: the
reduced gradient before the optimizer step (DDP: ``p.grad``, which is already (sum + noise) / B; ZeRO: DeepSpeed's
reduced gradient times W / B via ``safe_get_full_grad``, i.e. what the noise wrapper turns into the update at
sigma = 0), and the update itself, (before - after) / lr with SGD.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning_dpzero as dpz  # noqa: E402
from tests._torchrun import exit_worker  # noqa: E402
from tests.strategies.test_dp_strategy import Task, ZeroGrad  # noqa: E402


class ShardedTask(Task):
    """Shards itself in configure_model, as a user of ModelParallelStrategy would."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.net.children():
            fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


LR = 1.0  # (before - after) / LR recovers the update to ~1e-6 in fp32; the model stays well-conditioned


def _full_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = list(module.parameters())
    if params and hasattr(params[0], "full_tensor"):  # FSDP2 DTensor
        return {n: p.full_tensor().detach().clone().float() for n, p in module.named_parameters()}
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        return {n: p.detach().clone().float() for n, p in module.named_parameters()}


class Record(Callback):
    def __init__(self, net_attr: str) -> None:
        self.net_attr = net_attr
        self.batches, self.models, self.grads, self.updates = [], [], [], []
        self._before: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        net = getattr(pl_module, self.net_attr)
        dp = trainer.strategy.dp
        trained = [(n, p) for n, p in net.named_parameters() if p.requires_grad]  # frozen ones get no gradient
        if isinstance(trainer.strategy, dpz.DPFSDPStrategy):
            self.grads.append({n: p.grad.full_tensor().detach().clone() for n, p in trained})
        elif isinstance(trainer.strategy, dpz.DPZeroStrategy):
            from deepspeed.utils import safe_get_full_grad

            scale = dp.ledger.world_size / dp.ledger.expected_batch_size
            self.grads.append({n: safe_get_full_grad(p).detach().float() * scale for n, p in trained})
        else:
            self.grads.append({n: p.grad.detach().clone() for n, p in trained})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        net = getattr(pl_module, self.net_attr)
        self._before = _full_params(net)
        self.batches.append((batch.physical_batches, batch.masks))
        self.models.append({k: v.clone() for k, v in self._before.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = _full_params(getattr(pl_module, self.net_attr))
        self.updates.append({n: (self._before[n] - after[n]) / LR for n in after})


def _trainer(strategy: str, privacy: dpz.PrivacyConfig, steps: int, callbacks: list, plugins=None) -> L.Trainer:
    # "<name>_buffered": the clipped sums summed in a full-size buffer, reduce-scattered once per logical step;
    # "<name>_offload": DeepSpeed's optimizer offload to the CPU (its fp32 partitions and the step live there), or
    # FSDP2's CPUOffloadPolicy;
    # "<name>_offload_params": the parameters' partitions too (ZeRO-3)
    # "<name>_dsopt": the optimizer (SGD, the task's learning rate) in the DeepSpeed config instead of the task's
    strategy, config_optimizer = strategy.removesuffix("_dsopt"), strategy.endswith("_dsopt")
    strategy, offload_params = strategy.removesuffix("_params"), strategy.endswith("_offload_params")
    strategy, offload = strategy.removesuffix("_offload"), strategy.endswith("_offload")
    strategy, buffered = strategy.removesuffix("_buffered"), strategy.endswith("_buffered")
    if strategy == "ddp":
        strat = dpz.DPDDPStrategy(privacy, process_group_backend="gloo")
    elif strategy in ("fsdp", "fsdp_own"):
        strat = dpz.DPFSDPStrategy(
            privacy, stream_clipped_sums=not buffered, cpu_offload=offload, process_group_backend="gloo"
        )
    else:
        stream = False if buffered else None
        extra = {"offload_optimizer": True} if offload else {}
        extra.update({"offload_parameters": True} if offload_params else {})
        if config_optimizer:
            zero = {"stage": int(strategy[-1])}
            if offload:
                zero["offload_optimizer"] = {"device": "cpu"}
            optimizer = {"type": "SGD", "params": {"lr": LR}}
            extra = {
                "config": {"zero_optimization": zero, "optimizer": optimizer, "zero_allow_untested_optimizer": True}
            }
        strat = dpz.DPZeroStrategy(
            stage=int(strategy[-1]), privacy=privacy, stream_clipped_sums=stream, process_group_backend="gloo", **extra
        )
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strat,
        max_steps=steps,
        callbacks=callbacks,
        plugins=plugins,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
    )


class NoiseRecorder(Callback):
    """Records the first 64 values of every noise draw, by (logical step, draw number), on this rank."""

    def __init__(self) -> None:
        self.draws: dict[tuple[int, int], torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        noise = trainer.strategy.dp.ledger.noise
        sample = noise.sample

        def recorded(*args, **kwargs):
            values = sample(*args, **kwargs)
            self.draws[(noise._step, noise._draws - 1)] = values.flatten()[:64].clone()
            return values

        noise.sample = recorded


def resume(strategy: str, out: Path) -> None:
    """A default run (OS key, no seed) of 3 steps, checkpointed after every step (full and weights-only); then a new
    Trainer resumes from the checkpoint after step 1 and trains to step 6, as someone holding that file would.
    Recorded: each rank's key material (for the test to search every written file for), the noise both runs drew,
    and the ledger after the resume."""
    privacy = dpz.PrivacyConfig(noise_multiplier=1.0, expected_batch_size=8, physical_batch_size=4)
    full = ModelCheckpoint(dirpath=out / "full", every_n_train_steps=1, save_top_k=-1)
    # mode="max" only makes its Lightning state key differ from the other's (no metric is monitored)
    weights = ModelCheckpoint(
        dirpath=out / "weights", every_n_train_steps=1, save_top_k=-1, save_weights_only=True, mode="max"
    )
    original = NoiseRecorder()
    first = _trainer(strategy, privacy, 3, [original, full, weights])
    first.fit(Task(lr=LR))
    key = first.strategy.dp.ledger.key.to_bytes()
    rank = first.global_rank
    if rank == 0:
        after_step_1 = [p for p in (out / "full").iterdir() if "step=1" in p.name]
        assert len(after_step_1) == 1, sorted(p.name for p in (out / "full").iterdir())
        (out / "resume_from.txt").write_text(str(after_step_1[0]))
    first.strategy.barrier()
    resumed = NoiseRecorder()
    second = _trainer(strategy, privacy, 6, [resumed])
    second.fit(Task(lr=LR), ckpt_path=(out / "resume_from.txt").read_text())
    dp = second.strategy.dp
    torch.save(
        {
            "history": dp.ledger.accountant.history,
            "rank": dp.ledger.rank,
            "noise_rank": dp.ledger.noise.rank,
            "key": key,
            "resumed_key": dp.ledger.key.to_bytes(),
            "original_noise": original.draws,
            "resumed_noise": resumed.draws,
        },
        out.parent / f"{out.name}-resume{rank}.pt",  # outside the scanned directory: it holds the key on purpose
    )


class KillAtStep(Callback):
    """Simulates a crash: rank 1 is SIGKILLed as logical step ``step`` begins (after the previous checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def fault(strategy: str, mode: str, out: Path) -> None:
    """straight: 6 noisy steps; crash: the same run, checkpointing every step, killed in step 4; recover: resumes the
    crashed run from its last checkpoint to step 6. ZeroGrad with lr 1: the weights are minus the summed noise."""
    privacy = dpz.PrivacyConfig(noise_multiplier=1.0, expected_batch_size=16, physical_batch_size=8, seed=5)
    callbacks, ckpt_path = [], None
    if mode == "crash":
        callbacks = [ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=1, save_last=True), KillAtStep(3)]
    if mode == "recover":
        ckpt_path = out / "ckpts" / "last.ckpt"
        saved = torch.load(ckpt_path, weights_only=False)["lightning_dpzero"]["ranks"]
    trainer = _trainer(strategy, privacy, 6, callbacks)
    task = ZeroGrad(lr=1.0)
    trainer.fit(task, ckpt_path=ckpt_path)
    dp = trainer.strategy.dp
    record = {"weights": _full_params(task.lin), "history": dp.ledger.accountant.history, "steps": trainer.global_step}
    if mode == "recover":
        record["saved"] = saved[trainer.global_rank]
    torch.save(record, out / f"{mode}{trainer.global_rank}.pt")


_COMMS: list[tuple[str, int]] | None = None  # (collective, bytes) while a training step runs; None: not counting
_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
    "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "all_to_all_single",
    "all_gather_object", "broadcast_object_list", "send", "recv", "isend", "irecv",
)  # fmt: skip


def _count_collectives() -> None:
    """Wrap torch.distributed's collectives (before DeepSpeed caches references to them) to record their bytes."""
    import torch.distributed as dist

    def wrap(name: str, fn):
        def counted(*args, **kwargs):
            if _COMMS is not None:
                values = [*args, *kwargs.values()]
                tensors = [a for a in values if isinstance(a, torch.Tensor)]
                tensors += [t for a in values if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
                size = max((t.numel() * t.element_size() for t in tensors), default=0)
                _COMMS.append((name, size))
            return fn(*args, **kwargs)

        return counted

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


class CountSteps(Callback):
    """Records the collectives of each training step after the first two: DeepSpeed's ZeRO-3 warms up (traces its
    parameter order, broadcasts persistent state) over its first forwards, which dp_zero3's self-check runs in
    step 0 and non-private ZeRO-3 only reaches in step 1."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[str, int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        global _COMMS
        _COMMS = [] if trainer.global_step >= 2 else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        global _COMMS
        if _COMMS is not None:
            self.steps.append(_COMMS)
        _COMMS = None


def comms(out: Path) -> None:
    """Non-private ZeRO-3 (Lightning's DeepSpeedStrategy on CPU) and dp_zero3 on the same model and batch size, one
    forward and backward per step (the DP physical batch holds any Poisson sample of this small dataset)."""
    from lightning_dpzero.strategies.deepspeed import DeepSpeedCPUStrategy

    record = {}
    for kind in ("nonprivate", "dp"):
        L.seed_everything(0)
        counter = CountSteps()
        if kind == "dp":
            privacy = dpz.PrivacyConfig(noise_multiplier=1.0, expected_batch_size=8, physical_batch_size=40, seed=1)
            strategy = dpz.DPZeroStrategy(stage=3, privacy=privacy, process_group_backend="gloo")
        else:
            strategy = DeepSpeedCPUStrategy(stage=3, process_group_backend="gloo")
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy=strategy, max_steps=5, callbacks=[counter], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(Task(loss_kind="dict"))
        record[kind] = counter.steps
    torch.save(record, out / f"comms{trainer.global_rank}.pt")


def hf(strategy: str, model_name: str, out: Path) -> None:
    """A transformers model (tests/clipping/test_transformers.py), sigma = 0: 2 logical steps' gradients."""
    from tests.clipping.test_transformers import MODELS, HFTask

    checkpointed = model_name.endswith("_checkpointed")  # transformers' activation checkpointing on every block
    build, loss_fn, data = MODELS[model_name.removesuffix("_checkpointed")]
    torch.manual_seed(0)
    net, recomputed = build(), []
    if checkpointed:
        import transformers.modeling_utils as hf_utils

        original = hf_utils.checkpoint

        def counted(*args, **kwargs):
            recomputed.append(kwargs.get("use_reentrant"))
            return original(*args, **kwargs)

        hf_utils.checkpoint = counted
        (getattr(net, "activation_checkpointing_enable", None) or net.gradient_checkpointing_enable)()
    task = HFTask(net, loss_fn, data(40))
    record = Record("net")
    privacy = dpz.PrivacyConfig(
        noise_multiplier=0.0, clip_norm=0.3, clipping_function="abadi", expected_batch_size=8, physical_batch_size=3,
        seed=11,
    )  # fmt: skip
    trainer = _trainer(strategy, privacy, 2, [record])
    trainer.fit(task)
    torch.save(
        {
            "grads": record.grads,
            "batches": record.batches,
            "models": record.models,
            "world": trainer.world_size,
            "checkpointed": recomputed,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


def main(strategy: str, mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    # "<name>_few": PrivacyConfig(physical_batch_shapes="few"): last physical batches of 1, 2 or 3 rows (p = 3)
    strategy, shapes = strategy.removesuffix("_few"), "few" if strategy.endswith("_few") else "fixed"
    if mode == "comms":
        _count_collectives()
    L.seed_everything(0)  # the same initial model on every run (DDP and ZeRO broadcast rank 0's anyway)
    if strategy.startswith("zero"):  # tests only: skip DeepSpeed's ~35 s shared-memory comm-op build; gloo suffices
        import deepspeed.comm.torch  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if mode == "comms":
        return comms(out)
    if mode == "resume":
        return resume(strategy, out)
    if mode.startswith("hf-"):
        return hf(strategy, mode.removeprefix("hf-"), out)
    if mode in ("straight", "crash", "recover"):
        return fault(strategy, mode, out)
    plugins = None
    if mode in ("oracle", "bf16"):
        privacy = dpz.PrivacyConfig(
            noise_multiplier=0.0,
            clip_norm=0.3,
            expected_batch_size=4,
            physical_batch_size=3,
            seed=11,
            physical_batch_shapes=shapes,
        )
        task, record, steps = (ShardedTask if strategy == "fsdp_own" else Task)(lr=LR), Record("net"), 8
        if mode == "bf16":
            plugins, steps = [dpz.DPPrecision("bf16-mixed")], 4
    else:
        privacy = dpz.PrivacyConfig(noise_multiplier=2.0, clip_norm=0.5, expected_batch_size=16, seed=3)
        task, record, steps = ZeroGrad(lr=LR), Record("lin"), 3
    trainer = _trainer(strategy, privacy, steps, [record], plugins)
    trainer.fit(task)
    dp = trainer.strategy.dp
    styles = {}  # oracle only: 3 more steps under each of the other clipping styles (same processes)
    for style, groups in (("layer-wise", None), ("group-wise", 2)) if mode == "oracle" else ():
        styled = Record("net")
        config = privacy.replace(clipping_style=style, clipping_groups=groups)
        _trainer(strategy, config, 3, [styled]).fit((ShardedTask if strategy == "fsdp_own" else Task)(lr=LR))
        styles[style] = {"grads": styled.grads, "batches": styled.batches, "models": styled.models}
    torch.save(
        {
            "styles": styles,
            "grads": record.grads,
            "updates": record.updates,
            "batches": record.batches,
            "models": record.models,
            "epsilon": dp.epsilon(),
            "steps": dp.ledger.accountant.steps,
            "world": dp.ledger.world_size,
            "precision": str(trainer.strategy.precision_plugin.precision),
            "compute_dtype": str(getattr(task, "compute_dtype", None)),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
    exit_worker()
