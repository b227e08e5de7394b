"""A local stand-in for the GitHub REST API, just enough for PyGithub to report check runs, statuses and comments.

Contract:

* ``with FakeGitHub() as gh:`` serves on 127.0.0.1 on a free port; ``gh.url`` is the API base URL
  (``http://127.0.0.1:PORT`` + ``prefix``, e.g. ``prefix="/api/v3"`` as on GitHub Enterprise).
* Routes (any owner/repo): ``GET /repos/{o}/{r}``, ``POST /repos/{o}/{r}/check-runs``,
  ``GET /repos/{o}/{r}/commits/{sha}``, ``POST /repos/{o}/{r}/statuses/{sha}``, ``GET /repos/{o}/{r}/issues/{n}``,
  ``GET|POST /repos/{o}/{r}/issues/{n}/comments`` (pages of ``per_page``, capped by ``page_size``, with ``Link``
  headers) and ``PATCH /repos/{o}/{r}/issues/comments/{id}``. Anything else answers 404.
* Every request is recorded in ``requests`` (method, path, query, JSON body, Authorization header, status);
  created objects are kept in ``check_runs``, ``statuses`` and ``comments`` (a comment edited in place keeps its id).
* Faults: ``forbid_check_runs`` / ``forbid_statuses`` answer 403 ("Resource not accessible by integration") on
  those endpoints; ``fail_all=500`` answers that status to every request.
* Returned objects carry absolute ``url`` fields pointing back at this server, as GitHub's do: PyGithub builds
  its next requests from them. Stdlib only; it does not import imgci.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Response = tuple[int, Any, dict[str, str]]  # status, JSON document, extra headers

FORBIDDEN = {
    "message": "Resource not accessible by integration",
    "documentation_url": "https://docs.github.com/rest",
}
TIMESTAMP = "2024-01-01T00:00:00Z"
BOT = {"login": "github-actions[bot]", "id": 41898282, "type": "Bot"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the prefix and the query string
    query: dict[str, str]
    body: Any  # the decoded JSON body, or None
    authorization: str  # the Authorization header, "" when absent
    status: int


class FakeGitHub:
    def __init__(
        self,
        *,
        prefix: str = "",
        forbid_check_runs: bool = False,
        forbid_statuses: bool = False,
        fail_all: int | None = None,
        page_size: int = 100,
    ) -> None:
        self.prefix = prefix.rstrip("/")
        self.forbid_check_runs = forbid_check_runs
        self.forbid_statuses = forbid_statuses
        self.fail_all = fail_all
        self.page_size = page_size
        self.requests: list[Request] = []
        self.check_runs: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.comments: list[dict[str, Any]] = []  # each with "issue" (its PR/issue number)
        self._lock = threading.Lock()
        self._next_id = 1000
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}{self.prefix}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fakegithub", daemon=True)
        self._thread.start()

    def __enter__(self) -> FakeGitHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- helpers for tests ---------------------------------------------------------------------------------------

    def add_comment(self, repo: str, issue: int, body: str, user: str = "someone") -> dict[str, Any]:
        """Seed an existing comment (``repo`` is ``owner/name``)."""
        with self._lock:
            return self._new_comment(repo, issue, body, {"login": user, "id": 1, "type": "User"})

    def calls(self, method: str, pattern: str) -> list[Request]:
        """Recorded requests with this method whose path matches ``pattern`` (``re.search``)."""
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    # -- state (called with the lock held) -----------------------------------------------------------------------

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _api(self, path: str) -> str:
        return f"{self.url}{path}"

    def _new_comment(self, repo: str, issue: int, body: str, user: dict[str, Any]) -> dict[str, Any]:
        cid = self._id()
        comment = {
            "id": cid,
            "issue": issue,
            "body": body,
            "url": self._api(f"/repos/{repo}/issues/comments/{cid}"),
            "html_url": f"https://github.test/{repo}/pull/{issue}#issuecomment-{cid}",
            "issue_url": self._api(f"/repos/{repo}/issues/{issue}"),
            "user": user,
            "created_at": TIMESTAMP,
            "updated_at": TIMESTAMP,
        }
        self.comments.append(comment)
        return comment

    def _repo(self, owner: str, name: str) -> dict[str, Any]:
        full = f"{owner}/{name}"
        return {
            "id": 1,
            "name": name,
            "full_name": full,
            "private": False,
            "owner": {"login": owner, "id": 2, "type": "Organization", "url": self._api(f"/users/{owner}")},
            "url": self._api(f"/repos/{full}"),
            "html_url": f"https://github.test/{full}",
            "default_branch": "main",
        }

    def _commit(self, repo: str, sha: str) -> dict[str, Any]:
        return {
            "sha": sha,
            "url": self._api(f"/repos/{repo}/commits/{sha}"),
            "html_url": f"https://github.test/{repo}/commit/{sha}",
            "commit": {"message": "test commit", "url": self._api(f"/repos/{repo}/git/commits/{sha}")},
            "parents": [],
            "files": [],
        }

    def _issue(self, repo: str, number: int) -> dict[str, Any]:
        return {
            "id": 5000 + number,
            "number": number,
            "title": f"PR {number}",
            "state": "open",
            "url": self._api(f"/repos/{repo}/issues/{number}"),
            "html_url": f"https://github.test/{repo}/pull/{number}",
            "comments_url": self._api(f"/repos/{repo}/issues/{number}/comments"),
            "comments": sum(1 for c in self.comments if c["issue"] == number),
            "pull_request": {"url": self._api(f"/repos/{repo}/pulls/{number}")},
        }

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> Response:
        """Route one request: (status, JSON document, extra headers)."""
        if self.fail_all:
            return self.fail_all, {"message": "Server Error"}, {}
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                return 404, {"message": "Not Found"}, {}
            path = path[len(self.prefix) :]
        routes: list[tuple[str, str, Callable[..., Response]]] = [
            ("GET", r"/repos/([^/]+)/([^/]+)", self._get_repo),
            ("POST", r"/repos/([^/]+)/([^/]+)/check-runs", self._post_check_run),
            ("GET", r"/repos/([^/]+)/([^/]+)/commits/([^/]+)", self._get_commit),
            ("POST", r"/repos/([^/]+)/([^/]+)/statuses/([^/]+)", self._post_status),
            ("GET", r"/repos/([^/]+)/([^/]+)/issues/(\d+)", self._get_issue),
            ("GET", r"/repos/([^/]+)/([^/]+)/issues/(\d+)/comments", self._list_comments),
            ("POST", r"/repos/([^/]+)/([^/]+)/issues/(\d+)/comments", self._post_comment),
            ("PATCH", r"/repos/([^/]+)/([^/]+)/issues/comments/(\d+)", self._patch_comment),
        ]
        for verb, pattern, fn in routes:
            m = re.fullmatch(pattern, path)
            if m and verb == method:
                with self._lock:
                    return fn(*m.groups(), query=query, body=body)
        return 404, {"message": "Not Found"}, {}

    def _get_repo(self, owner: str, name: str, **_: Any) -> Response:
        return 200, self._repo(owner, name), {}

    def _post_check_run(self, owner: str, name: str, *, body: Any, **_: Any) -> Response:
        if self.forbid_check_runs:
            return 403, FORBIDDEN, {}
        if not isinstance(body, dict) or not body.get("name") or not body.get("head_sha"):
            return 422, {"message": "Invalid request"}, {}
        rid = self._id()
        run = {
            **body,
            "id": rid,
            "url": self._api(f"/repos/{owner}/{name}/check-runs/{rid}"),
            "html_url": f"https://github.test/{owner}/{name}/runs/{rid}",
            "started_at": TIMESTAMP,
            "completed_at": TIMESTAMP,
        }
        self.check_runs.append(run)
        return 201, run, {}

    def _get_commit(self, owner: str, name: str, sha: str, **_: Any) -> Response:
        return 200, self._commit(f"{owner}/{name}", sha), {}

    def _post_status(self, owner: str, name: str, sha: str, *, body: Any, **_: Any) -> Response:
        if self.forbid_statuses:
            return 403, FORBIDDEN, {}
        if not isinstance(body, dict) or body.get("state") not in ("error", "failure", "pending", "success"):
            return 422, {"message": "Validation Failed"}, {}
        if len(body.get("description") or "") > 140:
            return 422, {"message": "Validation Failed: description is too long (maximum is 140 characters)"}, {}
        sid = self._id()
        status = {
            **body,
            "sha": sha,
            "id": sid,
            "url": self._api(f"/repos/{owner}/{name}/statuses/{sha}"),
            "created_at": TIMESTAMP,
            "updated_at": TIMESTAMP,
        }
        self.statuses.append(status)
        return 201, status, {}

    def _get_issue(self, owner: str, name: str, number: str, **_: Any) -> Response:
        return 200, self._issue(f"{owner}/{name}", int(number)), {}

    def _list_comments(self, owner: str, name: str, number: str, *, query: dict[str, str], **_: Any) -> Response:
        comments = [_public(c) for c in self.comments if c["issue"] == int(number)]
        per_page = max(1, min(int(query.get("per_page", "30")), self.page_size))
        page = max(1, int(query.get("page", "1")))
        last = max(1, -(-len(comments) // per_page))
        headers = {}
        base = self._api(f"/repos/{owner}/{name}/issues/{number}/comments")
        links = []
        if page < last:
            links.append(f'<{base}?per_page={per_page}&page={page + 1}>; rel="next"')
            links.append(f'<{base}?per_page={per_page}&page={last}>; rel="last"')
        if page > 1:
            links.append(f'<{base}?per_page={per_page}&page=1>; rel="first"')
            links.append(f'<{base}?per_page={per_page}&page={page - 1}>; rel="prev"')
        if links:
            headers["Link"] = ", ".join(links)
        return 200, comments[(page - 1) * per_page : page * per_page], headers

    def _post_comment(self, owner: str, name: str, number: str, *, body: Any, **_: Any) -> Response:
        if not isinstance(body, dict) or not isinstance(body.get("body"), str):
            return 422, {"message": "Validation Failed"}, {}
        return 201, _public(self._new_comment(f"{owner}/{name}", int(number), body["body"], BOT)), {}

    def _patch_comment(self, owner: str, name: str, cid: str, *, body: Any, **_: Any) -> Response:
        comment = next((c for c in self.comments if c["id"] == int(cid)), None)
        if comment is None:
            return 404, {"message": "Not Found"}, {}
        if not isinstance(body, dict) or not isinstance(body.get("body"), str):
            return 422, {"message": "Validation Failed"}, {}
        comment["body"] = body["body"]
        comment["updated_at"] = "2024-01-02T00:00:00Z"
        return 200, _public(comment), {}


def _public(comment: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in comment.items() if k != "issue"}


def _handler_class(fake: FakeGitHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as PyGithub's requests session expects

        def _serve(self) -> None:
            target = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(target.query))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            status, doc, headers = fake.handle(self.command, target.path, query, body)
            path = target.path[len(fake.prefix) :] if target.path.startswith(fake.prefix) else target.path
            record = Request(self.command, path, query, body, self.headers.get("Authorization", ""), status)
            with fake._lock:
                fake.requests.append(record)
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
