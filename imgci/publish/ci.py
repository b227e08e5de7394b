"""What the runner calls to report a run to its CI system: log grouping, error annotations, files and API reports.

Contract:

* :func:`make_reporter` picks the reporter (``auto`` detects GitHub Actions or GitLab CI from the environment);
  every reporter writes its log lines to ``out`` and nothing else; only :meth:`CIReporter.finish` writes files
  and talks to APIs, and it returns notes (paths written, warnings) for the caller to print.
* Local (:class:`CIReporter`): ``== title`` lines, errors left to the CLI, and only the files the options name.
* :class:`GitHubReporter`: ``::group::``/``::error``/``::warning`` commands; ``$GITHUB_OUTPUT`` and
  ``$GITHUB_STEP_SUMMARY`` by default; with a token, check runs or statuses on the commit (the PR head on pull
  requests) and optionally a PR comment (:func:`imgci.publish.github.notify`). Without a token: no API calls.
* :class:`GitLabReporter`: collapsible sections, ``ERROR:`` lines, ``imgci.env`` (dotenv) and
  ``imgci-summary.md`` in the working directory by default.
* Reporting never fails a run: a file that cannot be written or an API that answers badly becomes a warning note.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from imgci.publish import github, gitlab
from imgci.publish.report import EntryReport, ErrorInfo, RunReport

CHECK_MODES: dict[str, github.Mode] = {"check-run": "check-run", "status": "status", "none": "none"}


@dataclass
class ReportOptions:
    summary_file: Path | None = None  # None: $GITHUB_STEP_SUMMARY on github, "imgci-summary.md" on gitlab, none locally
    dotenv_file: Path | None = None  # None: "imgci.env" on gitlab
    outputs_file: Path | None = None  # None: $GITHUB_OUTPUT on github
    github_token: str = field(default="", repr=False)  # repr=False: a logged ReportOptions must not show it
    github_api_url: str = ""  # "" → env GITHUB_API_URL or https://api.github.com
    github_checks: str = "check-run"  # check-run | status | none (only used when a token is given)
    pr_comment: bool = False

    def __post_init__(self) -> None:
        if self.github_checks not in CHECK_MODES:
            raise ValueError(f"github_checks must be one of {', '.join(CHECK_MODES)}, not {self.github_checks!r}")


def detect_provider(env: Mapping[str, str]) -> str:
    """``github`` on GitHub Actions, ``gitlab`` on GitLab CI, else ""."""
    if env.get("GITHUB_ACTIONS") == "true":
        return "github"
    if env.get("GITLAB_CI") == "true":
        return "gitlab"
    return ""


class CIReporter:
    """Local (no CI) behaviour; subclasses GitHubReporter, GitLabReporter. All output goes to self.out."""

    provider: str = ""

    def __init__(self, out: TextIO, env: Mapping[str, str], options: ReportOptions) -> None:
        self.out = out
        self.env = env
        self.options = options

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()  # keep the order with whatever else the job writes to the same log

    def begin_entry(self, entry: EntryReport, title: str) -> None:
        self._line(f"== {title}")

    def end_entry(self, entry: EntryReport) -> None:
        pass

    def annotate_error(self, err: ErrorInfo, title: str = "") -> None:
        pass  # the CLI prints errors itself

    def warning(self, message: str) -> None:
        self._line(f"warning: {message}")

    # -- files and APIs ------------------------------------------------------------------------------------------

    def summary_path(self) -> Path | None:
        return self.options.summary_file

    def outputs_path(self) -> Path | None:
        return self.options.outputs_file

    def dotenv_path(self) -> Path | None:
        return self.options.dotenv_file

    def write_summary(self, report: RunReport, path: Path) -> None:
        gitlab.write_summary(report, path)  # replaces the file; GitHub's shared step summary is appended to

    def notify(self, report: RunReport) -> list[str]:
        """API reports; none locally."""
        return []

    def finish(self, report: RunReport) -> list[str]:
        """Write the outputs, summary and dotenv files that apply, then report through APIs; returns notes."""
        notes: list[str] = []
        outputs, summary_file, dotenv = self.outputs_path(), self.summary_path(), self.dotenv_path()
        if outputs is not None:
            notes += _write("step outputs", outputs, lambda p: github.write_outputs(report, p))
        if summary_file is not None:
            notes += _write("summary", summary_file, lambda p: self.write_summary(report, p))
        if dotenv is not None:
            notes += _write("dotenv report", dotenv, lambda p: gitlab.write_dotenv(report, p))
        return notes + self.notify(report)


def _write(what: str, path: Path, write: Callable[[Path], list[str] | None]) -> list[str]:
    try:
        warnings = write(path) or []
    except OSError as exc:
        return [f"warning: could not write the {what} to {path}: {exc.strerror or exc}"]
    return [f"wrote the {what} to {path}", *warnings]


class GitHubReporter(CIReporter):
    provider = "github"
    write_interval = 1.0  # seconds between API writes, as GitHub asks of integrations (tests set 0)

    def begin_entry(self, entry: EntryReport, title: str) -> None:
        self._line(github.group(title))

    def end_entry(self, entry: EntryReport) -> None:
        self._line(github.endgroup())

    def annotate_error(self, err: ErrorInfo, title: str = "") -> None:
        self._line(github.error_command(err, title))

    def warning(self, message: str) -> None:
        self._line(github.warning_command(message))

    def summary_path(self) -> Path | None:
        return self.options.summary_file or _env_path(self.env, "GITHUB_STEP_SUMMARY")

    def outputs_path(self) -> Path | None:
        return self.options.outputs_file or _env_path(self.env, "GITHUB_OUTPUT")

    def write_summary(self, report: RunReport, path: Path) -> None:
        github.write_summary(report, path)

    def notify(self, report: RunReport) -> list[str]:
        o = self.options
        if not o.github_token or (o.github_checks == "none" and not o.pr_comment):
            return []
        event = _event(self.env)
        repository = self.env.get("GITHUB_REPOSITORY", "")
        # On a pull request GITHUB_SHA is a merge commit nobody sees: report on the PR's head commit.
        sha = _dig(event, "pull_request", "head", "sha") or self.env.get("GITHUB_SHA", "")
        if not repository or not sha:
            return ["warning: GitHub API: GITHUB_REPOSITORY or GITHUB_SHA is not set; nothing reported"]
        return github.notify(
            report,
            token=o.github_token,
            api_url=o.github_api_url or self.env.get("GITHUB_API_URL") or github.DEFAULT_API_URL,
            repository=repository,
            sha=sha,
            pr=pr_number(self.env, event),
            mode=CHECK_MODES[o.github_checks],
            pr_comment=o.pr_comment,
            details_url=details_url(self.env),
            write_interval=self.write_interval,
        )


def pr_number(env: Mapping[str, str], event: Mapping[str, Any]) -> int | None:
    """The pull request of this run: the event's ``pull_request.number``, else ``GITHUB_REF`` ``refs/pull/N/…``."""
    number = _dig(event, "pull_request", "number")
    if isinstance(number, int) and not isinstance(number, bool):
        return number
    m = re.fullmatch(r"refs/pull/(\d+)/(?:merge|head)", env.get("GITHUB_REF", ""))
    return int(m.group(1)) if m else None


