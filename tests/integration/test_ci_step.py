"""The CI step as CI systems run it: ``entrypoint.py`` under a simulated GitHub Actions environment (INPUT_*,
GITHUB_OUTPUT, GITHUB_STEP_SUMMARY, the GitHub API stood in for by FakeGitHub) and ``imgci run`` under a simulated
GitLab CI one, both pushing to the test registry; every output is checked against the registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Imgci
from tests.infra.ciemul import github_actions_env
from tests.infra.client import SimpleRegistryClient, sha256_digest
from tests.infra.fakegithub import FakeGitHub
from tests.infra.registry import RegistryServer
from tests.unit.test_publish_github import parse_outputs

pytestmark = pytest.mark.integration

SHA = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "ghs_secretTokenValue1234567890"

DOCKERFILE = """\
FROM localhost/busybox:latest AS base
RUN echo base > /base.txt

FROM base
ARG FLAVOUR
COPY app.txt /app.txt
RUN test "$FLAVOUR" != broken && echo "$FLAVOUR" > /flavour.txt
"""


def _project(tmp_path: Path, host: str, flavours: list[str], repo: str) -> Path:
    project = tmp_path / "checkout"
    project.mkdir()
    (project / "Dockerfile").write_text(DOCKERFILE)
    (project / "app.txt").write_text("app\n")
    (project / "build.yaml").write_text(
        f"""\
version: 1
defaults:
  push: true
targets:
  app:
    args: {{FLAVOUR: "${{{{ matrix.flavour }}}}"}}
    tags:
      - "{host}/{repo}:${{{{ matrix.flavour }}}}"
      - "{host}/{repo}:${{{{ matrix.flavour }}}}-{{{{short_sha}}}}"
      - "{host}/{repo}:{{{{tag}}}}"
    matrix:
      flavour: {json.dumps(flavours)}
