"""What every torchrun test worker does when its work is done."""

from __future__ import annotations

import os
import sys


def exit_worker() -> None:
    """End the worker process now that its results are written, without the interpreter's shutdown.

    A rank that ran several Trainers (DeepSpeed ones in particular) sometimes aborts while C++ static destructors
    run ("terminate called without an active exception": a gloo thread still joinable), failing the test that
    launched it after the work succeeded; destroying the process group first did not prevent it. Every collective
    of the run is over once ``main`` returns (Lightning's teardown synchronises the ranks), so leaving at once is
    safe: flush what was printed and exit 0.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
