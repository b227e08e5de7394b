"""GitLab CI reporting (sections, dotenv report, summary artifact, error lines) and the local reporter."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

from imgci.publish import gitlab, summary
from imgci.publish.ci import CIReporter, GitLabReporter, ReportOptions, make_reporter
from imgci.publish.report import EntryReport, ErrorInfo, RunReport
from tests.unit.test_publish_summary import D1, D2, sample_report


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse as GitLab does, and hold the file to GitLab's rules on the way."""
    text = path.read_text()
    assert text.endswith("\n")
    values = {}
    for line in text.splitlines():
        assert line and not line.startswith("#"), "GitLab rejects blank lines and comments"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z0-9_]+", key), line
        assert value == value.strip() and "\r" not in value
        values[key] = value
    return values


def test_sections() -> None:
    start = gitlab.section_start("imgci_App Python-3.11!", "app (python=3.11)", ts=1700000000)
    assert start == "\x1b[0Ksection_start:1700000000:imgci_app_python-3.11_[collapsed=true]\r\x1b[0Kapp (python=3.11)"
    assert gitlab.section_start("a", "t\nu", collapsed=False, ts=5) == "\x1b[0Ksection_start:5:a\r\x1b[0Kt u"
    assert gitlab.section_end("imgci_App Python-3.11!", ts=1700000009) == (
        "\x1b[0Ksection_end:1700000009:imgci_app_python-3.11_\r\x1b[0K"
    )
    assert gitlab.section_name("") == "section"
    m = re.fullmatch(r"\x1b\[0Ksection_start:(\d+):x\[collapsed=true\]\r\x1b\[0Kt", gitlab.section_start("x", "t"))
    assert m and abs(int(m.group(1)) - int(__import__("time").time())) < 5


def test_dotenv_content(tmp_path: Path) -> None:
    path = tmp_path / "imgci.env"
    assert gitlab.write_dotenv(sample_report(), path) == []
    assert path.read_text() == (
        f"IMGCI_APP_PYTHON_3_11_DIGEST={D1}\n"
        "IMGCI_APP_PYTHON_3_11_TAGS=ghcr.io/acme/app:3.11,ghcr.io/acme/app:latest\n"
        f"IMGCI_APP_PYTHON_3_10_DIGEST={D2}\n"
        "IMGCI_APP_PYTHON_3_10_TAGS=ghcr.io/acme/app:3.10\n"
        f"IMGCI_DIGEST={D1}\n"
        "IMGCI_OK=false\n"
    )  # the failed and cancelled entries have no digest
    read_dotenv(path)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644 & ~_umask())
    assert [p.name for p in tmp_path.iterdir()] == ["imgci.env"]  # no temp file left behind


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_dotenv_ok_and_single_line_values(tmp_path: Path) -> None:
    report = RunReport(
        config="b.yaml",
        entries=[
            EntryReport(id="web.v2", target="web", label="web", status="built", digest=D2, tags=["r/w:1\n", "r/w:2"])
        ],
    )
    path = tmp_path / "sub" / "out.env"
    gitlab.write_dotenv(report, path)
    assert read_dotenv(path) == {
        "IMGCI_WEB_V2_DIGEST": D2,
        "IMGCI_WEB_V2_TAGS": "r/w:1,r/w:2",
        "IMGCI_DIGEST": D2,
        "IMGCI_OK": "true",
    }
    empty = RunReport(config="b.yaml", entries=[EntryReport(id="a", target="a", label="a", status="planned")])
    gitlab.write_dotenv(empty, path)  # replaces the earlier file
    assert read_dotenv(path) == {"IMGCI_DIGEST": "", "IMGCI_OK": "true"}


def test_dotenv_warns_about_gitlab_limits_and_clashes(tmp_path: Path) -> None:
    entries = [
        EntryReport(id=f"app-{i}", target="app", label=str(i), status="built", digest=D1, tags=[f"r/{'x' * 400}:{i}"])
        for i in range(12)
    ]
    entries.append(EntryReport(id="app.0", target="app", label="clash", status="built", digest=D2))
    warnings = gitlab.write_dotenv(RunReport(config="b.yaml", entries=entries), tmp_path / "imgci.env")
    assert warnings[0] == "warning: dotenv: entries share variable names (APP_0): the last one wins"
    assert warnings[1].startswith("warning: dotenv: 26 variables; GitLab rejects more than 20")
    assert warnings[2].startswith("warning: dotenv: ") and "GitLab rejects more than 5120" in warnings[2]
    assert read_dotenv(tmp_path / "imgci.env")["IMGCI_APP_0_DIGEST"] == D2


