"""What every torchrun test worker does when its work is done."""

from __future__ import annotations

import torch.distributed as dist


def close_process_group() -> None:
    """Destroy the default process group before interpreter shutdown. A gloo group left to the static destructors
    (several Trainers in one process, DeepSpeed ones in particular) sometimes aborts a rank with "terminate called
    without an active exception" after its results are written, failing the test that launched it."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
