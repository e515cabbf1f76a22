"""Every private attribute of Lightning, torch and DeepSpeed the package uses, probed against the installed versions.

Reference: ``lightning_dpzero._internals`` (one adapter module per library; nothing else in the package touches
another library's private names). A release that moves one of them fails its probe here, by name.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from lightning_dpzero._internals import deepspeed as ds_internals
from lightning_dpzero._internals import lightning as lightning_internals
from lightning_dpzero._internals import torch as torch_internals

PROBES = {
    f"{module.__name__.rsplit('.', 1)[-1]}: {name}": probe
    for module in (lightning_internals, torch_internals, ds_internals)
    for name, probe in module.PROBES.items()
}
PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lightning_dpzero"
# Private names of other libraries: attributes reached on their objects, or imported from private modules.
FOREIGN_PRIVATE = {
    "_on_before_batch_transfer",
    "_accelerator_connector",
    "_devices_flag",
    "_precision_plugin_flag",
    "_data_parallel_size",
    "_local_tensor",
    "_compiled_call_impl",
    "_compiler_ctx",
    "_reversed_padding_repeated_twice",
    "micro_step_id",
    "reduce_ready_partitions_and_remove_grads",
    "partition_all_parameters",
    "parameter_offload",
    "ds_tensor",
    "ds_numel",
    "ds_process_group",
    "ds_id",
    "linear_bk",
    "_forward_redirection",
    "_precision_plugin",
}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_private_internal_is_where_the_adapter_expects_it(name: str) -> None:
    PROBES[name]()


def test_no_module_outside_the_adapters_touches_a_foreign_private_name() -> None:
    """Reference: an AST walk of the package: attribute accesses and string attribute names (getattr/hasattr) of the
    names above, and imports from other libraries' private modules, appear only in ``_internals``."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "_internals" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and node.attr in FOREIGN_PRIVATE:
                name = node.attr
            elif isinstance(node, ast.Constant) and node.value in FOREIGN_PRIVATE:
                name = node.value
            elif (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0]
                in (
                    "lightning",
                    "torch",
                    "deepspeed",
                )
            ):
                private = [part for part in node.module.split(".") if part.startswith("_")]
                private += [alias.name for alias in node.names if alias.name.startswith("_")]
                name = ",".join(private) or None
            if name:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {name}")
    assert not found, "private names of other libraries outside lightning_dpzero/_internals:\n" + "\n".join(found)
