"""The run report rendered for people: the log table and the markdown summary (exact text: both are deterministic)."""

from __future__ import annotations

from imgci.publish import summary
from imgci.publish.report import CacheInfo, EntryReport, ErrorInfo, PushInfo, RunReport

D1 = "sha256:" + "0123456789ab" + "c" * 52
D2 = "sha256:" + "fedcba987654" + "d" * 52


def sample_report() -> RunReport:
    """Four entries: built with a retried push, unchanged (only tagged), failed in a RUN step, cancelled."""
    return RunReport(
        config="ci/build.yaml",
        duration=12.34,
        push=True,
        entries=[
            EntryReport(
                id="app-python-3.11",
                target="app",
                label="app (python=3.11)",
                matrix={"python": "3.11"},
                status="built",
                tags=["ghcr.io/acme/app:3.11", "ghcr.io/acme/app:latest"],
                digest=D1,
                size=12_345_678,
                dockerfile="Dockerfile",
                cache=CacheInfo(hits=5, misses=2),
                build_seconds=10.25,
                pushes=[
                    PushInfo(tag="ghcr.io/acme/app:3.11", ok=True, digest=D1, attempts=2, retries=["HTTP 429"]),
                    PushInfo(
                        tag="ghcr.io/acme/app:latest", ok=True, digest=D1, attempts=2, retries=["connection reset"]
                    ),
                ],
                cache_exports=["ghcr.io/acme/app:cache: 7 layers"],
            ),
            EntryReport(
                id="app-python-3.10",
                target="app",
                label="app (python=3.10)",
                status="unchanged",
                tags=["ghcr.io/acme/app:3.10"],
                digest=D2,
                size=2048,
                pushes=[PushInfo(tag="ghcr.io/acme/app:3.10", ok=True, digest=D2, only_tagged=True)],
            ),
            EntryReport(
                id="app-python-3.12",
                target="app",
                label="app (python=3.12)",
                status="failed",
                tags=["ghcr.io/acme/app:3.12"],
                cache=CacheInfo(hits=1, misses=3),
                build_seconds=3.0,
                error=ErrorInfo(
                    message="RUN pip install | tee log: exit code 1\nERROR: no wheel",
                    hint="pin <pip> & retry",
                    file="docker/Dockerfile",
                    line=12,
                ),
            ),
            EntryReport(id="tools", target="tools", label="tools", status="cancelled", tags=["ghcr.io/acme/tools"]),
        ],
    )


def test_table_text_columns_details_and_totals() -> None:
    text = summary.table_text(sample_report())
    lines = text.splitlines()
    assert lines[0].split() == ["TARGET", "STATUS", "DIGEST", "SIZE", "CACHE", "BUILD", "PUSH"]
    assert lines[1] == "app (python=3.11)  built      sha256:0123456789ab  11.77MiB  5/7    10.2s  ok (3 attempts)"
    assert lines[2] == "app (python=3.10)  unchanged  sha256:fedcba987654  2KiB      -      -      tagged"
    assert lines[3] == "app (python=3.12)  failed     -                    -         1/4    3.0s   -"
    assert lines[4] == "tools              cancelled  -                    -         -      -      -"
    # every column starts at the same offset on every row
    for col in ("STATUS", "DIGEST", "SIZE", "CACHE", "BUILD", "PUSH"):
        start = lines[0].index(col)
        assert all(line[start - 2 : start] == "  " for line in lines[1:5])
    assert f"app (python=3.11): ghcr.io/acme/app:3.11@{D1}" in lines
    assert f"app (python=3.11): ghcr.io/acme/app:latest@{D1}" in lines
    assert f"app (python=3.10): ghcr.io/acme/app:3.10@{D2}" in lines
    assert "app (python=3.11): push retried 2\u00d7 (HTTP 429, connection reset)" in lines
    assert "app (python=3.11): cache: ghcr.io/acme/app:cache: 7 layers" in lines
    assert "app (python=3.12): error: RUN pip install | tee log: exit code 1 (docker/Dockerfile:12)" in lines
    assert "  ERROR: no wheel" in lines
    assert "  hint: pin <pip> & retry" in lines
    assert lines[-1] == "4 entries: 1 built, 1 unchanged, 1 failed, 1 cancelled in 12.3s"
    assert text.endswith("\n")
    assert not any("tools:" in line for line in lines)  # a cancelled entry has nothing to detail


def test_table_text_local_build_shows_stored_tags_and_simple_totals() -> None:
    report = RunReport(
        config="build.yaml",
        duration=1.0,
        entries=[EntryReport(id="a", target="a", label="a", status="built", tags=["app:dev"], digest=D1, size=1)],
    )
    text = summary.table_text(report)
    assert "\na       built   sha256:0123456789ab  1B    -      0.0s   -\n" in text
    assert f"a: app:dev@{D1}\n" in text
    assert text.endswith("1 entry: 1 built, 0 unchanged, 0 failed in 1.0s\n")


