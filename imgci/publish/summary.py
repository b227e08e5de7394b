"""Render a :class:`~imgci.publish.report.RunReport` for people: the log table and the markdown summary.

Contract:

* :func:`table_text` is the final summary printed in the log: one aligned row per entry (``TARGET STATUS DIGEST
  SIZE CACHE BUILD PUSH``), then one line per pushed or stored tag (``label: ref@digest``), per error
  (``label: error: message (Dockerfile:12)``), per retried push and per cache export, then a totals line
  (``3 entries: 2 built, 1 unchanged, 0 failed in 12.3s``).
* :func:`markdown` is GitHub-flavoured markdown for ``$GITHUB_STEP_SUMMARY``, GitLab's summary artifact and PR
  comments; :func:`entry_markdown` is the same for one entry (a check run's summary). Cell text is escaped
  (``|``, newlines, HTML), so a message can never break the table.
* Pure functions of the report: the same report always renders to the same text (no clock, no environment).
"""

from __future__ import annotations

import html
import io
from collections.abc import Iterable, Sequence

from imgci.publish.report import EntryReport, ErrorInfo, RunReport
from imgci.ui import human_size, table

STATUSES = ("built", "unchanged", "failed", "cancelled", "planned")
TIMES = "\u00d7"  # the multiplication sign: "push retried 2\u00d7"


# -- shared cell texts -------------------------------------------------------------------------------------------


def short_digest(digest: str) -> str:
    """``sha256:`` + 12 hex digits, or ``-`` when there is no digest."""
    if not digest:
        return "-"
    algo, sep, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}" if sep else digest[:12]


def size_text(entry: EntryReport) -> str:
    return human_size(entry.size) if entry.size else "-"


def cache_text(entry: EntryReport) -> str:
    """``hits/steps`` over the steps the cache was asked about, or ``-``."""
    total = entry.cache.hits + entry.cache.misses
    return f"{entry.cache.hits}/{total}" if total else "-"


def hit_rate_text(entry: EntryReport) -> str:
    rate = entry.cache.hit_rate
    return "-" if rate is None else f"{round(rate * 100)}%"


def seconds_text(seconds: float, status: str = "built") -> str:
    # An entry that did not build has no build time worth showing: 0.0s would suggest an instant build.
    if not seconds and status != "built":
        return "-"
    return f"{seconds:.1f}s"


def push_retries(entry: EntryReport) -> int:
    """How many requests of this entry's pushes failed and were tried again."""
    return sum(max(0, p.attempts - 1) for p in entry.pushes)


def retry_reasons(entry: EntryReport) -> list[str]:
    """Why the pushes were retried, each reason once, in the order first seen."""
    return list(dict.fromkeys(r for p in entry.pushes for r in p.retries))


def push_text(entry: EntryReport) -> str:
    """``-`` (not pushed), ``failed``, ``tagged`` (only tags added), ``ok`` or ``ok (3 attempts)``."""
    if not entry.pushes:
        return "-"
    if any(not p.ok for p in entry.pushes):
        return "failed"
    if all(p.only_tagged for p in entry.pushes):
        return "tagged"
    retries = push_retries(entry)
    return f"ok ({retries + 1} attempts)" if retries else "ok"


def location(err: ErrorInfo) -> str:
    """``Dockerfile:12`` (the file as given), ``Dockerfile``, or "" when the error points nowhere."""
    if not err.file:
        return ""
    return f"{err.file}:{err.line}" if err.line > 0 else err.file


def published_refs(entry: EntryReport) -> list[str]:
    """``ref@digest`` for every tag pushed (or, without a push, stored locally) for a successful entry."""
    if entry.pushes:
        return [f"{p.tag}@{p.digest or entry.digest}" for p in entry.pushes if p.ok and (p.digest or entry.digest)]
    if entry.digest and entry.status in ("built", "unchanged"):
        return [f"{tag}@{entry.digest}" for tag in entry.tags]
    return []


def counts_text(report: RunReport) -> str:
    """``2 built, 1 unchanged, 0 failed in 12.3s`` (cancelled and planned only when there are some)."""
    counts = {s: sum(1 for e in report.entries if e.status == s) for s in STATUSES}
    parts = [f"{counts[s]} {s}" for s in STATUSES if s in ("built", "unchanged", "failed") or counts[s]]
    return f"{', '.join(parts)} in {report.duration:.1f}s"


