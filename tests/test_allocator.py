"""retain_freed_memory: freed CPU tensor memory is reused by the next allocation, not faulted in again."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from lightning_dpzero import allocator, retain_freed_memory

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# Fills twenty 4 MB tensors, frees them, and does it again, as a training step does with its activations. Prints
# the pages still resident after the first free, and the page faults of the second round. With glibc's defaults the
# freed memory goes back to the operating system (the 4 MB blocks are separate mappings at first) and the second
# round faults it in again; retained, it stays and the second round reuses it.
_SCRIPT = """
import importlib.util, resource, sys, torch
spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])  # without the package's imports (Lightning)
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
if sys.argv[1] == "retain":
    assert allocator.retain_freed_memory()
def resident():
    return int(open("/proc/self/statm").read().split()[1])
start = resident()
blocks = [torch.empty(1 << 20).fill_(1.0) for _ in range(20)]
del blocks
kept = resident() - start
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks = [torch.empty(1 << 20).fill_(1.0) for _ in range(20)]
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 20 * (4 << 20) // 4096


def _pages(mode: str) -> tuple[int, int]:
    path = allocator.__file__
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode, path], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()[-2:]
    return int(kept), int(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_memory_stays_and_is_reused_without_page_faults():
    kept, faults = _pages("glibc")
    assert kept < PAGES // 4 and faults > PAGES * 3 // 4  # the defaults give it back: the test can tell
    kept, faults = _pages("retain")
    assert kept > PAGES * 3 // 4 and faults < PAGES // 2  # (glibc 2.36: ~1/5 of the pages, aligned requests)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_is_idempotent():
    assert retain_freed_memory() and retain_freed_memory()


@pytest.mark.skipif(GLIBC, reason="other C libraries")
def test_changes_nothing_without_glibc():
    assert retain_freed_memory() is False
