"""GitHub Actions reporting: workflow commands, step outputs and summary, and the REST API against FakeGitHub."""

from __future__ import annotations

import io
import json
import logging
import socket
from pathlib import Path

import pytest

from imgci.publish import github, summary
from imgci.publish.ci import (
    CIReporter,
    GitHubReporter,
    GitLabReporter,
    ReportOptions,
    details_url,
    detect_provider,
    make_reporter,
    pr_number,
)
from imgci.publish.report import EntryReport, ErrorInfo, RunReport
from tests.infra.fakegithub import FakeGitHub
from tests.unit.test_publish_summary import D1, D2, sample_report

TOKEN = "ghs_Sup3rSecretT0kenValue"
SHA = "a1" * 20
HEAD_SHA = "b2" * 20


def parse_outputs(text: str) -> dict[str, str]:
    """Read back a ``$GITHUB_OUTPUT`` file: ``name=value`` lines and ``name<<DELIM`` … ``DELIM`` blocks."""
    values: dict[str, str] = {}
    lines = iter(text.split("\n"))
    for line in lines:
        if not line:
            continue
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            body = []
            for inner in lines:
                if inner == delimiter:
                    break
                body.append(inner)
            else:
                raise AssertionError(f"unterminated output {name}")
            values[name] = "\n".join(body)
        else:
            name, value = line.split("=", 1)
            values[name] = value
    return values


def notify(gh: FakeGitHub, report: RunReport | None = None, **kwargs: object) -> list[str]:
    args: dict[str, object] = {
        "token": TOKEN,
        "api_url": gh.url,
        "repository": "acme/app",
        "sha": SHA,
        "pr": None,
        "mode": "check-run",
        "pr_comment": False,
        "write_interval": 0,
    }
    args.update(kwargs)
    return github.notify(report or sample_report(), **args)  # type: ignore[arg-type]


# -- workflow commands -------------------------------------------------------------------------------------------


def test_escaping_rules() -> None:
    assert github.escape_data("50% done\r\nnext: a,b") == "50%25 done%0D%0Anext: a,b"
    assert github.escape_property("C:\\x,y%\n") == "C%3A\\x%2Cy%25%0A"


def test_error_command() -> None:
    err = ErrorInfo(message="RUN failed: exit 1\nsee log", hint="try: x", file="docker/Dockerfile", line=12)
    assert github.error_command(err, title="app (python=3.12)") == (
        "::error file=docker/Dockerfile,line=12,title=app (python=3.12)::RUN failed: exit 1%0Asee log%0Ahint: try: x"
    )
    assert github.error_command(ErrorInfo(message="m")) == "::error::m"
    assert github.error_command(ErrorInfo(message="m", file="a,b:c")) == "::error file=a%2Cb%3Ac::m"
    assert github.error_command(ErrorInfo(message="m", line=4)) == "::error::m"  # a line without a file means nothing


def test_warning_and_groups() -> None:
    assert github.warning_command("100% sure\nreally") == "::warning::100%25 sure%0Areally"
    assert github.group("app (python=3.11)") == "::group::app (python=3.11)"
    assert github.endgroup() == "::endgroup::"


# -- outputs and summary -----------------------------------------------------------------------------------------


def test_write_outputs_multiline_form_parsed_back(tmp_path: Path) -> None:
    path = tmp_path / "github_output"
    path.write_text("earlier=step\n")
    report = sample_report()
    github.write_outputs(report, path)
    text = path.read_text()
    assert text.startswith("earlier=step\ndigest<<ghadelimiter_")
    values = parse_outputs(text)
    assert set(values) == {"earlier", "digest", "images", "metadata"}
    assert values["digest"] == D1
    assert values["images"] == (
        f"ghcr.io/acme/app:3.11@{D1},ghcr.io/acme/app:latest@{D1},ghcr.io/acme/app:3.10@{D2}"
    )  # not the failed or cancelled entries
    assert json.loads(values["metadata"]) == json.loads(json.dumps(report.to_json()))
    assert "\n" not in values["metadata"]
    delimiters = [line.split("<<")[1] for line in text.splitlines() if "<<" in line]
    assert len(set(delimiters)) == 3  # one fresh delimiter per value