"""
    )
    return project


def _env(cli: Imgci, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in cli.environ().items() if not k.startswith(("GITHUB_", "GITLAB_", "CI_", "INPUT_"))}
    env.update(extra)
    return env


def _github_env(cli: Imgci, tmp_path: Path, project: Path, api: str, **inputs: str) -> dict[str, str]:
    env = _env(cli, **github_actions_env(tmp_path, project, api, SHA))
    env.update({"INPUT_CONFIG": "build.yaml", "INPUT_GITHUB-TOKEN": TOKEN, "INPUT_WORKING-DIRECTORY": str(project)})
    env.update({f"INPUT_{k.upper().replace('_', '-')}": v for k, v in inputs.items()})
    return env


def _entrypoint(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "entrypoint.py")], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _remote(registry: RegistryServer, repo: str, tag: str) -> str:
    body, _ = SimpleRegistryClient(registry.url).get_manifest(repo, tag)
    return sha256_digest(body)


def _no_token_anywhere(*texts: str) -> None:
    """The token appears in no output except the ``::add-mask::`` command, which tells the runner to hide it."""
    for text in texts:
        shown = "\n".join(line for line in text.splitlines() if line != f"::add-mask::{TOKEN}")
        assert TOKEN not in shown


def test_github_action_builds_pushes_and_reports(
    imgci: Imgci, busybox: str, registry: RegistryServer, tmp_path: Path
) -> None:
    project = _project(tmp_path, registry.host, ["a", "b"], "gha/app")
    with FakeGitHub() as gh:
        env = _github_env(imgci, tmp_path, project, gh.url)
        proc = _entrypoint(env, project)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs = list(gh.check_runs)
    assert "Traceback" not in proc.stderr
    meta_text = (project / "imgci-metadata.json").read_text()
    meta = json.loads(meta_text)
    a, b = meta["entries"]
    assert (a["id"], b["id"]) == ("app-a", "app-b")
    # tags: the matrix value, the short sha from GITHUB_SHA; {{tag}} is empty on a branch build, so that tag is dropped
    assert a["tags"] == [f"{registry.host}/gha/app:a", f"{registry.host}/gha/app:a-{SHA[:7]}"]
    for e in (a, b):
        for tag in e["tags"]:
            assert _remote(registry, "gha/app", tag.rsplit(":", 1)[1]) == e["digest"]
    # $GITHUB_OUTPUT: digest, images, metadata
    outputs = parse_outputs((tmp_path / "gh-output").read_text())
    assert outputs["digest"] == a["digest"]
    images = outputs["images"].split(",")
    assert f"{registry.host}/gha/app:b@{b['digest']}" in images and len(images) == 4
    assert json.loads(outputs["metadata"])["entries"][1]["digest"] == b["digest"]
    # the step summary: a table row per entry with its digest
    summary = (tmp_path / "gh-summary.md").read_text()
    assert "app (flavour=a)" in summary and a["digest"][7:19] in summary
    # one log group per entry; a check run per entry on the commit
    assert proc.stdout.count("::group::") == 2 and proc.stdout.count("::endgroup::") == 2
    assert sorted(r["name"] for r in runs) == ["imgci: app (flavour=a)", "imgci: app (flavour=b)"]
    assert all(r["conclusion"] == "success" and r["head_sha"] == SHA for r in runs)
    assert all(r.authorization.endswith(TOKEN) for r in gh.requests)
    _no_token_anywhere(proc.stdout, proc.stderr, meta_text, summary, (tmp_path / "gh-output").read_text())


def test_github_action_annotates_a_failed_run_step(
    imgci: Imgci, busybox: str, registry: RegistryServer, tmp_path: Path
) -> None:
    project = _project(tmp_path, registry.host, ["good", "broken"], "gha/fail")
    with FakeGitHub() as gh:
        env = _github_env(imgci, tmp_path, project, gh.url, keep_going="true")
        proc = _entrypoint(env, project)
        runs = {r["name"]: r["conclusion"] for r in gh.check_runs}
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "::error file=Dockerfile,line=7" in proc.stdout, proc.stdout
    assert runs == {"imgci: app (flavour=good)": "success", "imgci: app (flavour=broken)": "failure"}
    summary = (tmp_path / "gh-summary.md").read_text()
    assert "Dockerfile:7" in summary
    meta = json.loads((project / "imgci-metadata.json").read_text())
    assert [e["status"] for e in meta["entries"]] == ["built", "failed"]
    good_tag = meta["entries"][0]["tags"][0].rsplit(":", 1)[1]
    assert _remote(registry, "gha/fail", good_tag) == meta["entries"][0]["digest"]


def test_github_action_points_at_the_build_yaml_line(imgci: Imgci, tmp_path: Path) -> None:
    project = tmp_path / "checkout"
    project.mkdir()
    (project / "build.yaml").write_text("version: 1\ntargets:\n  app:\n    platforms: linux/amd64\n")
    with FakeGitHub() as gh:
        proc = _entrypoint(_github_env(imgci, tmp_path, project, gh.url), project)
    assert proc.returncode == 2
    assert "::error file=build.yaml,line=4" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr


def test_gitlab_ci_dotenv_sections_and_summary(
    imgci: Imgci, busybox: str, registry: RegistryServer, tmp_path: Path
) -> None:
    project = _project(tmp_path, registry.host, ["a", "b"], "gl/app")
    env = _env(
        imgci,
        GITLAB_CI="true",
        CI="true",
        CI_COMMIT_SHA=SHA,
        CI_COMMIT_SHORT_SHA=SHA[:8],
        CI_COMMIT_TAG="v1.2.3",
        CI_COMMIT_REF_NAME="v1.2.3",
        CI_DEFAULT_BRANCH="main",
        CI_PROJECT_PATH="acme/app",
        CI_PIPELINE_ID="7",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "imgci", "--progress", "plain", "run", "build.yaml"],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = json.loads((project / "imgci-metadata.json").read_text())
    a, b = meta["entries"]
    # on a tag pipeline the {{tag}} tag exists (both entries push it: the last one wins, as in any matrix)
    assert f"{registry.host}/gl/app:v1.2.3" in a["tags"]
    dotenv = dict(line.split("=", 1) for line in (project / "imgci.env").read_text().splitlines() if line)
    assert dotenv["IMGCI_APP_A_DIGEST"] == a["digest"] == _remote(registry, "gl/app", "a")
    assert dotenv["IMGCI_APP_B_DIGEST"] == b["digest"]
    assert dotenv["IMGCI_OK"] == "true"
    assert proc.stdout.count("section_start:") == 2 and proc.stdout.count("section_end:") == 2
    assert "app (flavour=b)" in (project / "imgci-summary.md").read_text()
