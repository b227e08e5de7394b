"""Stopping a helper process the tests or benchmarks started (a registry, a dockerd)."""

from __future__ import annotations

import subprocess


def terminate(proc: subprocess.Popen[bytes], grace: float, after_kill: float | None = None) -> None:
    """SIGTERM ``proc`` and wait up to ``grace`` seconds for it; then SIGKILL it and wait (at most ``after_kill``
    seconds when given). Nothing when it already exited."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=after_kill)
