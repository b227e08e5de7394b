"""Build progress rendering (CLI only), in BuildKit's shapes.

- ``tty``: a live tree redrawn in place — a header ``[+] Building 3.2s (5/7)`` and one line per step
  ``=> [stage 2/4] COPY . /src   0.4s``, ``CACHED`` steps marked, the last log lines of a running step under it.
- ``plain``: one line per event, as ``docker build --progress=plain`` prints (``#3 [base 2/4] COPY . /src``,
  ``#3 DONE 0.4s``, ``#3 CACHED``, ``#3 ERROR: …``), with log lines as ``#3 0.512 text``.
- ``json``: one JSON object per event/log line.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from imgci.build.solver import VertexEvent

_MAX_LOG_LINES = 6


@dataclass
class _Row:
    number: int
    name: str
    started: float = 0.0
    finished: float = 0.0
    state: str = "queued"  # queued | running | done | cached | failed | cancelled
    logs: list[str] = field(default_factory=list)


class BuildProgress:
    """Receives solver events and step log lines from any thread; ``close`` prints the final view."""

    def __init__(self, mode: str = "auto", out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        if mode == "auto":
            mode = "tty" if self.out.isatty() and not os.environ.get("CI") else "plain"
        self.mode = mode
        self._rows: dict[str, _Row] = {}
        self._order: list[str] = []
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._drawn = 0
        self._last_draw = 0.0
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        if self.mode == "tty":
            self._ticker = threading.Thread(target=self._tick, daemon=True, name="imgci-progress")
            self._ticker.start()

    # -- inputs ---------------------------------------------------------------------------------------------
    def note(self, message: str) -> None:
        """A free-standing line (e.g. ``resolving base image …``)."""
        with self._lock:
            if self.mode == "json":
                self._json({"event": "note", "message": message})
            elif self.mode != "quiet":
                self._clear()
                self.out.write(message + "\n")
                self._redraw(force=True)

    def event(self, e: VertexEvent) -> None:
        with self._lock:
            row = self._rows.get(e.key)
            if row is None:
                if e.kind == "queued":
                    return  # numbered when it starts, so numbers follow execution order as in BuildKit's output
                row = _Row(len(self._rows) + 1, e.name)
                self._rows[e.key] = row
                self._order.append(e.key)
            now = time.monotonic()
            if e.kind == "started":
                row.state, row.started = "running", now
            elif e.kind == "done":
                row.state, row.finished = ("cached" if e.cached else "done"), now
            elif e.kind in ("failed", "cancelled"):
                row.state, row.finished = e.kind, now
            if self.mode == "json":
                self._json(
                    {
                        "event": e.kind,
                        "step": row.number,
                        "name": e.name,
                        "duration": round(e.duration, 3),
                        "cached": e.cached,
                        "error": e.error,
                    }
                )
            elif self.mode == "plain":
                self._plain(row, e)
            elif self.mode == "tty":
                self._redraw(force=e.kind != "queued")

    def log(self, key: str, name: str, line: str) -> None:
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                return
            if self.mode == "json":
                self._json({"event": "log", "step": row.number, "name": name, "line": line})
            elif self.mode == "plain":
                self.out.write(f"#{row.number} {time.monotonic() - (row.started or self._start):.3f} {line}\n")
                self.out.flush()
            elif self.mode == "tty":
                row.logs = [*row.logs, line][-_MAX_LOG_LINES:]
                self._redraw()

    def close(self, ok: bool = True) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=1)
        with self._lock:
            if self.mode == "tty":
                self._redraw(force=True, final=True)
            elif self.mode == "plain":
                self.out.flush()

    # -- renderers ------------------------------------------------------------------------------------------
    def _json(self, doc: dict[str, object]) -> None:
        doc["time"] = round(time.time(), 3)
        self.out.write(json.dumps(doc, sort_keys=True) + "\n")
        self.out.flush()

    def _plain(self, row: _Row, e: VertexEvent) -> None:
        n = row.number
        if e.kind == "started":
            self.out.write(f"#{n} {row.name}\n")
        elif e.kind == "done":
            self.out.write(f"#{n} CACHED\n" if e.cached else f"#{n} DONE {e.duration:.1f}s\n")
        elif e.kind == "failed":
            self.out.write(f"#{n} ERROR: {e.error}\n")
        elif e.kind == "cancelled":
            self.out.write(f"#{n} CANCELED\n")
        self.out.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                self._redraw(force=True)

    def _clear(self) -> None:
        if self.mode == "tty" and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _redraw(self, *, force: bool = False, final: bool = False) -> None:
        if self.mode != "tty":
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        try:
            width = os.get_terminal_size(self.out.fileno()).columns
        except (OSError, ValueError, AttributeError):
            width = 100
        rows = [self._rows[k] for k in self._order]
        finished = sum(1 for r in rows if r.state in ("done", "cached"))
        failed = any(r.state == "failed" for r in rows)
        status = " FINISHED" if final and not failed else (" ERROR" if final and failed else "")
        lines = [f"[+] Building {now - self._start:.1f}s ({finished}/{len(rows)}){status}"]
        for r in rows:
            if r.state == "queued" and not final:
                continue
            prefix = " => CACHED " if r.state == "cached" else (" => ERROR " if r.state == "failed" else " => ")
            end = r.finished if r.finished else now
            took = f"{end - r.started:.1f}s" if r.started else ""
            text = (prefix + r.name)[: max(10, width - 9)]
            lines.append(text.ljust(max(10, width - 8)) + took.rjust(7))
            if r.state == "running" or r.state == "failed":
                lines += [(" => => " + log)[: width - 1] for log in r.logs]
        self._clear()
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self._drawn = 0 if final else len(lines)