def _plural(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


# -- the log table -----------------------------------------------------------------------------------------------


def table_text(report: RunReport) -> str:
    """The final summary for the log (see the module docstring); ends with a newline."""
    out = io.StringIO()
    rows = [["TARGET", "STATUS", "DIGEST", "SIZE", "CACHE", "BUILD", "PUSH"]]
    rows += [_row(e) for e in report.entries]
    if report.entries:
        table(rows, out)
    for line in _detail_lines(report):
        out.write(line + "\n")
    out.write(f"{_plural(len(report.entries), 'entry', 'entries')}: {counts_text(report)}\n")
    return out.getvalue()


def _row(e: EntryReport) -> list[str]:
    return [
        _one_line(e.label),
        e.status,
        short_digest(e.digest),
        size_text(e),
        cache_text(e),
        seconds_text(e.build_seconds, e.status),
        push_text(e),
    ]


def _detail_lines(report: RunReport) -> list[str]:
    lines: list[str] = []
    if report.error is not None:
        lines += _error_lines("", report.error)
    for e in report.entries:
        label = _one_line(e.label)
        lines += [f"{label}: {ref}" for ref in published_refs(e)]
        lines += [f"{label}: push failed: {p.tag}: {_one_line(p.error)}" for p in e.pushes if not p.ok and p.error]
        if e.error is not None:
            lines += _error_lines(label, e.error)
        retries = push_retries(e)
        if retries:
            reasons = retry_reasons(e)
            lines.append(f"{label}: push retried {retries}{TIMES}" + (f" ({', '.join(reasons)})" if reasons else ""))
        lines += [f"{label}: cache: {_one_line(c)}" for c in e.cache_exports]
    return lines


def _error_lines(label: str, err: ErrorInfo) -> list[str]:
    where = location(err)
    first, *rest = err.message.splitlines() or [""]
    prefix = f"{label}: error: " if label else "error: "
    lines = [prefix + first + (f" ({where})" if where else "")]
    lines += ["  " + r for r in rest]
    if err.hint:
        lines.append(f"  hint: {_one_line(err.hint)}")
    return lines


def _one_line(s: str) -> str:
    return " ".join(s.split()) if ("\n" in s or "\r" in s) else s


# -- markdown ----------------------------------------------------------------------------------------------------

_COLUMNS = ("Target", "Status", "Tags", "Digest", "Size", "Cache hit rate", "Build", "Push")
_HEADER = "| " + " | ".join(_COLUMNS) + " |\n" + "|---" * len(_COLUMNS) + "|\n"


def markdown(report: RunReport) -> str:
    """The whole run as GitHub-flavoured markdown (see the module docstring); ends with a newline."""
    n = len(report.entries)
    parts = [f"### imgci: {_plural(n, 'image')}\n\n{'✅' if report.ok else '❌'} {counts_text(report)}\n"]
    if report.entries:
        parts.append(_md_table(report.entries))
    errors: list[tuple[str, ErrorInfo]] = [(report.config, report.error)] if report.error else []
    errors += [(e.label, e.error) for e in report.entries if e.error is not None and e.status == "failed"]
    if errors:
        parts.append(_md_failures(errors))
    retried = [e for e in report.entries if push_retries(e)]
    if retried:
        parts.append(_md_retries(retried))
    return "\n".join(parts)


def entry_markdown(entry: EntryReport) -> str:
    """One entry as markdown: its table row, its error and its push retries (a check run's summary)."""
    parts = [_md_table([entry])]
    if entry.error is not None:
        parts.append(_md_failures([(entry.label, entry.error)]))
    if push_retries(entry):
        parts.append(_md_retries([entry]))
    refs = published_refs(entry)
    if refs:
        parts.append("#### Images\n\n" + "".join(f"- {_md_code(r)}\n" for r in refs))
    return "\n".join(parts)


def _md_table(entries: Sequence[EntryReport]) -> str:
    rows = [
        [
            _md_text(e.label),
            e.status,
            "<br>".join(_md_code(t) for t in e.tags) or "-",
            _md_code(short_digest(e.digest)) if e.digest else "-",
            size_text(e),
            hit_rate_text(e),
            seconds_text(e.build_seconds, e.status),
            push_text(e),
        ]
        for e in entries
    ]
    return _HEADER + "".join("| " + " | ".join(r) + " |\n" for r in rows)


def _md_failures(errors: Iterable[tuple[str, ErrorInfo]]) -> str:
    lines = ["#### Failures", ""]
    for label, err in errors:
        where = location(err)
        at = f" ({_md_code(where)})" if where else ""
        lines.append(f"- **{_md_text(label)}**{at}: {_md_text(err.message)}")
        if err.hint:
            lines.append(f"  - hint: {_md_text(err.hint)}")
    return "\n".join(lines) + "\n"


def _md_retries(entries: Iterable[EntryReport]) -> str:
    lines = ["#### Push retries", ""]
    for e in entries:
        reasons = retry_reasons(e)
        why = f" ({_md_text(', '.join(reasons))})" if reasons else ""
        lines.append(f"- **{_md_text(e.label)}**: retried {push_retries(e)}{TIMES}{why}")
    return "\n".join(lines) + "\n"


def _md_text(s: str) -> str:
    """Text safe in a table cell or a list item: HTML escaped, ``|`` escaped, line breaks as ``<br>``."""
    s = html.escape(s, quote=False).replace("|", "\\|")
    return "<br>".join(s.strip().splitlines())


def _md_code(s: str) -> str:
    """A code span safe in a table cell (GFM unescapes ``\\|`` inside code spans in tables)."""
    s = " ".join(s.split()).replace("|", "\\|")
    fence = "``" if "`" in s else "`"
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"
