"""What CI run is this? Branch, tag, commit, pull request and semver, from the CI's environment or from git.

Contract: :func:`detect` never fails. It reads GitHub Actions (``GITHUB_ACTIONS=true``) or GitLab CI
(``GITLAB_CI=true``) variables, else asks ``git`` in ``cwd``; a missing ``git`` binary or a directory that is not a
repository gives empty values. Any field can be forced with ``IMGCI_CI_<FIELD>`` (``IMGCI_CI_BRANCH=main``), for
tests and for CI systems we do not know. The values feed the ``{{name}}`` templates of build.yaml
(:meth:`CIMeta.values`).

Semver follows docker/metadata-action: a tag ``v1.2.3-rc.1`` gives ``version=1.2.3-rc.1``; ``major``, ``minor`` and
``patch`` are set for releases only (a pre-release moves no ``:1`` / ``:1.2`` tag), and all four are empty when the
tag is not semver. ``latest`` is ``"latest"`` on the default branch (outside a pull request) and empty elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

#: Runs ``git ARGS`` in a directory and returns its stripped stdout, or "" when git fails or is absent.
GitRunner = Callable[[list[str], Path], str]

TEMPLATE_NAMES = (
    "branch",
    "tag",
    "sha",
    "short_sha",
    "pr",
    "version",
    "major",
    "minor",
    "patch",
    "default_branch",
    "latest",
    "ref_name",
    "run_id",
    "run_number",
    "repo",
    "event",
)

# semver.org's regular expression, with an optional leading v.
_SEMVER = re.compile(
    r"^[vV]?(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
    r"(?:-(?P<pre>(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+(?P<build>[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_GIT_TIMEOUT = 10.0


@dataclass(frozen=True)
class CIMeta:
    """One CI run's metadata; every field is a string, empty when unknown or not applicable."""

    provider: str = "local"  # github | gitlab | local
    branch: str = ""
    tag: str = ""
    sha: str = ""
    short_sha: str = ""
    pr: str = ""
    version: str = ""
    major: str = ""
    minor: str = ""
    patch: str = ""
    default_branch: str = ""
    ref_name: str = ""
    run_id: str = ""
    run_number: str = ""
    repo: str = ""
    event: str = ""
    server_url: str = ""

    @property
    def is_default_branch(self) -> bool:
        return bool(self.branch) and not self.pr and self.branch == self.default_branch

    def values(self) -> dict[str, str]:
        """The ``{{name}}`` template values: every name in :data:`TEMPLATE_NAMES`."""
        out = {name: getattr(self, name) for name in TEMPLATE_NAMES if name != "latest"}
        out["latest"] = "latest" if self.is_default_branch else ""
        return {name: out[name] for name in TEMPLATE_NAMES}


def detect(env: Mapping[str, str] | None = None, cwd: Path | None = None, *, git: GitRunner | None = None) -> CIMeta:
    """The metadata of the current run (see the module docstring). ``env`` defaults to ``os.environ``."""
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    run_git = git or run_git_command
    if env.get("GITHUB_ACTIONS") == "true":
        meta = _github(env)
    elif env.get("GITLAB_CI") == "true":
        meta = _gitlab(env)
    else:
        meta = _local(env, cwd, run_git)
    if meta.provider != "local":
        meta = _git_fallback(meta, cwd, run_git)
    return _derive(meta, _overrides(env))


def semver_parts(tag: str) -> tuple[str, str, str, str]:
    """``(version, major, minor, patch)`` of a git tag; see the module docstring for pre-releases."""
    m = _SEMVER.match(tag)
    if m is None:
        return "", "", "", ""
    version = tag[1:] if tag[:1] in "vV" else tag
    if m.group("pre"):
        return version, "", "", ""
    return version, m.group("major"), m.group("minor"), m.group("patch")


