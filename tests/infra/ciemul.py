"""A simulated GitHub Actions job environment (stdlib only; does not import imgci).

``github_actions_env(workdir, workspace, api_url, sha)`` returns the ``GITHUB_*`` variables a job step sees on a
push to ``main`` of ``acme/app``: empty ``GITHUB_OUTPUT`` and ``GITHUB_STEP_SUMMARY`` files and an event JSON
written under ``workdir``, the API at ``api_url`` (a FakeGitHub), plain progress. Tests add INPUT_* and secrets.
"""

from __future__ import annotations

import json
from pathlib import Path


def github_actions_env(workdir: Path, workspace: Path, api_url: str, sha: str) -> dict[str, str]:
    output, summary, event = workdir / "gh-output", workdir / "gh-summary.md", workdir / "gh-event.json"
    output.write_text("")
    summary.write_text("")
    event.write_text(json.dumps({"repository": {"default_branch": "main"}}))
    return {
        "GITHUB_ACTIONS": "true",
        "GITHUB_OUTPUT": str(output),
        "GITHUB_STEP_SUMMARY": str(summary),
        "GITHUB_REPOSITORY": "acme/app",
        "GITHUB_SHA": sha,
        "GITHUB_REF": "refs/heads/main",
        "GITHUB_REF_NAME": "main",
        "GITHUB_EVENT_NAME": "push",
        "GITHUB_EVENT_PATH": str(event),
        "GITHUB_API_URL": api_url,
        "GITHUB_SERVER_URL": "https://github.example",
        "GITHUB_RUN_ID": "42",
        "GITHUB_WORKSPACE": str(workspace),
        "IMGCI_PROGRESS": "plain",
    }
