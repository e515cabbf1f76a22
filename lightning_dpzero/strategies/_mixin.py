"""The Lightning glue every DP strategy shares: data, the per-physical-batch loop, noise, checkpoints.

Each DP strategy is ``class DPxStrategy(DPStrategyMixin, LightningXStrategy)``: the mixin overrides only the hooks
where DP differs and delegates the maths to one ``PrivateMethod`` (``DPStep`` or ``ZOStep``); the strategy chooses
a ``Reducer`` (where the clipped sums are summed and which coordinates each rank owns); the Lightning parent keeps
doing device placement, wrapping and communication.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_dpzero._internals import lightning as lightning_internals
from lightning_dpzero._internals import torch as torch_internals
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.loss import training_step_loss
from lightning_dpzero.method import PrivateMethod, Reducer, make_method
from lightning_dpzero.precision import DPPrecision, dp_precision_for, refuse_loss_scaler
from lightning_dpzero.sampling.poisson import LogicalBatch
from lightning_dpzero.selfcheck import PerExampleCheckError
from lightning_dpzero.strategies.reducers import LocalReducer
from lightning_dpzero.strategies.steering import SteeringGuard

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

    # Type checkers see the mixin as the Lightning ``Strategy`` it is always combined with (``super()`` calls,
    # ``self.lightning_module``, ``self.root_device``...); at run time it has no base, so the concrete strategy's MRO
    # is unchanged.
    _StrategyBase = Strategy
else:
    _StrategyBase = object

__all__ = ["DPStrategyMixin"]

_CHECKPOINT_KEY = "lightning_dpzero"
# LightningModule -> the DP step that last trained it in this process: a new Trainer (a new ledger at epsilon 0) must
# not silently train a module whose weights already spent budget under another one.
_LEDGERS: weakref.WeakKeyDictionary[Any, PrivateMethod] = weakref.WeakKeyDictionary()


class DPStrategyMixin(_StrategyBase):
    """DP-SGD hooks for a Lightning strategy. Put it first in the bases: ``(DPStrategyMixin, DDPStrategy)``."""

    dp: PrivateMethod

    def _init_dp(self, privacy: PrivacyConfig | None) -> None:
        if privacy is not None and not isinstance(privacy, PrivacyConfig):
            raise TypeError(f"{type(self).__name__}: `privacy` must be a PrivacyConfig, got {type(privacy).__name__}.")
        self.dp = make_method(privacy or PrivacyConfig.default())
        self._reducer: Reducer | None = None
        self._dp_step_pending = False
        self._guarded_trainer: pl.Trainer | None = None  # whose training log SteeringGuard watches

    @property
    def reducer(self) -> Reducer:
        """This strategy's reduction of the clipped sums (built on first use, once the root device is known)."""
        if self._reducer is None:
            self._reducer = self._make_reducer()
        return self._reducer

    def _make_reducer(self) -> Reducer:
        """The reducer this strategy uses (one device: ``LocalReducer``)."""
        return LocalReducer(self.root_device, type(self).__name__)

    @property
    def privacy(self) -> PrivacyConfig:
        return self.dp.config

    # -------------------------------------------------------------------------------------------- precision
    # Lightning's connector hands the strategy the plugin it built from ``precision=...`` (or the user's plugin):
    # whatever it is, the strategy runs its DP counterpart, which never scales the loss. A plugin the *user* built
    # with a loss scaler is refused in ``_check_trainer``.
    @property
    def precision_plugin(self) -> Any:
        plugin = lightning_internals.stored_precision_plugin(self)
        return plugin if plugin is not None else self._dp_precision(DPPrecision())

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        lightning_internals.store_precision_plugin(self, None if plugin is None else self._dp_precision(plugin))

    def _dp_precision(self, plugin: Any) -> Any:
        """The plugin this strategy runs for ``plugin`` (``DPPrecision``; DeepSpeed's for ``dp_zero*``)."""
        return dp_precision_for(plugin, type(self).__name__)

    # ------------------------------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._check_trainer(trainer)
        super().setup(trainer)
        self.dp.attach(self._connected_module(), self.reducer)
        self._check_selection_agrees()  # dp_ddp: each rank pruned its own (synchronised) replica
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_optimizers()
            SteeringGuard.install(trainer, type(self).__name__)  # the schedulers' monitors are known from here
            self._guarded_trainer = trainer

    def _connected_module(self) -> pl.LightningModule:
        """The LightningModule the Trainer connected to this strategy (every hook below runs after it did)."""
        module = self.lightning_module
        if module is None:
            raise RuntimeError(
                f"{type(self).__name__}: no LightningModule is connected; the strategy runs inside Trainer.fit, "
                "validate, test or predict, which connect it."
            )
        return module

    def _share_seed_and_set_rank(self) -> None:
        """One secret key for the run, rank 0's, shared in memory over the process group (the ranks' Poisson sample
        sizes must agree); each rank derives its own streams from it."""
        key = [self.dp.ledger.key.to_bytes()]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(key, src=0)
        self.dp.ledger.set_rank(self.global_rank, self.world_size, key=key[0])  # type: ignore[attr-defined]

    def _check_trainer(self, trainer: pl.Trainer) -> None:
        name = type(self).__name__
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"{name}: Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) conflicts with DP "
                "logical batches: one training batch is already one logical step (Poisson sample), split into "
                "physical batches of PrivacyConfig.physical_batch_size. Remove accumulate_grad_batches and set "
                "PrivacyConfig(expected_batch_size=..., physical_batch_size=...)."
            )
        callbacks = getattr(trainer, "callbacks", ())  # set by Lightning's callback connector, not declared on Trainer
        tuners = [type(c).__name__ for c in callbacks if isinstance(c, (LearningRateFinder, BatchSizeFinder))]
        if tuners:
            raise ValueError(
                f"{name}: {tuners[0]} tunes the run from un-noised training losses (or batch sizes, which would change "
                "the sampling rate q): the weights trained with what it picks would carry no guarantee. Choose the "
                "learning rate and batch size on public data, or as a DP hyperparameter search whose every trial "
                "spends budget, and pass them to the run."
            )
        module = trainer.lightning_module
        if not module.automatic_optimization:
            raise ValueError(
                f"{name}: manual optimization is not supported under DP yet: the strategy must own the step "
                "(clip, noise, normalise, account). Use automatic optimization with one optimizer."
            )
        compiled = torch_internals.compiled_modules(module)
        if compiled:
            raise ValueError(
                f"{name}: torch.compile is not supported under DP ({compiled[0]!r} is compiled): the clipping "
                "engine's per-example taps are Python forward hooks and autograd Functions, which Dynamo graph-breaks "
                "around or bakes into a graph without them. Train without torch.compile (compiling the trained model "
                "for inference is fine)."
            )
        refuse_loss_scaler(lightning_internals.user_precision_plugin(trainer), name)  # a plugin the user built
        refuse_loss_scaler(self.precision_plugin, name)
        plugin = self.precision_plugin
        if isinstance(plugin, DPPrecision) and plugin.device is None:
            plugin.device = self.root_device.type

    def _check_optimizers(self) -> None:
        if len(self.optimizers) != 1:
            raise ValueError(
                f"{type(self).__name__}: configure_optimizers returned {len(self.optimizers)} optimizers; DP-SGD "
                "supports exactly one (one noise draw and one accounting event per logical step)."
            )

    def _planned_steps(self, trainer: pl.Trainer) -> Callable[[int], int | None]:
        def planned(steps_per_epoch: int) -> int | None:
            if trainer.max_steps is not None and trainer.max_steps > 0:
                return trainer.max_steps
            limit = trainer.limit_train_batches
            per_epoch = steps_per_epoch
            if isinstance(limit, int):
                per_epoch = min(per_epoch, limit)
            elif isinstance(limit, float) and limit < 1.0:
                per_epoch = max(1, int(per_epoch * limit))
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                return None
            return trainer.max_epochs * per_epoch

        return planned

    # ------------------------------------------------------------------------------------------- hooks
    @override
    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        trainer = self._connected_module().trainer
        if not trainer.training:
            return dataloader  # validation, test and prediction data are read as given
        self._route_batch_hooks()
        # bind_data refuses anything but a torch DataLoader (check_replaceable), with a message saying so
        loader = cast(DataLoader, dataloader)
        return self.dp.ledger.bind_data(
            loader,
            planned_steps=self._planned_steps(trainer),
            owner=type(self).__name__,
            method=self.dp.method_name,
            clipping=self.dp.clipping_description,
        )

    def _route_batch_hooks(self) -> None:
        """The batch hooks (``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``,
        of the LightningModule or, where it overrides them, the DataModule, as Lightning routes them) see each
        physical batch once, never the ``LogicalBatch`` that holds them: Lightning's loop hands the logical batch to
        ``on_before_batch_transfer``, which passes it through here; ``training_step`` then sends every physical
        batch through all three hooks."""
        module = self._connected_module()
        route = lightning_internals.batch_route(module)

        def skip_logical(batch: Any, dataloader_idx: int = 0) -> Any:
            return batch if isinstance(batch, LogicalBatch) else route(batch, dataloader_idx)

        # shadows Lightning's hook routing for this module instance (undone in teardown); no-op if shadowed already
        lightning_internals.set_batch_route(module, skip_logical)

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        if isinstance(batch, LogicalBatch):
            return batch  # moved one physical batch at a time in training_step
        return super().batch_to_device(batch, device, dataloader_idx)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else None
        if not isinstance(batch, LogicalBatch):
            # Trained on as it came, the batch would be neither clipped nor noised nor accounted.
            raise RuntimeError(
                f"{type(self).__name__}: the training batch is not a Poisson sample of the training dataset (it is "
                f"{_describe(batch)}): a DP run samples one training DataLoader. Several (a dict, list or "
                "CombinedLoader from train_dataloader) are not supported: concatenate their datasets into one "
                "(torch.utils.data.ConcatDataset); the privacy unit is then one example of the concatenation."
            )
        module = self._connected_module()
        trainer = module.trainer
        if self._dp_step_pending or trainer.accumulate_grad_batches != 1:
            # Accumulated, the previous logical batch is clipped but never released: its clipped sums would be added
            # to this one's and noised once, two Poisson samples accounted as one step.
            cause = (
                f"accumulate_grad_batches is {trainer.accumulate_grad_batches} (a GradientAccumulationScheduler "
                "callback sets it during training)"
                if trainer.accumulate_grad_batches != 1
                else "the previous batch's optimizer step did not run (an optimizer_step override that calls the "
                "closure without optimizer.step(closure=...), to skip or accumulate steps)"
            )
            raise RuntimeError(
                f"{type(self).__name__}: a logical batch began before the previous one was released (noised and "
                f"accounted by the optimizer step): {cause}. Under DP every training batch is one logical step and "
                "ends in one optimizer step: for larger batches set PrivacyConfig(expected_batch_size=..., "
                "physical_batch_size=...) instead."
            )
        ledger = self.dp.ledger
        if not ledger.may_step():
            rank_zero_warn(f"{type(self).__name__}: stopping: {ledger.stop_reason()}")
            trainer.should_stop = True
            return None  # Lightning skips the backward and the optimizer step
        self._check_ledger(module)
        ledger.use_sample(batch.sample_index, batch.sample_rate)
        if ledger.self_check.due(ledger.steps):
            with self._out_of_memory_hint(batch.masks[0].numel()):
                self._self_check(batch, args, kwargs)
        losses: list[Tensor] = []
        output: Any = None
        reducer = self.reducer
        for index, (physical, mask) in enumerate(batch):
            physical = self._physical_to_device(physical)

            def forward(physical: Any = physical) -> Any:
                return self._physical_training_step(physical, *args[1:], **kwargs)

            with self._out_of_memory_hint(mask.numel()), self._physical_batch_context():
                reducer.start(index)
                output, shown = self.dp.physical_batch(forward, mask, self.root_device)
                if reducer.streams:
                    reducer.flush()  # this physical batch's clipped sums are reduced
            losses.append(shown)
        self._dp_step_pending = True
        loss = torch.stack(losses).mean()
        if isinstance(output, Mapping):
            return {**{k: v for k, v in output.items() if k != "loss"}, "loss": loss}
        return loss

    @contextlib.contextmanager
    def _out_of_memory_hint(self, rows: int) -> Iterator[None]:
        """An out-of-memory error in a physical batch, re-raised with the setting that fixes it."""
        try:
            yield
        except RuntimeError as err:
            if not _is_out_of_memory(err):
                raise
            raise torch.OutOfMemoryError(
                f"{type(self).__name__}: out of memory in a physical batch of {rows} examples. Lower "
                "PrivacyConfig(physical_batch_size=...): it sets memory and speed only, not the privacy "
                f"guarantee (the logical batch stays B = qN = {self.dp.ledger.expected_batch_size:.0f}, split into "
                "more physical batches). Original error: " + str(err).split("\n")[0]
            ) from err

    def _physical_to_device(self, physical: Any) -> Any:
        """One physical batch through the batch hooks, as Lightning routes them, and to the device."""
        physical = lightning_internals.batch_route(self._connected_module())(physical, 0)
        return super().batch_to_device(physical)

    def _self_check(self, batch: LogicalBatch, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The per-example self-check (``lightning_dpzero.selfcheck``) on this step's first physical batch, the same
        on every rank; a failure on any rank refuses the run on all of them."""
        ledger = self.dp.ledger
        dataset, collate, indices = ledger.dataset, ledger.collate, batch.indices[0][: ledger.self_check.ROWS]
        assert dataset is not None and collate is not None
        items = [dataset[i] for i in indices]
        changed = len(indices) // 2  # the row the check replaces (SelfCheck.run's choice)
        other = _replacement(dataset, indices, collate, items[changed])

        def batches(row: int | None) -> Any:
            chosen = list(items)
            if row is not None:
                chosen[row] = other
            # as Lightning's loop treats the logical batch: precision's input conversion, then the transfer hooks
            return self._physical_to_device(self.precision_plugin.convert_input(collate(chosen)))

        failure = ledger.self_check.run(
            module=self._connected_module(),
            engine=self.dp.probe_engine,
            batches=batches,
            forward=lambda physical: self._physical_training_step(physical, *args[1:], **kwargs),
            context=self._probe_context,
            device=self.root_device,
            loss_of=training_step_loss,
            parameter_reference=self._whole_parameters,
            rows=len(indices),
            step=ledger.steps,
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            failures: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(failures, failure)
            failure = next((f for f in failures if f), None)
        if failure:
            raise PerExampleCheckError(f"{type(self).__name__}: the per-example self-check refused the run: {failure}")

    @property
    def _whole_parameters(self) -> bool:
        """Whether every trainable parameter is whole on this rank (the self-check compares autograd's gradients)."""
        return True

    def _probe_context(self) -> contextlib.AbstractContextManager[Any]:
        """Entered around each physical batch of the self-check (no gradient is produced or reduced)."""
        return self._physical_batch_context()

    def _check_ledger(self, module: Any) -> None:
        """Refuse to start a new ledger (epsilon 0) on a module another DP run of this process already trained."""
        previous = _LEDGERS.get(module)
        if previous is not None and previous is not self.dp and self.dp.ledger.steps == 0:
            steps = previous.ledger.steps
            raise RuntimeError(
                f"{type(self).__name__}: this {type(module).__name__} was already trained privately by another "
                f"Trainer ({steps} logical steps, epsilon={previous.epsilon():.4g}); a new Trainer starts a new ledger "
                "at epsilon 0, which would not count what its weights already spent. Continue the same run "
                "(trainer.fit again with the same Trainer, or Trainer(...).fit(model, ckpt_path=...) from its "
                "checkpoint), or, for a deliberately separate run whose guarantee you compose yourself, train a fresh "
                "instance (model = type(model)(...); model.load_state_dict(trained.state_dict()))."
            )
        _LEDGERS[module] = self.dp

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        if self._dp_step_pending:
            return closure_loss  # the per-example backward already ran, physical batch by physical batch
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def dp_closure() -> Any:
            out = closure()
            if self._dp_step_pending:
                self._dp_step_pending = False
                self._privatize(optimizer)
            return out

        return super().optimizer_step(optimizer, dp_closure, model, **kwargs)

    def _physical_training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The user's ``training_step`` on one physical batch (through the wrapper, as Lightning calls it)."""
        return super().training_step(*args, **kwargs)

    def _physical_batch_context(self) -> contextlib.AbstractContextManager[Any]:
        """Entered around each physical batch's forward and per-example backward (e.g. DDP's ``no_sync``)."""
        return contextlib.nullcontext()

    def _privatize(self, optimizer: Optimizer) -> None:
        """End the logical step: the method releases it through this strategy's reducer."""
        self.dp.finish_step(optimizer, self.reducer)

    def _check_selection_agrees(self) -> None:
        """What the method selected on each rank's own full copy (zeroth-order's pruned coordinates) must agree, or
        the ranks would perturb and update inconsistently."""
        digest = self.dp.selection_digest()
        if digest is None or not (dist.is_available() and dist.is_initialized()):
            return
        digests: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            raise RuntimeError(
                f"{type(self).__name__}: the ranks selected different coordinates to train (SynFlow scores differ, "
                "e.g. from non-deterministic kernels or different initial weights). Seed the model's initialisation "
                "identically on every rank (seed_everything) or set prune_keep_fraction=None."
            )

    # ------------------------------------------------------------------------------------- checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        self._add_dp_state(checkpoint)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _add_dp_state(self, checkpoint: dict[str, Any]) -> None:
        """Every rank's state: each rank has its own noise and sampling streams, and the checkpoint is written by
        one rank. Resuming a rank from another rank's streams would repeat noise across ranks."""
        state = self.dp.state_dict()
        world_size = getattr(self, "world_size", 1)
        states = [state] * world_size
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_gather_object(states, state)
        checkpoint[_CHECKPOINT_KEY] = {"ranks": states}

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        self._restore_dp_state(checkpoint, checkpoint_path)
        return checkpoint

    def _restore_dp_state(self, checkpoint: dict[str, Any], checkpoint_path: Any) -> None:
        trainer = self._connected_module().trainer
        if trainer.state.fn is TrainerFn.FITTING:
            if _CHECKPOINT_KEY not in checkpoint:
                raise ValueError(
                    f"{type(self).__name__}: the checkpoint {checkpoint_path!s} has no DP state (accountant history, "
                    "sampler and noise streams); resuming from it would restart epsilon at 0. Resume only from "
                    "checkpoints written by a DP strategy."
                )
            states = checkpoint[_CHECKPOINT_KEY]["ranks"]
            rank, world_size = getattr(self, "global_rank", 0), getattr(self, "world_size", 1)
            if len(states) != world_size:
                raise ValueError(
                    f"{type(self).__name__}: the checkpoint was written by {len(states)} rank(s), this run has "
                    f"{world_size}; each rank resumes its own noise and sampling streams. Resume with "
                    f"{len(states)} rank(s)."
                )
            self.dp.load_state_dict(states[rank])

    @override
    def teardown(self) -> None:
        self.dp.detach()
        if self._guarded_trainer is not None:
            SteeringGuard.remove(self._guarded_trainer)
            self._guarded_trainer = None
        module = self.lightning_module
        if module is not None:
            lightning_internals.unset_batch_route(module)  # Lightning's own routing again (validation, a later fit)
        super().teardown()


def _describe(batch: Any) -> str:
    """What a batch is, without its values (they are private)."""
    if isinstance(batch, Mapping):
        inner = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in batch.items())
        return f"a {type(batch).__name__} {{{inner}}}"
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of {', '.join(type(v).__name__ for v in batch)}"
    return f"a {type(batch).__name__}"


def _replacement(dataset: Any, used: list[int], collate: Callable[[list[Any]], Any], current: Any) -> Any:
    """The example the self-check swaps in: of a few examples outside the physical batch and the batch's own rows,
    the one whose data differ most from the replaced one (sum of absolute differences of every collated tensor; a
    different shape counts as most different). A duplicate would test nothing, and a near-duplicate can hide a
    dependence on the data (e.g. a loss normalised by the batch's token count, when both rows count the same)."""
    taken, size = set(used), len(dataset)
    outside = [i for i in range(min(size, len(used) + 8)) if i not in taken][:8]
    reference = list(_tensors(collate([current])))
    best, best_distance = current, 0.0  # every candidate holds the same data: nothing to swap (the check tests nothing)
    for index in [*outside, *used]:
        example = dataset[index]
        values = list(_tensors(collate([example])))
        if len(values) != len(reference) or any(a.shape != b.shape for a, b in zip(values, reference)):
            return example
        distance = sum(
            float((a.double() - b.double()).nan_to_num(0.0, 0.0, 0.0).abs().sum()) for a, b in zip(values, reference)
        )
        if distance > best_distance:
            best, best_distance = example, distance
    return best


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in a collated batch (tensors, mappings, sequences, dataclasses), in a fixed order."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield from _tensors(value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))


def _is_out_of_memory(err: RuntimeError) -> bool:
    """CUDA's ``OutOfMemoryError``, or the CPU allocator's failure (a plain RuntimeError)."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)
