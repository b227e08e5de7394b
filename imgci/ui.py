"""Rendering helpers for the CLI: human sizes and times, tables, and the progress printers.

Contract: only the CLI (cli.py) calls these. Three progress modes, as the rest of imgci will use them:
``tty`` (a live, redrawn view), ``plain`` (one line per event — CI logs), ``json`` (one JSON object per line).
``auto`` is ``tty`` when stderr is a terminal and ``CI`` is unset, else ``plain``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO


def human_size(n: float) -> str:
    """img's style: ``591B``, ``1.534KiB``, ``365.9KiB``, ``1.08GiB`` (4 significant digits)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    if i == 0:
        return f"{int(n)}B"
    return f"{n:.4g}{units[i]}"


def human_ago(ts: float, now: float | None = None) -> str:
    delta = max(0.0, (now if now is not None else time.time()) - ts)
    for unit, secs in (("year", 31536000), ("month", 2592000), ("week", 604800), ("day", 86400), ("hour", 3600)):
        if delta >= secs:
            k = int(delta // secs)
            return f"{k} {unit}{'s' if k != 1 else ''} ago"
    if delta >= 60:
        k = int(delta // 60)
        return f"{k} minute{'s' if k != 1 else ''} ago"
    k = int(delta)
    return "Less than a second ago" if k < 1 else f"{k} second{'s' if k != 1 else ''} ago"


def human_created(created: str, now: float | None = None) -> str:
    """An RFC 3339 ``created`` timestamp as ``N units ago`` (or ``N/A``)."""
    if not created:
        return "N/A"
    from datetime import datetime

    text = created.replace("Z", "+00:00")
    if "." in text:  # Go writes nanoseconds; Python parses at most microseconds
        head, _, tail = text.partition(".")
        digits = tail[: len(tail) - len(tail.lstrip("0123456789"))]
        text = head + "." + digits[:6] + tail[len(digits) :]
    try:
        ts = datetime.fromisoformat(text).timestamp()
    except ValueError:
        return created
    return human_ago(ts, now)


def table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Left-aligned columns separated by at least two spaces (the last column is not padded)."""
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)]
        out.write("  ".join(cells).rstrip() + "\n")


def _event_dict(event: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(event) and not isinstance(event, type):
        d = dataclasses.asdict(event)
    elif isinstance(event, dict):
        d = dict(event)
    else:
        d = dict(vars(event))
    d.setdefault("event", type(event).__name__)
    return {
        k: (str(v) if not isinstance(v, (int, float, str, bool, type(None), list, dict)) else v) for k, v in d.items()
    }


class Progress:
    """Receives library events and renders them in the chosen mode. Thread-safe; call ``close`` at the end."""

    def __init__(self, mode: str = "auto", out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        if mode == "auto":
            mode = "tty" if self.out.isatty() and not os.environ.get("CI") else "plain"
        if mode not in ("tty", "plain", "json", "quiet"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self._lock = threading.Lock()
        self._live: dict[str, str] = {}
        self._drawn = 0
        self._last_draw = 0.0

    def __call__(self, event: Any) -> None:
        if self.mode == "quiet":
            return
        d = _event_dict(event)
        with self._lock:
            if self.mode == "json":
                d["time"] = round(time.time(), 3)
                self.out.write(json.dumps(d, sort_keys=True) + "\n")
                self.out.flush()
                return
            line = str(d.get("message") or self._describe(d))
            key = str(d.get("key") or "")
            done = bool(d.get("done", True))
            if self.mode == "plain":
                if done or not key:
                    self.out.write(line + "\n")
                    self.out.flush()
                return
            # tty: in-progress items live at the bottom, redrawn in place; finished ones scroll above.
            if key and not done:
                self._live[key] = line
            else:
                self._live.pop(key, None)
                self._clear()
                self.out.write(line + "\n")
            now = time.monotonic()
            if done or now - self._last_draw > 0.1:
                self._redraw()
                self._last_draw = now

    @staticmethod
    def _describe(d: dict[str, Any]) -> str:
        parts = [str(d.get("event", "event"))]
        parts += [f"{k}={v}" for k, v in d.items() if k not in ("event", "key", "done")]
        return " ".join(parts)

    def _clear(self) -> None:
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _redraw(self) -> None:
        self._clear()
        width = 120
        try:
            width = os.get_terminal_size(self.out.fileno()).columns
        except (OSError, ValueError, AttributeError):
            pass
        for line in self._live.values():
            self.out.write(line[: max(10, width - 1)] + "\n")
        self._drawn = len(self._live)
        self.out.flush()

    def close(self) -> None:
        with self._lock:
            if self.mode == "tty":
                self._clear()
                self._live.clear()
                self.out.flush()
