"""GitHub Actions: workflow commands, step outputs and summary, and commit/PR reports through the REST API.

Contract:

* :func:`error_command`, :func:`warning_command`, :func:`group`, :func:`endgroup` return workflow-command lines
  (no trailing newline) with data and properties escaped as the runner expects.
* :func:`write_outputs` appends ``digest``, ``images`` and ``metadata`` to ``$GITHUB_OUTPUT`` in the multiline
  ``name<<delimiter`` form (the outputs ``action.yml`` declares — no others); :func:`write_summary` appends the
  markdown summary to ``$GITHUB_STEP_SUMMARY``. Both append: other steps' writers share those files.
* :func:`notify` reports to GitHub through PyGithub (the only module that imports it): one check run per entry
  (``check-run``), or one commit status per entry (``status``; also the fallback, once, when check runs answer
  403 — a token without ``checks: write``), and optionally one PR comment, found again by a marker and edited in
  place on later runs. It never raises: every failure becomes a warning in the returned notes, and the token
  never appears in them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import requests

from imgci.publish import summary
from imgci.publish.report import EntryReport, ErrorInfo, RunReport

if TYPE_CHECKING:
    from github.Commit import Commit
    from github.Repository import Repository

Mode = Literal["check-run", "status", "none"]
DEFAULT_API_URL = "https://api.github.com"
API_TIMEOUT = 10  # seconds per request: a slow API must not hold the job for long
MAX_TEXT = 65_000  # check-run summaries and comment bodies are limited to 65535 characters
MAX_DESCRIPTION = 140  # commit status descriptions

CONCLUSIONS = {"built": "success", "unchanged": "success", "failed": "failure", "cancelled": "cancelled"}
STATES = {"built": "success", "unchanged": "success", "planned": "success", "failed": "failure", "cancelled": "error"}


# -- workflow commands -------------------------------------------------------------------------------------------


def escape_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(s: str) -> str:
    return escape_data(s).replace(":", "%3A").replace(",", "%2C")


def _command(name: str, message: str, props: dict[str, str] | None = None) -> str:
    prop_text = ",".join(f"{k}={escape_property(v)}" for k, v in (props or {}).items() if v)
    return f"::{name}{' ' + prop_text if prop_text else ''}::{escape_data(message)}"


def error_command(err: ErrorInfo, title: str = "") -> str:
    """``::error file=…,line=…,title=…::message`` (the hint on a second line); file and line only when known."""
    message = err.message + (f"\nhint: {err.hint}" if err.hint else "")
    props = {"file": err.file, "line": str(err.line) if err.file and err.line > 0 else "", "title": title}
    return _command("error", message, props)


def warning_command(message: str) -> str:
    return _command("warning", message)


def group(title: str) -> str:
    return f"::group::{escape_data(title)}"


def endgroup() -> str:
    return "::endgroup::"


# -- step outputs and summary ------------------------------------------------------------------------------------


def output_values(report: RunReport) -> dict[str, str]:
    """The step outputs: ``digest`` (first entry with one, plan order), ``images`` (``ref@digest`` of every tag
    of every successful entry, comma-separated) and ``metadata`` (compact JSON of the report)."""
    digest = next((e.digest for e in report.entries if e.digest), "")
    images = [ref for e in report.entries if e.ok for ref in summary.published_refs(e)]
    metadata = json.dumps(report.to_json(), separators=(",", ":"), sort_keys=False)
    return {"digest": digest, "images": ",".join(images), "metadata": metadata}


def format_output(name: str, value: str) -> str:
    """One ``name<<delimiter`` block; the delimiter is random, so no value can end the block early."""
    delimiter = f"ghadelimiter_{uuid.uuid4()}"
    while delimiter in value:  # pragma: no cover - 122 random bits
        delimiter = f"ghadelimiter_{uuid.uuid4()}"
    return f"{name}<<{delimiter}\n{value}\n{delimiter}\n"


def write_outputs(report: RunReport, path: Path) -> None:
    """Append the step outputs to ``path`` (``$GITHUB_OUTPUT``)."""
    text = "".join(format_output(k, v) for k, v in output_values(report).items())
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def write_summary(report: RunReport, path: Path) -> None:
    """Append the markdown summary to ``path`` (``$GITHUB_STEP_SUMMARY``)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(summary.markdown(report) + "\n")


# -- the REST API ------------------------------------------------------------------------------------------------


def comment_marker(config: str) -> str:
    """The hidden line that identifies this build.yaml's comment on a PR."""
    return f"<!-- imgci-report: {config.replace('--', '-')} -->"


@dataclass
class _Notes:
    """Notes for the caller, with the token scrubbed from every one of them."""

    token: str
    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line.replace(self.token, "***") if self.token else line)

    def warn(self, what: str, exc: BaseException) -> None:
        self.add(f"warning: GitHub API: {what}: {_describe(exc)}")


def _api_errors() -> tuple[type[BaseException], ...]:
    from github.GithubException import BadAttributeException, GithubException

    # AssertionError: PyGithub validates URLs from the server with asserts (a misconfigured API URL).
    return (GithubException, BadAttributeException, requests.RequestException, OSError, ValueError, AssertionError)


def _describe(exc: BaseException) -> str:
    from github.GithubException import GithubException

    if isinstance(exc, GithubException):
        message = exc.message or (exc.data.get("message") if isinstance(exc.data, dict) else "") or ""
        return f"HTTP {exc.status}" + (f": {message}" if message else "")
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _is_forbidden(exc: BaseException) -> bool:
    """A 403 that is a refusal (a token without the permission), not a rate limit."""
    from github.GithubException import GithubException, RateLimitExceededException

    return isinstance(exc, GithubException) and exc.status == 403 and not isinstance(exc, RateLimitExceededException)


