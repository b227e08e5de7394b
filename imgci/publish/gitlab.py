"""GitLab CI: collapsible log sections, the dotenv report for downstream jobs, the summary artifact, error lines.

Contract:

* :func:`section_start` / :func:`section_end` return GitLab's section escape sequences (no trailing newline);
  section names are reduced to ``[a-z0-9_.-]``.
* :func:`write_dotenv` writes (atomically) ``IMGCI_<ID>_DIGEST`` and ``IMGCI_<ID>_TAGS`` for every entry that has
  a digest, then ``IMGCI_DIGEST`` (the first entry's digest) and ``IMGCI_OK``. GitLab's dotenv rules hold: one
  ``KEY=value`` per line, no blank lines or comments, single-line values. It returns warnings when the file
  exceeds GitLab's default limits (20 variables, 5 KiB), which make GitLab reject the whole report.
* :func:`write_summary` writes the markdown summary (an artifact); :func:`error_line` is the ``ERROR: …`` line
  printed for an error, GitLab having no annotations.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

from imgci.publish import summary
from imgci.publish.report import ErrorInfo, RunReport

DOTENV_MAX_VARIABLES = 20  # GitLab's default plan limit (dotenv_variables)
DOTENV_MAX_BYTES = 5120  # GitLab's default plan limit (dotenv_size)


def section_name(name: str) -> str:
    """``name`` lower-cased, every character outside ``[a-z0-9_.-]`` replaced by ``_``."""
    return re.sub(r"[^a-z0-9_.-]", "_", name.lower()) or "section"


def section_start(name: str, title: str, collapsed: bool = True, *, ts: int | None = None) -> str:
    options = "[collapsed=true]" if collapsed else ""
    when = int(time.time()) if ts is None else ts
    title = " ".join(title.split())  # a line break would end the header line
    return f"\x1b[0Ksection_start:{when}:{section_name(name)}{options}\r\x1b[0K{title}"


def section_end(name: str, *, ts: int | None = None) -> str:
    when = int(time.time()) if ts is None else ts
    return f"\x1b[0Ksection_end:{when}:{section_name(name)}\r\x1b[0K"


def variable_name(entry_id: str) -> str:
    """The ``<ID>`` part of ``IMGCI_<ID>_DIGEST``: upper-cased, every character outside ``[A-Z0-9]`` → ``_``."""
    return re.sub(r"[^A-Z0-9]", "_", entry_id.upper())


def dotenv_variables(report: RunReport) -> dict[str, str]:
    """The variables of the dotenv report, in file order."""
    variables: dict[str, str] = {}
    for e in report.entries:
        if not e.digest:
            continue
        key = variable_name(e.id)
        variables[f"IMGCI_{key}_DIGEST"] = _single_line(e.digest)
        variables[f"IMGCI_{key}_TAGS"] = _single_line(",".join(e.tags))
    variables["IMGCI_DIGEST"] = next((e.digest for e in report.entries if e.digest), "")
    variables["IMGCI_OK"] = "true" if report.ok else "false"
    return variables


def _single_line(value: str) -> str:
    return "".join(value.split())  # digests and references never hold whitespace; a stray one must not split a line


def write_dotenv(report: RunReport, path: Path) -> list[str]:
    """Write the dotenv report to ``path`` atomically; returns warnings (GitLab limits, clashing entry ids)."""
    variables = dotenv_variables(report)
    text = "".join(f"{k}={v}\n" for k, v in variables.items())
    _write_atomic(path, text)
    warnings = []
    ids = [e.id for e in report.entries if e.digest]
    clashes = sorted({variable_name(i) for i in ids if sum(variable_name(j) == variable_name(i) for j in ids) > 1})
    if clashes:
        warnings.append(f"warning: dotenv: entries share variable names ({', '.join(clashes)}): the last one wins")
    if len(variables) > DOTENV_MAX_VARIABLES:
        warnings.append(
            f"warning: dotenv: {len(variables)} variables; GitLab rejects more than {DOTENV_MAX_VARIABLES} "
            "unless the instance limit (dotenv_variables) was raised"
        )
    if len(text.encode()) > DOTENV_MAX_BYTES:
        warnings.append(
            f"warning: dotenv: {len(text.encode())} bytes; GitLab rejects more than {DOTENV_MAX_BYTES} "
            "unless the instance limit (dotenv_size) was raised"
        )
    return warnings


def write_summary(report: RunReport, path: Path) -> None:
    """Write the markdown summary to ``path`` (replacing it: the artifact belongs to this job)."""
    _write_atomic(path, summary.markdown(report))


def error_line(err: ErrorInfo) -> str:
    """``ERROR: Dockerfile:12: message`` (the hint appended), on one line."""
    where = summary.location(err)
    message = " ".join(err.message.split())
    hint = f" (hint: {' '.join(err.hint.split())})" if err.hint else ""
    return f"ERROR: {where + ': ' if where else ''}{message}{hint}"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would follow the rename; an artifact is not a secret
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
