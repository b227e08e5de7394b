"""imgci: a daemon-less, unprivileged Dockerfile and OCI image builder for CI pipelines."""

from __future__ import annotations

__version__ = "0.1.0"