def notify(
    report: RunReport,
    *,
    token: str,
    api_url: str,
    repository: str,
    sha: str,
    pr: int | None,
    mode: Mode,
    pr_comment: bool,
    details_url: str = "",
    write_interval: float = 1.0,
) -> list[str]:
    """Report ``report`` on commit ``sha`` of ``repository`` and (``pr_comment``) on PR ``pr``; never raises.

    ``write_interval`` spaces write requests as GitHub asks of integrations (its secondary rate limits).
    Returns notes to print: what was created, and a ``warning: …`` line for each thing that failed.
    """
    notes = _Notes(token)
    want_comment = pr_comment and pr is not None
    if mode == "none" and not want_comment:
        return notes.lines
    if not api_url.startswith(("http://", "https://")):
        notes.add(f"warning: GitHub API: not an http(s) URL: {api_url!r}")
        return notes.lines
    # PyGithub is imported here and in the helpers above, on first use: at module level it would add ~0.1 s to
    # every imgci start, most of which never talk to GitHub.
    from github import Auth, Github
    from urllib3.util import Retry

    # Retry only connection failures: the request never reached GitHub, so a retry cannot create a duplicate.
    retry = Retry(total=2, connect=2, read=0, status=0, other=0, backoff_factor=0.25)
    try:
        gh = Github(
            base_url=api_url.rstrip("/"),
            auth=Auth.Token(token),
            retry=retry,
            timeout=API_TIMEOUT,
            per_page=100,
            seconds_between_requests=None,
            seconds_between_writes=write_interval or None,
        )
    except _api_errors() as exc:
        notes.warn(f"client for {api_url}", exc)
        return notes.lines
    try:
        try:
            repo = gh.get_repo(repository)
        except _api_errors() as exc:
            notes.warn(f"repository {repository}", exc)
            return notes.lines
        reachable = True
        if mode != "none" and report.entries:  # a run that failed before any entry has nothing to put on a commit
            reachable = _report_commit(repo, report, sha, mode, details_url, notes)
        if want_comment and reachable and pr is not None:
            _comment(repo, report, pr, notes)
    finally:
        gh.close()
    return notes.lines


def _report_commit(repo: Repository, report: RunReport, sha: str, mode: Mode, details_url: str, notes: _Notes) -> bool:
    """Check runs (falling back to statuses on 403) or statuses, one per entry; False when GitHub is unreachable."""
    entries = list(report.entries)
    done = 0
    if mode == "check-run":
        try:
            for entry in entries:
                _create_check_run(repo, entry, sha, details_url)
                done += 1
            notes.add(f"GitHub: {_count(done, 'check run')} on {sha[:12]}")
            return True
        except _api_errors() as exc:
            if not _is_forbidden(exc):
                notes.warn("check run", exc)
                return not isinstance(exc, requests.ConnectionError | requests.Timeout)
            notes.warn("check runs refused (does the token have checks: write?); using commit statuses", exc)
            entries = entries[done:]
            done = 0
    try:
        commit = repo.get_commit(sha)
        for entry in entries:
            _create_status(commit, entry, details_url)
            done += 1
        notes.add(f"GitHub: {_count(done, 'commit status', 'commit statuses')} on {sha[:12]}")
    except _api_errors() as exc:
        notes.warn("commit status", exc)
        return not isinstance(exc, requests.ConnectionError | requests.Timeout)
    return True


def _count(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _create_check_run(repo: Repository, entry: EntryReport, sha: str, details_url: str) -> None:
    output = {"title": status_description(entry), "summary": _truncate(summary.entry_markdown(entry), MAX_TEXT)}
    args: dict[str, Any] = {
        "name": f"imgci: {entry.label}",
        "head_sha": sha,
        "status": "completed",
        "conclusion": CONCLUSIONS.get(entry.status, "neutral"),
        "output": output,
    }
    if details_url:
        args["details_url"] = details_url
    repo.create_check_run(**args)


def _create_status(commit: Commit, entry: EntryReport, details_url: str) -> None:
    args: dict[str, Any] = {
        "state": STATES.get(entry.status, "error"),
        "description": status_description(entry),
        "context": f"imgci/{entry.id}",
    }
    if details_url:
        args["target_url"] = details_url
    commit.create_status(**args)


def status_description(entry: EntryReport) -> str:
    """One line of at most 140 characters: ``built sha256:0123456789ab, 12.3MiB, 5/7 cached, 10.2s``."""
    if entry.error is not None and entry.status == "failed":
        where = summary.location(entry.error)
        text = f"failed: {' '.join(entry.error.message.split())}" + (f" ({where})" if where else "")
    else:
        parts = [f"{entry.status} {summary.short_digest(entry.digest)}" if entry.digest else entry.status]
        if entry.size:
            parts.append(summary.size_text(entry))
        if entry.cache.hits + entry.cache.misses:
            parts.append(f"{summary.cache_text(entry)} cached")
        if entry.build_seconds:
            parts.append(summary.seconds_text(entry.build_seconds))
        text = ", ".join(parts)
    return _truncate(text, MAX_DESCRIPTION)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _comment(repo: Repository, report: RunReport, pr: int, notes: _Notes) -> None:
    marker = comment_marker(report.config)
    body = _truncate(f"{marker}\n{summary.markdown(report)}", MAX_TEXT)
    try:
        issue = repo.get_issue(pr)
        for comment in issue.get_comments():
            if marker in (comment.body or ""):
                comment.edit(body)
                notes.add(f"GitHub: updated the comment on PR #{pr}")
                return
        issue.create_comment(body)
        notes.add(f"GitHub: commented on PR #{pr}")
    except _api_errors() as exc:
        notes.warn(f"comment on PR #{pr}", exc)