def test_write_outputs_value_with_newlines_and_no_digest(tmp_path: Path) -> None:
    report = RunReport(config="b.yaml", entries=[EntryReport(id="a", target="a", label="a\nb", status="planned")])
    path = tmp_path / "out"
    github.write_outputs(report, path)
    values = parse_outputs(path.read_text())
    assert values["digest"] == "" and values["images"] == ""
    assert json.loads(values["metadata"])["entries"][0]["label"] == "a\nb"


def test_write_summary_appends(tmp_path: Path) -> None:
    path = tmp_path / "summary.md"
    path.write_text("# earlier step\n")
    github.write_summary(sample_report(), path)
    assert path.read_text() == "# earlier step\n" + summary.markdown(sample_report()) + "\n"


# -- the reporter ------------------------------------------------------------------------------------------------


def test_reporter_log_lines() -> None:
    out = io.StringIO()
    reporter = make_reporter("github", out, {}, ReportOptions())
    assert isinstance(reporter, GitHubReporter) and reporter.provider == "github"
    entry = sample_report().entries[2]
    reporter.begin_entry(entry, "app (python=3.12)")
    assert entry.error is not None
    reporter.annotate_error(entry.error, title="app (python=3.12)")
    reporter.warning("cache export failed: a, b")
    reporter.end_entry(entry)
    assert out.getvalue().splitlines() == [
        "::group::app (python=3.12)",
        "::error file=docker/Dockerfile,line=12,title=app (python=3.12)::RUN pip install | tee log: exit code 1"
        "%0AERROR: no wheel%0Ahint: pin <pip> & retry",
        "::warning::cache export failed: a, b",
        "::endgroup::",
    ]


