"""The RUN sandbox: namespaces (``libc``, ``child``), id maps (``idmap``), probing (``probe``), snapshots
(``snapshots``) and the build process's side (``launcher``). Only ``libc`` uses cffi."""

from __future__ import annotations

import sys


def child_python() -> list[str]:
    """The command that starts a sandbox interpreter (the fork server, or a child without one) before ``MODULE``:
    with ``-S``, no site module — the child's PYTHONPATH has the build process's whole sys.path, this imgci's
    directory first, and processing .pth files (an editable install's import hook) was ~10 ms of every fork
    server start."""
    return [sys.executable, "-S", "-m"]
