"""remote: ADD of URLs (local http.server) and git repositories (git http-backend over HTTP on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from imgci.build import remote
from imgci.build.copyplan import FromFS, plan_copy
from imgci.build.remote import classify, clone_git, fetch_url, parse_git_ref, redact_url, url_filename
from imgci.errors import BuildError, DigestMismatchError

LAST_MODIFIED = 1_500_000_000
BODY = b"hello from the server\n"


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 running ``handler``; ``requests`` records (method, path, headers)."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FileHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.owner.requests.append((self.command, self.path, dict(self.headers)))  # type: ignore[attr-defined]
        if "missing" in self.path:
            self.send_error(404)
            return
        body = b"x" * 5000 if "big" in self.path else BODY
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if "nodate" not in self.path:
            self.send_header("Last-Modified", formatdate(LAST_MODIFIED, usegmt=True))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http() -> Iterator[Server]:
    server = Server(FileHandler)
    yield server
    server.close()


def test_fetch_url(http: Server, tmp_path: Path) -> None:
    d = fetch_url(f"{http.url}/dl/tool-1.0.tar.gz?token=abc", dest_dir=tmp_path)
    assert d.filename == "tool-1.0.tar.gz" and d.path.read_bytes() == BODY
    assert d.digest == "sha256:" + hashlib.sha256(BODY).hexdigest() and d.size == len(BODY)
    st = d.path.stat()
    assert st.st_mode & 0o7777 == 0o600 and st.st_mtime == LAST_MODIFIED == d.last_modified
    assert fetch_url(f"{http.url}/nodate", dest_dir=tmp_path).last_modified is None


def test_download_as_a_copy_source(http: Server, tmp_path: Path) -> None:
    d = fetch_url(f"{http.url}/files/app.conf", dest_dir=tmp_path)
    with d.fs() as fs:
        entries = {e.info.path: e for e in plan_copy([FromFS(fs, d.filename)], "/etc/", dest_fs=None)}
        conf = entries["etc/app.conf"]
        assert (conf.info.mode, conf.info.mtime, conf.info.uid) == (0o600, LAST_MODIFIED, 0)
        with conf.open() as f:
            assert f.read() == BODY
        assert "renamed" in {e.info.path for e in plan_copy([FromFS(fs, d.filename)], "/renamed", dest_fs=None)}


def test_checksum(http: Server, tmp_path: Path) -> None:
    good = "sha256:" + hashlib.sha256(BODY).hexdigest()
    assert fetch_url(f"{http.url}/f", dest_dir=tmp_path, checksum=good).digest == good
    sha512 = "sha512:" + hashlib.sha512(BODY).hexdigest()
    assert fetch_url(f"{http.url}/f", dest_dir=tmp_path, checksum=sha512).digest == good
    bad = "sha256:" + "0" * 64
    before = set(tmp_path.iterdir())
    with pytest.raises(DigestMismatchError) as info:
        fetch_url(f"http://user:s3cret@127.0.0.1:{http.httpd.server_address[1]}/f", dest_dir=tmp_path, checksum=bad)
    message = str(info.value)
    assert bad in message and good in message and "127.0.0.1" in message and "s3cret" not in message
    assert set(tmp_path.iterdir()) == before  # nothing left behind
    with pytest.raises(BuildError, match="invalid checksum"):
        fetch_url(f"{http.url}/f", dest_dir=tmp_path, checksum="md5:abc")


def test_errors_are_redacted(http: Server, tmp_path: Path) -> None:
    port = http.httpd.server_address[1]
    with pytest.raises(BuildError, match="HTTP 404") as info:
        fetch_url(f"http://me:hunter2@127.0.0.1:{port}/missing", dest_dir=tmp_path)
    assert "hunter2" not in str(info.value) and "xxxxx@127.0.0.1" in str(info.value)
    assert http.requests[-1][2].get("Authorization", "").startswith("Basic ")  # credentials were still used
    with pytest.raises(BuildError, match="failed to download") as info:
        fetch_url("http://me:hunter2@127.0.0.1:1/x", dest_dir=tmp_path, timeout=5)
    assert "hunter2" not in str(info.value)
    with pytest.raises(BuildError, match="byte limit"):
        fetch_url(f"{http.url}/big", dest_dir=tmp_path, max_size=1000)


def test_proxy_environment_is_honoured(http: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", http.url)
    monkeypatch.setenv("http_proxy", http.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    d = fetch_url("http://downloads.example.invalid/pkg.bin", dest_dir=tmp_path)
    assert d.path.read_bytes() == BODY
    assert http.requests[-1][1] == "http://downloads.example.invalid/pkg.bin"  # the proxy saw the absolute URL


def test_url_filename_and_redaction() -> None:
    assert url_filename("https://h/a/b.tgz?x=1#frag") == "b.tgz"
    assert url_filename("https://h/") == url_filename("https://h") == url_filename("https://h/a/..") == "__unnamed__"
    assert redact_url("https://user:pw@h/x") == "https://xxxxx@h/x"
    assert redact_url("https://token@h/x") == "https://xxxxx@h/x"
    assert redact_url("https://h/x") == "https://h/x"


@pytest.mark.parametrize(
    ("src", "kind"),
    [
        ("https://github.com/moby/buildkit.git", "git"),
        ("https://github.com/moby/buildkit.git#v0.10.1:docs", "git"),
        ("git@github.com:moby/buildkit.git", "git"),
        ("git://example.com/repo", "git"),
        ("ssh://git@example.com/repo.git", "git"),
        ("https://example.com/file.tar.gz", "http"),
        ("http://example.com/repo", "http"),
        ("github.com/moby/buildkit", "local"),
        ("./file.git", "local"),
        ("file.txt", "local"),
        ("ftp://example.com/x", "local"),
    ],
)
def test_classify(src: str, kind: str) -> None:
    assert classify(src) == kind


def test_parse_git_ref() -> None:
    ref = parse_git_ref("https://u:p@example.com/r.git#main:sub/dir")
    assert ref is not None and (ref.remote, ref.ref, ref.subdir) == ("https://u:p@example.com/r.git", "main", "sub/dir")
    assert ref.redacted == "https://xxxxx@example.com/r.git"
    ref = parse_git_ref("https://example.com/r.git##ref=v1,subdir=docs")
    assert ref is not None and (ref.ref, ref.subdir) == ("v1", "docs")
    ref = parse_git_ref("https://example.com/r.git?tag=v2&subdir=x&keep-git-dir=1")
    assert ref is not None and (ref.remote, ref.ref, ref.subdir, ref.keep_git_dir) == (
        "https://example.com/r.git",
        "refs/tags/v2",
        "x",
        True,
    )
    ref = parse_git_ref("git@github.com:o/r.git#dev")
    assert ref is not None and (ref.remote, ref.ref) == ("git@github.com:o/r.git", "dev")
    with pytest.raises(BuildError, match="unexpected query"):
        parse_git_ref("https://example.com/r.git?foo=1")


# -- git over smart HTTP ---------------------------------------------------------------------------------------
class GitHandler(BaseHTTPRequestHandler):
    root: str = ""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._cgi()

    def do_POST(self) -> None:
        self._cgi()

    def _cgi(self) -> None:
        self.server.owner.requests.append((self.command, self.path, dict(self.headers)))  # type: ignore[attr-defined]
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": self.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": self.root,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
        }
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=False).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode().split("\r\n"):
            key, _, value = line.partition(": ")
            if key.lower() == "status":
                status = int(value.split()[0])
            elif key:
                headers.append((key, value))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env.update(GIT_COMMITTER_DATE="1600000000 +0000", GIT_AUTHOR_DATE="1600000000 +0000")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    base = tmp_path_factory.mktemp("git")
    work = base / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    (work / "README").write_text("main readme\n")
    (work / "run.sh").write_text("#!/bin/sh\n")
    (work / "run.sh").chmod(0o755)
    (work / "escape").symlink_to("/etc/passwd")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "one")
    first = git(work, "rev-parse", "HEAD")
    git(work, "tag", "v1")
    git(work, "checkout", "-q", "-b", "feature")
    (work / "sub").mkdir()
    (work / "sub" / "only-on-feature.txt").write_text("feature\n")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "two")
    git(work, "checkout", "-q", "main")
    git(base, "clone", "-q", "--bare", str(work), "repo.git")
    git(base / "repo.git", "config", "uploadpack.allowReachableSHA1InWant", "true")
    handler = type("Handler", (GitHandler,), {"root": str(base)})
    server = Server(handler)
    yield server, {"first": first}
    server.close()


def test_clone_branch_and_subdir(git_server: tuple[Server, dict[str, str]], tmp_path: Path) -> None:
    server, _ = git_server
    checkout = clone_git(f"{server.url}/repo.git#feature:sub", dest_dir=tmp_path)
    assert not (checkout.root / ".git").exists()
    with checkout.fs() as fs:
        assert fs.listdir("") == ["only-on-feature.txt"]
        entries = {e.info.path: e for e in plan_copy([FromFS(fs, "/")], "/src", dest_fs=None)}
    assert entries["src/only-on-feature.txt"].info.mode == 0o644


def test_clone_default_branch_tag_and_commit(git_server: tuple[Server, dict[str, str]], tmp_path: Path) -> None:
    server, refs = git_server
    head = clone_git(f"{server.url}/repo.git", dest_dir=tmp_path)
    assert (head.root / "README").read_text() == "main readme\n" and head.commit == refs["first"]
    assert head.commit_time == 1_600_000_000
    with head.fs(mtime="commit") as fs:
        run = fs.lstat("run.sh")
        assert run is not None and run.mode == 0o755 and run.mtime == 1_600_000_000
        assert fs.resolve("escape") is None  # /etc/passwd inside the checkout: not there, never the host's
    tag = clone_git(f"{server.url}/repo.git#v1", dest_dir=tmp_path, keep_git_dir=True)
    assert (tag.root / ".git").is_dir() and tag.commit == refs["first"]
    by_sha = clone_git(f"{server.url}/repo.git#{refs['first']}", dest_dir=tmp_path)
    assert by_sha.commit == refs["first"]
    with pytest.raises(BuildError, match="checksum mismatch"):
        clone_git(f"{server.url}/repo.git?ref=main&checksum=deadbeef", dest_dir=tmp_path)
    assert (
        clone_git(f"{server.url}/repo.git#v1", dest_dir=tmp_path, checksum=refs["first"][:10]).commit == refs["first"]
    )
    with pytest.raises(BuildError, match="checksum mismatch"):
        clone_git(f"{server.url}/repo.git#main", dest_dir=tmp_path, checksum="0" * 40)


def test_clone_credentials_are_sent_but_never_shown(
    git_server: tuple[Server, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = git_server
    port = server.httpd.server_address[1]
    commands: list[list[str]] = []
    real_run = subprocess.run

    def spy(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        commands.append(args)
        return real_run(args, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(remote.subprocess, "run", spy)
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "not-a-repo"))  # an inherited GIT_DIR must not redirect git
    checkout = clone_git(f"http://ci:t0ken@127.0.0.1:{port}/repo.git#main", dest_dir=tmp_path, keep_git_dir=True)
    assert commands and not any("t0ken" in arg for args in commands for arg in args)
    assert any(h.get("Authorization", "").startswith("Basic ") for _, _, h in server.requests)
    assert "t0ken" not in (checkout.root / ".git" / "config").read_text()
    with pytest.raises(BuildError) as info:
        clone_git(f"http://ci:t0ken@127.0.0.1:{port}/repo.git#no-such-branch", dest_dir=tmp_path)
    assert "t0ken" not in str(info.value) and "xxxxx@127.0.0.1" in str(info.value)
    with pytest.raises(BuildError, match="not a directory"):
        clone_git(f"{server.url}/repo.git#main:README", dest_dir=tmp_path).fs()
    with pytest.raises(BuildError, match="outside the repository"):
        clone_git(f"{server.url}/repo.git#main:../x", dest_dir=tmp_path)
    with pytest.raises(BuildError, match="invalid git ref"):
        clone_git(f"{server.url}/repo.git#--upload-pack=touch /tmp/pwned", dest_dir=tmp_path)
