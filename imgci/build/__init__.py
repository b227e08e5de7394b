"""The build engine: Dockerfile frontend, build context, solver, steps, layers and image assembly."""

from __future__ import annotations