def run_git_command(args: list[str], cwd: Path) -> str:
    """The default :data:`GitRunner`: ``git -c safe.directory=* ARGS`` (CI checkouts often belong to another uid)."""
    exe = shutil.which("git")
    if exe is None:
        return ""
    try:
        proc = subprocess.run(
            [exe, "-c", "safe.directory=*", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _github(env: Mapping[str, str]) -> CIMeta:
    event = read_event(env.get("GITHUB_EVENT_PATH", ""))
    ref = env.get("GITHUB_REF", "")
    branch = tag = pr = ""
    if ref.startswith("refs/heads/"):
        branch = ref.removeprefix("refs/heads/")
    elif ref.startswith("refs/tags/"):
        tag = ref.removeprefix("refs/tags/")
    elif ref.startswith("refs/pull/"):
        pr = ref.removeprefix("refs/pull/").split("/", 1)[0]
        branch = env.get("GITHUB_HEAD_REF", "")
    pull = _dig(event, "pull_request", "number")
    if pull and (pr or env.get("GITHUB_EVENT_NAME", "").startswith("pull_request")):
        pr = pull  # pull_request_target runs on the base branch's ref, but it is still this pull request
    if pr and env.get("GITHUB_HEAD_REF"):
        branch = env["GITHUB_HEAD_REF"]
    default = _dig(event, "repository", "default_branch") or env.get("IMGCI_DEFAULT_BRANCH", "") or "main"
    return CIMeta(
        provider="github",
        branch=branch,
        tag=tag,
        sha=env.get("GITHUB_SHA", ""),
        pr=pr,
        default_branch=default,
        ref_name=env.get("GITHUB_REF_NAME", ""),
        run_id=env.get("GITHUB_RUN_ID", ""),
        run_number=env.get("GITHUB_RUN_NUMBER", ""),
        repo=env.get("GITHUB_REPOSITORY", "").lower(),
        event=env.get("GITHUB_EVENT_NAME", ""),
        server_url=env.get("GITHUB_SERVER_URL", ""),
    )


def _gitlab(env: Mapping[str, str]) -> CIMeta:
    pr = env.get("CI_MERGE_REQUEST_IID", "")
    branch = env.get("CI_COMMIT_BRANCH", "") or (env.get("CI_MERGE_REQUEST_SOURCE_BRANCH_NAME", "") if pr else "")
    return CIMeta(
        provider="gitlab",
        branch=branch,
        tag=env.get("CI_COMMIT_TAG", ""),
        sha=env.get("CI_COMMIT_SHA", ""),
        short_sha=env.get("CI_COMMIT_SHORT_SHA", ""),
        pr=pr,
        default_branch=env.get("CI_DEFAULT_BRANCH", "") or env.get("IMGCI_DEFAULT_BRANCH", "") or "main",
        ref_name=env.get("CI_COMMIT_REF_NAME", ""),
        run_id=env.get("CI_PIPELINE_ID", ""),
        run_number=env.get("CI_PIPELINE_IID", ""),
        repo=env.get("CI_PROJECT_PATH", "").lower(),
        event=env.get("CI_PIPELINE_SOURCE", ""),
        server_url=env.get("CI_SERVER_URL", ""),
    )


def _local(env: Mapping[str, str], cwd: Path, git: GitRunner) -> CIMeta:
    sha = git(["rev-parse", "HEAD"], cwd)
    branch = git(["symbolic-ref", "--short", "-q", "HEAD"], cwd)
    tag = git(["describe", "--tags", "--exact-match"], cwd) if sha else ""
    origin_head = git(["symbolic-ref", "refs/remotes/origin/HEAD"], cwd) if sha else ""
    default = origin_head.removeprefix("refs/remotes/origin/") or env.get("IMGCI_DEFAULT_BRANCH", "") or "main"
    remote = git(["config", "--get", "remote.origin.url"], cwd) if sha else ""
    return CIMeta(
        provider="local",
        branch=branch,
        tag=tag,
        sha=sha,
        default_branch=default,
        ref_name=tag or branch,
        repo=_repo_from_url(remote),
    )


def _git_fallback(meta: CIMeta, cwd: Path, git: GitRunner) -> CIMeta:
    """Fill what the CI left empty from git. Branch and tag only when the CI named no ref at all, so that a branch
    build of a commit that happens to carry a tag does not also become a tag build."""
    changes: dict[str, str] = {}
    if not meta.sha:
        changes["sha"] = git(["rev-parse", "HEAD"], cwd)
    if not (meta.branch or meta.tag or meta.pr):
        changes["branch"] = git(["symbolic-ref", "--short", "-q", "HEAD"], cwd)
        changes["tag"] = git(["describe", "--tags", "--exact-match"], cwd)
        changes["ref_name"] = meta.ref_name or changes["tag"] or changes["branch"]
    return replace(meta, **changes) if changes else meta


def _overrides(env: Mapping[str, str]) -> dict[str, str]:
    names = {f.name for f in fields(CIMeta)}
    out: dict[str, str] = {}
    for key, value in env.items():
        if key.startswith("IMGCI_CI_"):
            name = key.removeprefix("IMGCI_CI_").lower()
            if name in names:
                out[name] = value
    return out


def _derive(meta: CIMeta, overrides: dict[str, str]) -> CIMeta:
    """Apply ``IMGCI_CI_*`` then compute short_sha and the semver parts unless they were forced."""
    meta = replace(meta, **overrides)
    changes: dict[str, str] = {}
    if "short_sha" not in overrides and meta.sha:
        changes["short_sha"] = meta.sha[:7]  # 7 everywhere, although GitLab's CI_COMMIT_SHORT_SHA has 8
    parts = dict(zip(("version", "major", "minor", "patch"), semver_parts(meta.tag), strict=True))
    changes.update({k: v for k, v in parts.items() if k not in overrides})
    return replace(meta, **changes)


def read_event(path: str) -> dict[str, Any]:
    """The GitHub Actions event JSON at ``path`` (``GITHUB_EVENT_PATH``); {} when absent or unreadable."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _dig(data: Any, *keys: str) -> str:
    for key in keys:
        if not isinstance(data, dict):
            return ""
        data = data.get(key)
    return "" if data is None or isinstance(data, dict | list) else str(data)


def _repo_from_url(url: str) -> str:
    """``owner/name`` (lower-case) from an https or scp-like git remote URL; "" when it has no two components."""
    path = re.sub(r"^[a-z+]+://[^/]+/", "", url.strip())  # https://host/owner/name.git
    path = re.sub(r"^[^/:]+@[^/:]+:", "", path)  # git@host:owner/name.git
    parts = [p for p in path.removesuffix(".git").split("/") if p]
    return "/".join(parts[-2:]).lower() if len(parts) >= 2 else ""
