"""CLI rendering: img-style sizes and ages, tables, and the three progress modes."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from imgci.ui import Progress, human_ago, human_created, human_size, table


def test_human_size_matches_img_style() -> None:
    assert human_size(591) == "591B"
    assert human_size(1571) == "1.534KiB"
    assert human_size(374682) == "365.9KiB"
    assert human_size(1.08 * 1024**3) == "1.08GiB"


def test_human_ago_and_created() -> None:
    assert human_ago(100.0, now=100.4) == "Less than a second ago"
    assert human_ago(100.0, now=109.0) == "9 seconds ago"
    assert human_ago(0.0, now=1800.0) == "30 minutes ago"
    assert human_ago(0.0, now=86400 * 2) == "2 days ago"
    assert human_created("1970-01-01T00:00:00Z", now=3600.0) == "1 hour ago"
    assert human_created("1970-01-01T00:00:00.123456789Z", now=7200.5) == "2 hours ago"
    assert human_created("", now=0) == "N/A"


def test_table_aligns_columns() -> None:
    out = io.StringIO()
    table([["NAME", "SIZE"], ["a-long-name", "1B"], ["b", "22B"]], out)
    assert out.getvalue().splitlines() == ["NAME         SIZE", "a-long-name  1B", "b            22B"]


@dataclass
class Downloaded:
    key: str
    message: str
    done: bool = True


def test_progress_plain_prints_one_line_per_finished_event() -> None:
    out = io.StringIO()
    p = Progress("plain", out)
    p(Downloaded("a", "downloading a", done=False))
    p(Downloaded("a", "downloaded a"))
    p.close()
    assert out.getvalue() == "downloaded a\n"


def test_progress_json_emits_objects() -> None:
    out = io.StringIO()
    p = Progress("json", out)
    p(Downloaded("a", "downloaded a"))
    doc = json.loads(out.getvalue())
    assert doc["event"] == "Downloaded" and doc["key"] == "a" and "time" in doc


def test_progress_tty_redraws_live_lines_in_place() -> None:
    out = io.StringIO()
    p = Progress("tty", out)
    p(Downloaded("a", "a 10%", done=False))
    p(Downloaded("a", "a done"))
    p.close()
    text = out.getvalue()
    assert "a 10%\n" in text and "\x1b[1F\x1b[J" in text and text.endswith("a done\n")


def test_progress_auto_is_plain_when_not_a_tty() -> None:
    assert Progress("auto", io.StringIO()).mode == "plain"
