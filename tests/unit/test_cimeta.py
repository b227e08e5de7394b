"""CI metadata: GitHub Actions and GitLab CI variables, a real local git repository, no git at all, IMGCI_CI_ overrides
and semver parts as docker/metadata-action computes them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from imgci.cimeta import TEMPLATE_NAMES, CIMeta, detect, semver_parts

SHA = "89abcdef0123456789abcdef0123456789abcdef"


def no_git(args: list[str], cwd: Path) -> str:
    return ""


def github(ref: str, **extra: str) -> dict[str, str]:
    return {
        "GITHUB_ACTIONS": "true",
        "GITHUB_REF": ref,
        "GITHUB_SHA": SHA,
        "GITHUB_REF_NAME": ref.rsplit("/", 1)[-1],
        "GITHUB_REPOSITORY": "Acme/App",
        "GITHUB_RUN_ID": "1001",
        "GITHUB_RUN_NUMBER": "7",
        "GITHUB_EVENT_NAME": "push",
        "GITHUB_SERVER_URL": "https://github.com",
        **extra,
    }


def test_github_push_to_branch(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"repository": {"default_branch": "main"}}))
    meta = detect(github("refs/heads/main", GITHUB_EVENT_PATH=str(event)), tmp_path, git=no_git)
    assert meta.provider == "github"
    assert (meta.branch, meta.tag, meta.pr) == ("main", "", "")
    assert (meta.sha, meta.short_sha) == (SHA, "89abcde")
    assert (meta.repo, meta.run_id, meta.run_number, meta.event) == ("acme/app", "1001", "7", "push")
    assert meta.server_url == "https://github.com"
    assert meta.is_default_branch
    assert meta.values()["latest"] == "latest"


def test_github_default_branch_from_env_then_main(tmp_path: Path) -> None:
    meta = detect(github("refs/heads/trunk", IMGCI_DEFAULT_BRANCH="trunk"), tmp_path, git=no_git)
    assert (meta.default_branch, meta.is_default_branch) == ("trunk", True)
    meta = detect(github("refs/heads/trunk"), tmp_path, git=no_git)
    assert (meta.default_branch, meta.is_default_branch) == ("main", False)
    assert meta.values()["latest"] == ""


def test_github_tag_gives_semver(tmp_path: Path) -> None:
    meta = detect(github("refs/tags/v1.2.3"), tmp_path, git=no_git)
    assert (meta.branch, meta.tag, meta.ref_name) == ("", "v1.2.3", "v1.2.3")
    assert (meta.version, meta.major, meta.minor, meta.patch) == ("1.2.3", "1", "2", "3")
    assert not meta.is_default_branch


def test_github_pull_request_with_event_json(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"pull_request": {"number": 42}, "repository": {"default_branch": "develop"}}))
    env = github(
        "refs/pull/42/merge",
        GITHUB_EVENT_NAME="pull_request",
        GITHUB_HEAD_REF="feature/x",
        GITHUB_REF_NAME="42/merge",
        GITHUB_EVENT_PATH=str(event),
    )
    meta = detect(env, tmp_path, git=no_git)
    assert (meta.pr, meta.branch, meta.sha, meta.default_branch) == ("42", "feature/x", SHA, "develop")
    assert (meta.event, meta.ref_name) == ("pull_request", "42/merge")
    assert meta.values()["latest"] == ""


def test_github_pull_request_target_is_the_pull_request(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"pull_request": {"number": 5}}))
    env = github(
        "refs/heads/main",
        GITHUB_EVENT_NAME="pull_request_target",
        GITHUB_HEAD_REF="fix/z",
        GITHUB_EVENT_PATH=str(event),
    )
    meta = detect(env, tmp_path, git=no_git)
    assert (meta.pr, meta.branch, meta.is_default_branch) == ("5", "fix/z", False)


def test_github_unreadable_event_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "event.json").write_text("{not json")
    meta = detect(github("refs/heads/main", GITHUB_EVENT_PATH=str(tmp_path / "event.json")), tmp_path, git=no_git)
    assert meta.default_branch == "main"


def test_github_missing_sha_falls_back_to_git(tmp_path: Path) -> None:
    env = github("refs/heads/dev")
    del env["GITHUB_SHA"]

    def fake_git(args: list[str], cwd: Path) -> str:
        return {"rev-parse": SHA, "describe": "v9.9.9"}.get(args[0], "")

    meta = detect(env, tmp_path, git=fake_git)
    assert (meta.sha, meta.short_sha) == (SHA, "89abcde")
    assert meta.tag == ""  # the CI named a branch: a tag on the same commit does not make this a tag build


GITLAB = {
    "GITLAB_CI": "true",
    "CI_COMMIT_SHA": SHA,
    "CI_COMMIT_SHORT_SHA": SHA[:8],
    "CI_DEFAULT_BRANCH": "main",
    "CI_PROJECT_PATH": "Group/Sub/Proj",
    "CI_PIPELINE_ID": "555",
    "CI_PIPELINE_IID": "12",
    "CI_SERVER_URL": "https://gitlab.example.com",
}


def test_gitlab_branch(tmp_path: Path) -> None:
    env = {**GITLAB, "CI_COMMIT_BRANCH": "main", "CI_COMMIT_REF_NAME": "main", "CI_PIPELINE_SOURCE": "push"}
    meta = detect(env, tmp_path, git=no_git)
    assert meta.provider == "gitlab"
    assert (meta.branch, meta.tag, meta.pr, meta.short_sha) == ("main", "", "", SHA[:7])
    assert (meta.repo, meta.run_id, meta.run_number, meta.event) == ("group/sub/proj", "555", "12", "push")
    assert meta.server_url == "https://gitlab.example.com"
    assert meta.is_default_branch


def test_gitlab_tag(tmp_path: Path) -> None:
    meta = detect({**GITLAB, "CI_COMMIT_TAG": "2.0.0-rc.1", "CI_COMMIT_REF_NAME": "2.0.0-rc.1"}, tmp_path, git=no_git)
    assert (meta.branch, meta.tag) == ("", "2.0.0-rc.1")
    assert (meta.version, meta.major, meta.minor, meta.patch) == ("2.0.0-rc.1", "", "", "")


def test_gitlab_merge_request(tmp_path: Path) -> None:
    env = {
        **GITLAB,
        "CI_MERGE_REQUEST_IID": "17",
        "CI_MERGE_REQUEST_SOURCE_BRANCH_NAME": "feature/y",
        "CI_PIPELINE_SOURCE": "merge_request_event",
    }
    meta = detect(env, tmp_path, git=no_git)
    assert (meta.pr, meta.branch, meta.event) == ("17", "feature/y", "merge_request_event")
    assert not meta.is_default_branch


def git(repo: Path, *args: str) -> str:
    cmd = [
        "git",
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.com",
        "-c",
        "commit.gpgsign=false",
        "-c",
        "tag.gpgsign=false",
        *args,
    ]
    return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_local_git_repository(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q", "-b", "dev")
    (tmp_path / "f").write_text("x")
    git(tmp_path, "add", "f")
    git(tmp_path, "commit", "-q", "-m", "one")
    git(tmp_path, "remote", "add", "origin", "git@github.com:Acme/Tool.git")
    git(tmp_path, "symbolic-ref", "refs/remotes/origin/HEAD", "refs/remotes/origin/trunk")
    sha = git(tmp_path, "rev-parse", "HEAD")

    meta = detect({}, tmp_path)
    assert meta.provider == "local"
    assert (meta.sha, meta.short_sha, meta.branch, meta.tag) == (sha, sha[:7], "dev", "")
    assert (meta.default_branch, meta.ref_name, meta.repo) == ("trunk", "dev", "acme/tool")

    git(tmp_path, "tag", "-a", "v3.4.5", "-m", "release")
    git(tmp_path, "checkout", "-q", "--detach", "v3.4.5")
    meta = detect({}, tmp_path)
    assert (meta.branch, meta.tag, meta.ref_name, meta.version, meta.major) == ("", "v3.4.5", "v3.4.5", "3.4.5", "3")


def test_local_default_branch_from_env_without_origin(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "f").write_text("x")
    git(tmp_path, "add", "f")
    git(tmp_path, "commit", "-q", "-m", "one")
    assert detect({}, tmp_path).default_branch == "main"
    assert detect({"IMGCI_DEFAULT_BRANCH": "prod"}, tmp_path).default_branch == "prod"


def test_not_a_repository_gives_empty_values(tmp_path: Path) -> None:
    meta = detect({}, tmp_path)
    assert (meta.sha, meta.branch, meta.tag, meta.repo) == ("", "", "", "")
    assert meta.default_branch == "main"


def test_no_git_binary_gives_empty_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    meta = detect({}, tmp_path)
    assert (meta.sha, meta.branch, meta.tag) == ("", "", "")


def test_overrides(tmp_path: Path) -> None:
    env = {**github("refs/heads/main"), "IMGCI_CI_BRANCH": "other", "IMGCI_CI_TAG": "v1.0.0", "IMGCI_CI_MINOR": "9"}
    meta = detect(env, tmp_path, git=no_git)
    assert (meta.branch, meta.tag, meta.version, meta.major, meta.minor) == ("other", "v1.0.0", "1.0.0", "1", "9")
    meta = detect({"IMGCI_CI_SHA": SHA, "IMGCI_CI_PROVIDER": "jenkins"}, tmp_path, git=no_git)
    assert (meta.provider, meta.short_sha) == ("jenkins", "89abcde")


@pytest.mark.parametrize(
    ("tag", "parts"),
    [
        ("v1.2.3", ("1.2.3", "1", "2", "3")),
        ("1.2.3", ("1.2.3", "1", "2", "3")),
        ("v10.0.1+build.5", ("10.0.1+build.5", "10", "0", "1")),
        ("v1.2.3-rc.1", ("1.2.3-rc.1", "", "", "")),
        ("v1.2", ("", "", "", "")),
        ("release-2024", ("", "", "", "")),
        ("v01.2.3", ("", "", "", "")),
        ("", ("", "", "", "")),
    ],
)
def test_semver_parts(tag: str, parts: tuple[str, str, str, str]) -> None:
    assert semver_parts(tag) == parts


def test_values_has_every_template_name() -> None:
    values = CIMeta(branch="main", default_branch="main").values()
    assert tuple(values) == TEMPLATE_NAMES
    assert values["latest"] == "latest"
    assert CIMeta(branch="main", default_branch="main", pr="3").values()["latest"] == ""
