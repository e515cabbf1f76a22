"""Lightning internals: the batch-hook routing, the accelerator connector's flags, DDP's state sync, the training
loop's logged results and the strategy registry's type (Lightning 2.5-2.6)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.fabric.plugins.precision.utils import _convert_fp_tensor, _DtypeContextManager
from lightning.fabric.strategies.registry import _StrategyRegistry as StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.overrides.distributed import _sync_module_states

__all__ = [
    "PROBES",
    "DtypeContext",
    "call_through_wrapper",
    "convert_fp_tensor",
    "store_precision_plugin",
    "stored_precision_plugin",
    "StrategyRegistry",
    "batch_route",
    "data_parallel_over_all_ranks",
    "optimizers_to_device",
    "requested_devices",
    "set_batch_route",
    "set_training_log",
    "sync_module_states",
    "training_log",
    "unset_batch_route",
    "unset_training_log",
    "user_precision_plugin",
]

DtypeContext = _DtypeContextManager  # sets torch's default dtype inside a with block
# LightningModule: calls the module's or the DataModule's hook, as Lightning routes them
_ROUTE = "_on_before_batch_transfer"


def convert_fp_tensor(tensor: Any, dst_type: Any) -> Any:
    """A floating-point tensor cast to ``dst_type`` (others unchanged), as Lightning's precision plugins do."""
    return _convert_fp_tensor(tensor, dst_type)


def call_through_wrapper(strategy: Any, wrapper: Any, module: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """``module.<method>(*args)`` called through ``wrapper.__call__`` (its hooks run), as Lightning's strategies
    call ``training_step`` (``Strategy._forward_redirection``)."""
    return strategy._forward_redirection(wrapper, module, method, *args, **kwargs)


def stored_precision_plugin(strategy: Any) -> Any:
    """The precision plugin a strategy holds (``None`` before the Trainer sets one)."""
    return getattr(strategy, "_precision_plugin", None)


def store_precision_plugin(strategy: Any, plugin: Any) -> None:
    strategy._precision_plugin = plugin


def sync_module_states(module: Any) -> None:
    """Every rank takes rank 0's parameters and buffers (what DDP does when it wraps a module)."""
    _sync_module_states(module)


def optimizers_to_device(optimizers: Any, device: Any) -> None:
    """Move the optimizers' states to ``device`` (as ``ModelParallelStrategy.setup`` does)."""
    _optimizers_to_device(optimizers, device)


def batch_route(module: Any) -> Callable[[Any, int], Any]:
    """The LightningModule's routing of ``on_before_batch_transfer`` (its own hook, or its DataModule's)."""
    return getattr(module, _ROUTE)


def set_batch_route(module: Any, route: Callable[..., Any]) -> bool:
    """Shadow the routing for this module instance; False if it is shadowed already."""
    if _ROUTE in vars(module):
        return False
    setattr(module, _ROUTE, route)
    return True


def unset_batch_route(module: Any) -> None:
    if _ROUTE in vars(module):
        delattr(module, _ROUTE)


def _training_results(trainer: Any) -> Any:
    """The collection ``LightningModule.log`` writes to while training (``training_step`` and every training hook;
    validation has a collection of its own)."""
    return trainer.fit_loop.epoch_loop._results


def training_log(trainer: Any) -> Callable[..., Any]:
    """What ``LightningModule.log`` calls while training: ``log(fx, name, value, **options)``, ``fx`` the hook."""
    return _training_results(trainer).log


def set_training_log(trainer: Any, log: Callable[..., Any]) -> None:
    """Shadow ``training_log`` for this Trainer (``unset_training_log`` restores Lightning's)."""
    _training_results(trainer).log = log


def unset_training_log(trainer: Any) -> None:
    results = _training_results(trainer)
    if "log" in vars(results):
        del results.log


def data_parallel_over_all_ranks(strategy: Any) -> None:
    """``ModelParallelStrategy(data_parallel_size="auto")``: all ranks (Lightning resolves it only with a tensor-
    parallel size of "auto" too)."""
    if strategy._data_parallel_size == "auto":
        strategy._data_parallel_size = strategy.world_size


def requested_devices(trainer: Any) -> Any:
    """``Trainer(devices=...)`` as the user gave it (the strategy sees only the devices it was handed)."""
    return getattr(getattr(trainer, "_accelerator_connector", None), "_devices_flag", 1)


def user_precision_plugin(trainer: Any) -> Any:
    """The precision plugin (or flag) the user passed to the Trainer."""
    return getattr(getattr(trainer, "_accelerator_connector", None), "_precision_plugin_flag", None)


def _probe_connector() -> None:
    import lightning.pytorch as pl

    trainer = pl.Trainer(devices=1, accelerator="cpu", logger=False, enable_checkpointing=False)
    assert requested_devices(trainer) == 1
    assert hasattr(trainer._accelerator_connector, "_precision_plugin_flag")


def _probe_batch_route() -> None:
    import lightning.pytorch as pl

    module = pl.LightningModule()
    route = batch_route(module)
    assert callable(route)
    assert set_batch_route(module, route) and not set_batch_route(module, route)
    unset_batch_route(module)
    assert _ROUTE not in vars(module)


def _probe_training_log() -> None:
    import inspect

    import lightning.pytorch as pl

    trainer = pl.Trainer(devices=1, accelerator="cpu", logger=False, enable_checkpointing=False)
    parameters = list(inspect.signature(training_log(trainer)).parameters)
    assert parameters[:3] == ["fx", "name", "value"] and {"on_step", "on_epoch"} <= set(parameters), parameters
    set_training_log(trainer, print)
    assert training_log(trainer) is print
    unset_training_log(trainer)
    assert training_log(trainer) != print


def _probe_strategy() -> None:
    import torch
    from lightning.pytorch.strategies import DeepSpeedStrategy, SingleDeviceStrategy

    strategy = SingleDeviceStrategy(device=torch.device("cpu"))
    assert "_precision_plugin" in vars(strategy) and callable(strategy._forward_redirection)
    for name in ("_setup_model_and_optimizer", "_initialize_deepspeed_inference", "_init_deepspeed_distributed"):
        assert callable(getattr(DeepSpeedStrategy, name)), name  # overridden by DeepSpeedCPUStrategy
    assert convert_fp_tensor(torch.ones(1), torch.float16).dtype == torch.float16
    with DtypeContext(torch.float64):
        assert torch.get_default_dtype() == torch.float64


def _probe_model_parallel() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(tensor_parallel_size=1)
    assert strategy._data_parallel_size == "auto"


PROBES: dict[str, Callable[[], None]] = {
    "Strategy._precision_plugin, _forward_redirection; DeepSpeedStrategy's set-up methods; precision utils": (
        _probe_strategy
    ),
    "ModelParallelStrategy._data_parallel_size": _probe_model_parallel,
    "Trainer._accelerator_connector._devices_flag / _precision_plugin_flag": _probe_connector,
    "LightningModule._on_before_batch_transfer": _probe_batch_route,
    "Trainer.fit_loop.epoch_loop._results.log": _probe_training_log,
    "lightning.pytorch.overrides.distributed._sync_module_states": lambda: None,  # imported above
    "lightning.fabric.utilities.optimizer._optimizers_to_device": lambda: None,
}