def test_finish_writes_env_files_and_makes_no_api_call_without_token(tmp_path: Path) -> None:
    env = {
        "GITHUB_ACTIONS": "true",
        "GITHUB_OUTPUT": str(tmp_path / "output"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "GITHUB_REPOSITORY": "acme/app",
        "GITHUB_SHA": SHA,
    }
    with FakeGitHub() as gh:
        env["GITHUB_API_URL"] = gh.url
        reporter = make_reporter("auto", io.StringIO(), env, ReportOptions(pr_comment=True))
        notes = reporter.finish(sample_report())
        assert gh.requests == []
    assert parse_outputs((tmp_path / "output").read_text())["digest"] == D1
    assert (tmp_path / "summary.md").read_text().startswith("### imgci: 4 images")
    assert notes == [
        f"wrote the step outputs to {tmp_path / 'output'}",
        f"wrote the summary to {tmp_path / 'summary.md'}",
    ]


def test_finish_explicit_files_win_and_write_errors_are_warnings(tmp_path: Path) -> None:
    env = {"GITHUB_OUTPUT": str(tmp_path / "env-output"), "GITHUB_STEP_SUMMARY": str(tmp_path / "env-summary")}
    options = ReportOptions(outputs_file=tmp_path / "mine", summary_file=tmp_path / "missing" / "dir" / "s.md")
    (tmp_path / "missing").write_text("a file where a directory should be")
    notes = GitHubReporter(io.StringIO(), env, options).finish(sample_report())
    assert (tmp_path / "mine").exists() and not (tmp_path / "env-output").exists()
    assert notes[0] == f"wrote the step outputs to {tmp_path / 'mine'}"
    assert notes[1].startswith(f"warning: could not write the summary to {tmp_path / 'missing' / 'dir' / 's.md'}: ")


# -- the REST API ------------------------------------------------------------------------------------------------


def test_check_runs_one_per_entry_with_conclusions() -> None:
    report = sample_report()
    report.entries.append(EntryReport(id="later", target="later", label="later", status="planned"))
    with FakeGitHub() as gh:
        notes = notify(gh, report, details_url="https://github.test/acme/app/actions/runs/7")
    assert notes == [f"GitHub: 5 check runs on {SHA[:12]}"]
    runs = {r["name"]: r for r in gh.check_runs}
    assert {name: r["conclusion"] for name, r in runs.items()} == {
        "imgci: app (python=3.11)": "success",
        "imgci: app (python=3.10)": "success",
        "imgci: app (python=3.12)": "failure",
        "imgci: tools": "cancelled",
        "imgci: later": "neutral",
    }
    built = runs["imgci: app (python=3.11)"]
    assert built["head_sha"] == SHA and built["status"] == "completed"
    assert built["details_url"] == "https://github.test/acme/app/actions/runs/7"
    assert built["output"]["title"] == "built sha256:0123456789ab, 11.77MiB, 5/7 cached, 10.2s"
    assert built["output"]["summary"] == summary.entry_markdown(report.entries[0])
    failed = runs["imgci: app (python=3.12)"]["output"]
    assert failed["title"].startswith(
        "failed: RUN pip install | tee log: exit code 1 ERROR: no wheel (docker/Dockerfile:12)"
    )
    assert gh.statuses == []
    assert {r.authorization for r in gh.requests} == {f"token {TOKEN}"}


def test_status_mode() -> None:
    with FakeGitHub(prefix="/api/v3") as gh:
        notes = notify(gh, mode="status")
    assert notes == [f"GitHub: 4 commit statuses on {SHA[:12]}"]
    assert [(s["context"], s["state"]) for s in gh.statuses] == [
        ("imgci/app-python-3.11", "success"),
        ("imgci/app-python-3.10", "success"),
        ("imgci/app-python-3.12", "failure"),
        ("imgci/tools", "error"),
    ]
    assert all(s["sha"] == SHA and "target_url" not in s for s in gh.statuses)
    assert gh.statuses[1]["description"] == "unchanged sha256:fedcba987654, 2KiB"
    assert gh.check_runs == []


def test_status_description_is_at_most_140_characters() -> None:
    entry = EntryReport(id="a", target="a", label="a", status="failed", error=ErrorInfo(message="x" * 500))
    text = github.status_description(entry)
    assert len(text) == 140 and text.endswith("…")
    with FakeGitHub() as gh:
        notes = notify(gh, RunReport(config="b.yaml", entries=[entry]), mode="status", details_url="https://d/1")
    assert notes == [f"GitHub: 1 commit status on {SHA[:12]}"]
    assert gh.statuses[0]["target_url"] == "https://d/1"


def test_forbidden_check_runs_fall_back_to_statuses_once() -> None:
    with FakeGitHub(forbid_check_runs=True) as gh:
        notes = notify(gh)
    assert len(gh.calls("POST", r"/check-runs$")) == 1  # not once per entry
    assert len(gh.statuses) == 4
    assert notes[0].startswith("warning: GitHub API: check runs refused")
    assert "HTTP 403: Resource not accessible by integration" in notes[0]
    assert notes[1] == f"GitHub: 4 commit statuses on {SHA[:12]}"


def test_forbidden_everywhere_gives_up() -> None:
    with FakeGitHub(forbid_check_runs=True, forbid_statuses=True) as gh:
        notes = notify(gh)
    assert len(gh.calls("POST", r"/check-runs$")) == 1
    assert len(gh.calls("POST", r"/statuses/")) == 1
    assert len(notes) == 2 and all(n.startswith("warning: GitHub API:") for n in notes)
    assert "commit status: HTTP 403" in notes[1]


def test_pr_comment_created_then_updated_in_place() -> None:
    with FakeGitHub(page_size=2) as gh:
        for i in range(5):  # three pages of other people's comments before ours
            gh.add_comment("acme/app", 7, f"LGTM {i}")
        gh.add_comment("acme/app", 8, "<!-- imgci-report: ci/build.yaml --> on another PR")
        notes = notify(gh, mode="none", pr=7, pr_comment=True)
        assert notes == ["GitHub: commented on PR #7"]
        ours = [c for c in gh.comments if c["issue"] == 7 and "imgci-report" in c["body"]]
        assert len(ours) == 1
        first_id = ours[0]["id"]
        assert ours[0]["body"].startswith("<!-- imgci-report: ci/build.yaml -->\n### imgci: 4 images")

        report = sample_report()
        report.entries = report.entries[:1]
        notes = notify(gh, report, mode="none", pr=7, pr_comment=True)
        assert notes == ["GitHub: updated the comment on PR #7"]
        ours = [c for c in gh.comments if c["issue"] == 7 and "imgci-report" in c["body"]]
        assert [c["id"] for c in ours] == [first_id]
        assert "### imgci: 1 image\n" in ours[0]["body"]
        assert len(gh.calls("PATCH", rf"/issues/comments/{first_id}$")) == 1
        assert len(gh.calls("GET", r"/issues/7/comments$")) == 6  # every page, twice

        other = sample_report()
        other.config = "other/build.yaml"
        assert notify(gh, other, mode="none", pr=7, pr_comment=True) == ["GitHub: commented on PR #7"]
        assert len([c for c in gh.comments if "imgci-report" in c["body"]]) == 3


def test_api_errors_are_warnings() -> None:
    with FakeGitHub(fail_all=500) as gh:
        notes = notify(gh, pr=7, pr_comment=True)
    assert notes == ["warning: GitHub API: repository acme/app: HTTP 500: Server Error"]
    with FakeGitHub() as gh:
        notes = notify(gh, repository="acme/app", sha="", pr=3, pr_comment=True)  # the API answers 422
        assert notes[0] == "warning: GitHub API: check run: HTTP 422: Invalid request"
        assert notes[1] == "GitHub: commented on PR #3"  # the comment does not depend on check runs


def test_api_unreachable_is_a_warning() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    notes = github.notify(
        sample_report(),
        token=TOKEN,
        api_url=f"http://127.0.0.1:{port}",
        repository="acme/app",
        sha=SHA,
        pr=1,
        mode="check-run",
        pr_comment=True,
    )
    assert len(notes) == 1 and notes[0].startswith("warning: GitHub API: repository acme/app: ")
    assert github.notify(
        sample_report(),
        token=TOKEN,
        api_url="ftp://x",
        repository="a/b",
        sha=SHA,
        pr=None,
        mode="status",
        pr_comment=False,
    ) == ["warning: GitHub API: not an http(s) URL: 'ftp://x'"]


def test_run_that_failed_before_any_entry_only_comments() -> None:
    report = RunReport(config="build.yaml", error=ErrorInfo(message="targets: required", file="build.yaml", line=2))
    with FakeGitHub() as gh:
        notes = notify(gh, report, pr=9, pr_comment=True)
    assert notes == ["GitHub: commented on PR #9"]
    assert gh.check_runs == [] and gh.statuses == []
    assert "- **build.yaml** (`build.yaml:2`): targets: required" in gh.comments[0]["body"]


def test_nothing_to_do_makes_no_request() -> None:
    with FakeGitHub() as gh:
        assert notify(gh, mode="none", pr=None, pr_comment=True) == []
        assert notify(gh, mode="none", pr=5, pr_comment=False) == []
        assert gh.requests == []


def test_token_never_in_any_output(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """End to end through the reporter, on a pull request, with every GitHub call failing once in a while."""
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"pull_request": {"number": 12, "head": {"sha": HEAD_SHA}}}))
    out = io.StringIO()
    caplog.set_level(logging.DEBUG)
    all_text = []
    for kwargs in ({}, {"forbid_check_runs": True, "forbid_statuses": True}, {"fail_all": 401}):
        with FakeGitHub(**kwargs) as gh:
            env = {
                "GITHUB_ACTIONS": "true",
                "GITHUB_OUTPUT": str(tmp_path / "output"),
                "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
                "GITHUB_REPOSITORY": "acme/app",
                "GITHUB_SHA": SHA,
                "GITHUB_EVENT_PATH": str(event),
                "GITHUB_REF": "refs/pull/12/merge",
                "GITHUB_SERVER_URL": "https://github.test",
                "GITHUB_RUN_ID": "99",
                "GITHUB_API_URL": gh.url,
            }
            options = ReportOptions(github_token=TOKEN, pr_comment=True)
            reporter = make_reporter("auto", out, env, options)
            assert isinstance(reporter, GitHubReporter)
            reporter.write_interval = 0
            report = sample_report()
            for entry in report.entries:
                reporter.begin_entry(entry, entry.label)
                if entry.error:
                    reporter.annotate_error(entry.error, entry.label)
                reporter.end_entry(entry)
            notes = reporter.finish(report)
            all_text += notes
            all_text += [json.dumps(r.body) for r in gh.requests] + [r.path for r in gh.requests]
            assert {r.authorization for r in gh.requests} <= {f"token {TOKEN}", f"Bearer {TOKEN}"}
            assert gh.requests
            if not kwargs:
                assert {r["head_sha"] for r in gh.check_runs} == {HEAD_SHA}  # the PR head, not the merge commit
                assert {r["details_url"] for r in gh.check_runs} == {"https://github.test/acme/app/actions/runs/99"}
                assert len(gh.comments) == 1
    all_text += [out.getvalue(), (tmp_path / "output").read_text(), (tmp_path / "summary.md").read_text()]
    assert "POST /repos/acme/app/check-runs" in caplog.text  # the HTTP client's debug log was captured
    all_text += [caplog.text, repr(options)]
    assert any("warning: GitHub API" in t for t in all_text)
    for text in all_text:
        assert TOKEN not in text