def test_table_text_failed_push_and_planned() -> None:
    report = RunReport(
        config="build.yaml",
        dry_run=True,
        entries=[
            EntryReport(
                id="a",
                target="a",
                label="a",
                status="failed",
                digest=D1,
                tags=["r/a:1"],
                pushes=[PushInfo(tag="r/a:1", ok=False, attempts=4, retries=["HTTP 503"] * 3, error="HTTP 503")],
                error=ErrorInfo(message="push r/a:1: HTTP 503", phase="push"),
            ),
            EntryReport(id="b", target="b", label="b", status="planned"),
        ],
    )
    text = summary.table_text(report)
    assert "failed" in text.splitlines()[1].split()[-1]
    assert "a: push failed: r/a:1: HTTP 503" in text
    assert "a: error: push r/a:1: HTTP 503\n" in text  # no location: no parentheses
    assert "a: push retried 3\u00d7 (HTTP 503)" in text
    assert "r/a:1@" not in text  # nothing was published
    assert text.endswith("2 entries: 0 built, 0 unchanged, 1 failed, 1 planned in 0.0s\n")


def test_table_text_config_error_without_entries() -> None:
    report = RunReport(config="build.yaml", error=ErrorInfo(message="targets: required", file="build.yaml", line=3))
    assert summary.table_text(report) == (
        "error: targets: required (build.yaml:3)\n0 entries: 0 built, 0 unchanged, 0 failed in 0.0s\n"
    )


def test_markdown_exact() -> None:
    md = summary.markdown(sample_report())
    assert md == (
        "### imgci: 4 images\n"
        "\n"
        "❌ 1 built, 1 unchanged, 1 failed, 1 cancelled in 12.3s\n"
        "\n"
        "| Target | Status | Tags | Digest | Size | Cache hit rate | Build | Push |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| app (python=3.11) | built | `ghcr.io/acme/app:3.11`<br>`ghcr.io/acme/app:latest` | `sha256:0123456789ab` "
        "| 11.77MiB | 71% | 10.2s | ok (3 attempts) |\n"
        "| app (python=3.10) | unchanged | `ghcr.io/acme/app:3.10` | `sha256:fedcba987654` | 2KiB | - | - | tagged |\n"
        "| app (python=3.12) | failed | `ghcr.io/acme/app:3.12` | - | - | 25% | 3.0s | - |\n"
        "| tools | cancelled | `ghcr.io/acme/tools` | - | - | - | - | - |\n"
        "\n"
        "#### Failures\n"
        "\n"
        "- **app (python=3.12)** (`docker/Dockerfile:12`): "
        "RUN pip install \\| tee log: exit code 1<br>ERROR: no wheel\n"
        "  - hint: pin &lt;pip&gt; &amp; retry\n"
        "\n"
        "#### Push retries\n"
        "\n"
        "- **app (python=3.11)**: retried 2\u00d7 (HTTP 429, connection reset)\n"
    )
    assert summary.markdown(sample_report()) == md  # deterministic


def test_markdown_success_and_escaping_in_cells() -> None:
    report = RunReport(
        config="build.yaml",
        duration=2.0,
        entries=[
            EntryReport(
                id="x",
                target="x",
                label="x | y\nz",
                status="built",
                tags=["r/x:a|b"],
                digest=D1,
                cache=CacheInfo(hits=2, misses=0),
            )
        ],
    )
    md = summary.markdown(report)
    assert md.startswith("### imgci: 1 image\n\n✅ 1 built, 0 unchanged, 0 failed in 2.0s\n")
    row = md.splitlines()[6]
    assert row == "| x \\| y<br>z | built | `r/x:a\\|b` | `sha256:0123456789ab` | - | 100% | 0.0s | - |"
    assert row.replace("\\|", "").count("|") == 9  # eight cells, never more
    assert "Failures" not in md and "Push retries" not in md


def test_markdown_config_error() -> None:
    report = RunReport(
        config="ci/build.yaml", error=ErrorInfo(message="bad", hint="fix it", file="ci/build.yaml", line=4)
    )
    md = summary.markdown(report)
    assert md.startswith("### imgci: 0 images\n\n❌ 0 built")
    assert "| Target |" not in md
    assert "- **ci/build.yaml** (`ci/build.yaml:4`): bad\n  - hint: fix it\n" in md


def test_entry_markdown_for_one_entry() -> None:
    report = sample_report()
    md = summary.entry_markdown(report.entries[0])
    assert md.count("\n| ") == 1  # one row
    assert "#### Push retries" in md
    assert f"- `ghcr.io/acme/app:latest@{D1}`" in md
    failed = summary.entry_markdown(report.entries[2])
    assert "- **app (python=3.12)** (`docker/Dockerfile:12`)" in failed


def test_cell_helpers() -> None:
    assert summary.short_digest("") == "-"
    assert summary.short_digest(D1) == "sha256:0123456789ab"
    entry = EntryReport(id="a", target="a", label="a")
    assert summary.cache_text(entry) == "-" and summary.hit_rate_text(entry) == "-"
    assert summary.push_text(entry) == "-"
    entry.pushes = [PushInfo(tag="t", ok=True), PushInfo(tag="u", ok=True, only_tagged=True)]
    assert summary.push_text(entry) == "ok"
    assert summary.location(ErrorInfo(message="m", file="Dockerfile")) == "Dockerfile"
    assert summary.location(ErrorInfo(message="m", line=3)) == ""
