"""Every private attribute of Lightning, torch and DeepSpeed the package relies on, one adapter module per library.

Nothing else in the package touches another library's private names: a release that moves one breaks one
function here, and ``tests/test_internals.py`` probes each of them against the installed versions (``PROBES`` in
each module), so the break shows up as a named test failure rather than as a silent change of behaviour. The
versions CI has tested are the upper bounds in ``pyproject.toml``.
"""
