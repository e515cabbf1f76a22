"""``SweepSummary``: a Hydra callback that gathers every run's ``summary.json`` of a ``--multirun`` into one table."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

__all__ = ["SweepSummary", "collect_summaries"]

log = logging.getLogger(__name__)

# Columns first in the CSV, in this order; override keys and any other summary fields follow.
_LEADING = ("job", "metric", "value", "steps", "private", "epsilon", "delta", "noise_multiplier", "target_epsilon")


def collect_summaries(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``summary.json`` under ``sweep_dir``, ordered by Hydra job number.

    Args:
        sweep_dir: the sweep's output directory (``hydra.sweep.dir``).

    Returns:
        One dict per run: the run's summary (``job``, ``overrides``, ``metric``, ``value``, ``epsilon``...) plus
        ``run_dir``, the run's directory relative to ``sweep_dir``.
    """
    root = Path(sweep_dir)
    rows = []
    for path in sorted(root.glob("**/summary.json")):
        row = json.loads(path.read_text())
        row["run_dir"] = str(path.parent.relative_to(root))
        rows.append(row)
    rows.sort(key=lambda r: (r.get("job") is None, r.get("job") or 0, r["run_dir"]))
    return rows


class SweepSummary(Callback):
    """Writes ``multirun_summary.json`` and ``multirun_summary.csv`` in the sweep directory when a multirun ends.

    Each row is one run: its Hydra job number, its overrides (one CSV column per overridden key, e.g.
    ``privacy.target_epsilon``), the final metric, epsilon, delta and sigma. Runs are read back from their
    ``summary.json`` files, so this works with any Hydra launcher (also ones that run jobs in other processes).

    Args:
        filename: the stem of the two files written.
    """

    def __init__(self, filename: str = "multirun_summary") -> None:
        self.filename = filename

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # Also after each job (in the job's process): a failed job makes Hydra skip on_multirun_end.
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            self.write(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.write(Path(str(config.hydra.sweep.dir)), final=True)

    def write(self, sweep_dir: Path, final: bool = False) -> None:
        """Write the two files from the ``summary.json`` files under ``sweep_dir`` (nothing if there are none)."""
        if getattr(rank_zero_only, "rank", 0) != 0:
            return  # the other ranks of a torchrun-launched sweep: rank 0 writes
        rows = collect_summaries(sweep_dir)
        if not rows:
            if final:
                log.warning(f"SweepSummary: no summary.json under {sweep_dir}; did every run fail?")
            return
        (sweep_dir / f"{self.filename}.json").write_text(json.dumps(rows, indent=2))
        fields = {k for r in rows for k in r}
        # an override of a summary field (strategy=dp_zero3, precision=bf16-mixed) is in the summary's own column
        override_keys = sorted({k for r in rows for k in _parse_overrides(r.get("overrides", []))} - fields)
        other = sorted(fields - set(_LEADING) - {"overrides", "run_dir"})
        columns = ["job", *override_keys, *[c for c in _LEADING if c != "job"], *other, "run_dir"]
        with open(sweep_dir / f"{self.filename}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({**_parse_overrides(row.get("overrides", [])), **row})
        if final:
            log.info(f"SweepSummary: {len(rows)} runs -> {sweep_dir / self.filename}.{{json,csv}}")


def _parse_overrides(overrides: list[str]) -> dict[str, str]:
    """``["privacy.target_epsilon=3", "+x=1"]`` -> ``{"privacy.target_epsilon": "3", "x": "1"}``."""
    parsed = {}
    for item in overrides:
        key, _, value = item.partition("=")
        parsed[key.lstrip("+~")] = value
    return parsed