def test_notes_scrub_the_token_even_if_the_server_echoes_it() -> None:
    with FakeGitHub(fail_all=403) as gh:
        notes = notify(gh, token="Server Error")  # the server's message happens to equal the "token"
    assert notes == ["warning: GitHub API: repository acme/app: HTTP 403: ***"]


# -- environment ---------------------------------------------------------------------------------------------------


def test_pr_number_and_details_url(tmp_path: Path) -> None:
    assert pr_number({}, {"pull_request": {"number": 4}}) == 4
    assert pr_number({"GITHUB_REF": "refs/pull/15/merge"}, {}) == 15
    assert pr_number({"GITHUB_REF": "refs/heads/main"}, {"pull_request": {"number": "x"}}) is None
    assert details_url(
        {"GITHUB_SERVER_URL": "https://github.com/", "GITHUB_REPOSITORY": "a/b", "GITHUB_RUN_ID": "3"}
    ) == ("https://github.com/a/b/actions/runs/3")
    assert details_url({"GITHUB_REPOSITORY": "a/b"}) == ""


def test_missing_repository_is_a_warning() -> None:
    reporter = GitHubReporter(io.StringIO(), {}, ReportOptions(github_token=TOKEN))
    assert reporter.finish(sample_report()) == [
        "warning: GitHub API: GITHUB_REPOSITORY or GITHUB_SHA is not set; nothing reported"
    ]


def test_make_reporter_and_detection() -> None:
    assert detect_provider({"GITHUB_ACTIONS": "true"}) == "github"
    assert detect_provider({"GITLAB_CI": "true"}) == "gitlab"
    assert detect_provider({"CI": "true"}) == ""
    out = io.StringIO()
    assert type(make_reporter("auto", out, {"GITLAB_CI": "true"}, ReportOptions())) is GitLabReporter
    assert type(make_reporter("auto", out, {}, ReportOptions())) is CIReporter
    assert type(make_reporter("none", out, {"GITHUB_ACTIONS": "true"}, ReportOptions())) is CIReporter
    with pytest.raises(ValueError, match="unknown CI reporter"):
        make_reporter("jenkins", out, {}, ReportOptions())
    with pytest.raises(ValueError, match="github_checks"):
        ReportOptions(github_checks="checks")
    assert TOKEN not in repr(ReportOptions(github_token=TOKEN))