def details_url(env: Mapping[str, str]) -> str:
    """The workflow run's page, or "" when the environment does not say."""
    server, repository, run_id = (env.get(k, "") for k in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID"))
    return f"{server.rstrip('/')}/{repository}/actions/runs/{run_id}" if server and repository and run_id else ""


def _event(env: Mapping[str, str]) -> dict[str, Any]:
    from imgci.cimeta import read_event  # the CI environment's facts live there (imports nothing of imgci)

    return read_event(env.get("GITHUB_EVENT_PATH", ""))


def _dig(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)  # type: ignore[assignment]
    return data


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name, "")
    return Path(value) if value else None


class GitLabReporter(CIReporter):
    provider = "gitlab"

    def begin_entry(self, entry: EntryReport, title: str) -> None:
        self._line(gitlab.section_start(f"imgci_{entry.id}", title))

    def end_entry(self, entry: EntryReport) -> None:
        self._line(gitlab.section_end(f"imgci_{entry.id}"))

    def annotate_error(self, err: ErrorInfo, title: str = "") -> None:
        self._line(gitlab.error_line(err))

    def summary_path(self) -> Path | None:
        return self.options.summary_file or Path("imgci-summary.md")

    def dotenv_path(self) -> Path | None:
        return self.options.dotenv_file or Path("imgci.env")


REPORTERS: dict[str, type[CIReporter]] = {"github": GitHubReporter, "gitlab": GitLabReporter, "": CIReporter}


def make_reporter(kind: str, out: TextIO, env: Mapping[str, str], options: ReportOptions) -> CIReporter:
    """``kind``: ``auto`` (detect from ``env``), ``github``, ``gitlab`` or ``none`` (local: no default files)."""
    if kind == "auto":
        kind = detect_provider(env)
    elif kind == "none":
        kind = ""
    if kind not in REPORTERS:
        raise ValueError(f"unknown CI reporter {kind!r} (auto, github, gitlab or none)")
    return REPORTERS[kind](out, env, options)
