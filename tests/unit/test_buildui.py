"""Build progress rendering: BuildKit-style plain lines, a redrawn tree on a TTY, JSON events."""

from __future__ import annotations

import io
import json

from imgci.build.solver import VertexEvent
from imgci.buildui import BuildProgress


def _events(p: BuildProgress) -> None:
    p.event(VertexEvent("queued", "k1", "[base 1/2] FROM x", 1.0))
    p.event(VertexEvent("started", "k1", "[base 1/2] FROM x", 1.0))
    p.event(VertexEvent("done", "k1", "[base 1/2] FROM x", 1.1, duration=0.1, cached=True))
    p.event(VertexEvent("started", "k2", "[base 2/2] COPY a /a", 1.2))
    p.log("k2", "[base 2/2] COPY a /a", "copying")
    p.event(VertexEvent("failed", "k2", "[base 2/2] COPY a /a", 1.3, duration=0.1, error="boom"))


def test_plain_numbers_steps_in_start_order() -> None:
    out = io.StringIO()
    p = BuildProgress("plain", out)
    _events(p)
    p.close(False)
    lines = out.getvalue().splitlines()
    assert lines[0] == "#1 [base 1/2] FROM x"
    assert lines[1] == "#1 CACHED"
    assert lines[2] == "#2 [base 2/2] COPY a /a"
    assert lines[3].startswith("#2 ") and lines[3].endswith(" copying")
    assert lines[4] == "#2 ERROR: boom"


def test_tty_draws_a_tree_and_a_final_status() -> None:
    out = io.StringIO()
    p = BuildProgress("tty", out)
    _events(p)
    p.close(False)
    text = out.getvalue()
    assert "[+] Building" in text and "(1/2) ERROR" in text
    assert " => CACHED [base 1/2] FROM x" in text
    assert " => ERROR [base 2/2] COPY a /a" in text
    assert " => => copying" in text


def test_json_events() -> None:
    out = io.StringIO()
    p = BuildProgress("json", out)
    _events(p)
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [d["event"] for d in docs] == ["started", "done", "started", "log", "failed"]
    assert docs[1]["cached"] is True and docs[4]["error"] == "boom"