def test_summary_file(tmp_path: Path) -> None:
    path = tmp_path / "imgci-summary.md"
    path.write_text("stale")
    gitlab.write_summary(sample_report(), path)
    assert path.read_text() == summary.markdown(sample_report())


def test_error_line() -> None:
    err = ErrorInfo(message="COPY failed:\nno such file", hint="check .dockerignore", file="Dockerfile", line=12)
    assert gitlab.error_line(err) == "ERROR: Dockerfile:12: COPY failed: no such file (hint: check .dockerignore)"
    assert gitlab.error_line(ErrorInfo(message="boom")) == "ERROR: boom"


def test_reporter_log_lines() -> None:
    out = io.StringIO()
    reporter = make_reporter("gitlab", out, {}, ReportOptions())
    entry = sample_report().entries[2]
    assert entry.error is not None
    reporter.begin_entry(entry, "app (python=3.12)")
    reporter.annotate_error(entry.error, "ignored title")
    reporter.warning("cache export failed")
    reporter.end_entry(entry)
    lines = out.getvalue().split("\n")
    assert re.fullmatch(
        r"\x1b\[0Ksection_start:\d+:imgci_app-python-3\.12\[collapsed=true\]\r\x1b\[0Kapp \(python=3\.12\)", lines[0]
    )
    error = "ERROR: docker/Dockerfile:12: RUN pip install | tee log: exit code 1 ERROR: no wheel"
    assert lines[1] == error + " (hint: pin <pip> & retry)"
    assert lines[2] == "warning: cache export failed"
    assert re.fullmatch(r"\x1b\[0Ksection_end:\d+:imgci_app-python-3\.12\r\x1b\[0K", lines[3])


def test_finish_writes_imgci_env_in_cwd_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    reporter = make_reporter("auto", io.StringIO(), {"GITLAB_CI": "true"}, ReportOptions(github_token="unused"))
    assert isinstance(reporter, GitLabReporter)
    notes = reporter.finish(sample_report())
    assert notes == ["wrote the summary to imgci-summary.md", "wrote the dotenv report to imgci.env"]
    assert read_dotenv(tmp_path / "imgci.env")["IMGCI_DIGEST"] == D1
    assert (tmp_path / "imgci-summary.md").read_text() == summary.markdown(sample_report())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgci-summary.md", "imgci.env"]


def test_finish_explicit_paths(tmp_path: Path) -> None:
    options = ReportOptions(dotenv_file=tmp_path / "build.env", summary_file=tmp_path / "s.md")
    notes = GitLabReporter(io.StringIO(), {}, options).finish(sample_report())
    assert notes == [
        f"wrote the summary to {tmp_path / 's.md'}",
        f"wrote the dotenv report to {tmp_path / 'build.env'}",
    ]


# -- local (no CI) ----------------------------------------------------------------------------------------------


def test_local_reporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    env = {"GITHUB_OUTPUT": str(tmp_path / "gh-out"), "GITHUB_STEP_SUMMARY": str(tmp_path / "gh-summary")}
    reporter = make_reporter("none", out, env, ReportOptions())
    assert type(reporter) is CIReporter and reporter.provider == ""
    entry = sample_report().entries[2]
    assert entry.error is not None
    reporter.begin_entry(entry, "app (python=3.12)")
    reporter.annotate_error(entry.error)
    reporter.warning("slow registry")
    reporter.end_entry(entry)
    assert out.getvalue() == "== app (python=3.12)\nwarning: slow registry\n"
    assert reporter.finish(sample_report()) == []
    assert list(tmp_path.iterdir()) == []  # no default files locally

    options = ReportOptions(summary_file=tmp_path / "s.md", dotenv_file=tmp_path / "e.env", outputs_file=tmp_path / "o")
    notes = make_reporter("none", out, env, options).finish(sample_report())
    assert [n.split(" to ")[0] for n in notes] == [
        "wrote the step outputs",
        "wrote the summary",
        "wrote the dotenv report",
    ]
    assert (tmp_path / "s.md").read_text() == summary.markdown(sample_report())
    assert "digest<<ghadelimiter_" in (tmp_path / "o").read_text()
    assert read_dotenv(tmp_path / "e.env")["IMGCI_OK"] == "false"
