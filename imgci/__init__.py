"""imgci: a daemon-less, unprivileged Dockerfile and OCI image builder for CI pipelines."""

from __future__ import annotations

__version__ = "0.1.0"


def child_pythonpath() -> str:
    """A PYTHONPATH with which a child ``python -m imgci…`` imports this very imgci, however this process found it
    (an editable install's import hook, a checkout on sys.path): the directory holding the package first, then this
    process's sys.path."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    return os.pathsep.join([root, *(p for p in sys.path if p and p != root)])
