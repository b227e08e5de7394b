"""Transport and client edge cases against a tiny in-process HTTP server on 127.0.0.1.

The real registry (tests/integration) proves the happy paths; this fake makes the awkward answers on purpose:
Retry-After in both forms, redirects to another host, dropped bodies, 416s, OCI error bodies, pagination.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from imgci.errors import (
    AuthenticationError,
    AuthorizationError,
    DigestMismatchError,
    RegistryError,
    RegistryNotFoundError,
    RegistryProtocolError,
)
from imgci.oci import OCI_MANIFEST, Descriptor, Digest
from imgci.reference import Reference
from imgci.reference import parse as parse_reference
from imgci.registry.client import RegistryClient
from imgci.registry.credentials import Credentials
from imgci.registry.retry import RetryPolicy, parse_retry_after
from imgci.registry.transport import Transport


@dataclass
class Req:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Resp:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    drop_after: int | None = None  # send the full Content-Length header, then only this many bytes, then close


Handler = Callable[[Req], Resp]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-answer is what these tests do on purpose


class FakeServer:
    """A threaded HTTP/1.1 server whose every answer comes from ``handler``; records every request."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Req] = []
        self._lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                req = Req(self.command, self.path, {k: v for k, v in self.headers.items()}, self._body())
                with outer._lock:
                    outer.requests.append(req)
                resp = outer.handler(req)
                self.send_response(resp.status)
                headers = {"Content-Length": str(len(resp.body)), **resp.headers}
                for k, v in headers.items():
                    self.send_header(k, v)
                if resp.drop_after is not None:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command == "HEAD":
                    return
                if resp.drop_after is not None:
                    self.wfile.write(resp.body[: resp.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(resp.body)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.httpd = _QuietServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def matching(self, method: str, pattern: str) -> list[Req]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], FakeServer]]:
    servers: list[FakeServer] = []

    def start(handler: Handler) -> FakeServer:
        s = FakeServer(handler)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


FAST = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.02, max_retry_after=5.0, max_elapsed=30.0)
ANON = Credentials()
DIGEST = Digest.of(b"blob")


def client(server: FakeServer, sleeps: Sleeps | None = None, **kw: Any) -> RegistryClient:
    kw.setdefault("credentials", ANON)
    kw.setdefault("retry", FAST)
    return RegistryClient(server.host, sleep=sleeps if sleeps is not None else Sleeps(), timeout=(5, 5), **kw)


def v2_ok(req: Req) -> Resp | None:
    return Resp(200, {"Docker-Distribution-API-Version": "registry/2.0"}) if req.path == "/v2/" else None


def oci_error(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()


class Hasher:
    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.data = b""

    def write(self, b: bytes) -> None:
        self.h.update(b)
        self.data += b


# -- Retry-After and retries ------------------------------------------------------------------------------------
def test_parse_retry_after_both_forms() -> None:
    assert parse_retry_after("7") == 7.0
    now = time.time()
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1.5)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_and_503_are_retried_honouring_retry_after(serve: Any, form: str) -> None:
    answers = iter([429, 503, 200])

    def handler(req: Req) -> Resp:
        if (r := v2_ok(req)) is not None:
            return r
        status = next(answers)
        after = "3" if form == "seconds" else formatdate(time.time() + 3, usegmt=True)
        return Resp(status, {"Retry-After": after}) if status != 200 else Resp(200, {}, b'{"tags":["a"]}')

    server = serve(handler)
    sleeps = Sleeps()
    assert client(server, sleeps).list_tags("team/app") == ["a"]
    assert len(sleeps) == 2
    assert all(2.0 <= s <= 3.0 for s in sleeps), sleeps


def test_retry_after_is_capped(serve: Any) -> None:
    answers = iter([503, 200])
    server = serve(lambda req: v2_ok(req) or (Resp(next(answers), {"Retry-After": "86400"}, b'{"tags":[]}')))
    sleeps = Sleeps()
    client(server, sleeps).list_tags("x")
    assert sleeps == [FAST.max_retry_after]


def test_persistent_500_names_registry_repository_digest_and_attempts(serve: Any) -> None:
    server = serve(lambda req: v2_ok(req) or Resp(500, {}, oci_error("UNKNOWN", "storage backend exploded")))
    with pytest.raises(RegistryError) as exc:
        client(server).blob_exists("team/app", DIGEST)
    msg = str(exc.value)
    assert server.host in msg and "team/app" in msg and DIGEST.value in msg
    assert "gave up after 4 attempts" in msg
    assert "HTTP 500" in msg and "UNKNOWN: storage backend exploded" not in msg  # HEAD has no body...
    assert exc.value.temporary and exc.value.status == 500
    assert len(server.matching("HEAD", "/blobs/")) == 4


def test_oci_error_body_becomes_the_message(serve: Any) -> None:
    server = serve(lambda req: v2_ok(req) or Resp(500, {}, oci_error("UNKNOWN", "storage backend exploded")))
    with pytest.raises(RegistryError, match=r"UNKNOWN: storage backend exploded.*gave up after 4 attempts"):
        client(server).list_tags("team/app")


def test_total_time_bounds_the_retries(serve: Any) -> None:
    server = serve(lambda req: v2_ok(req) or Resp(503, {"Retry-After": "4"}))
    policy = RetryPolicy(attempts=10, max_elapsed=1.0, max_retry_after=4.0)
    sleeps = Sleeps()
    with pytest.raises(RegistryError, match="gave up after 1 attempt"):
        client(server, sleeps, retry=policy).list_tags("x")
    assert sleeps == []  # a 4 s wait would overrun the 1 s budget: stop instead of sleeping


def test_client_errors_are_not_retried(serve: Any) -> None:
    server = serve(lambda req: v2_ok(req) or Resp(400, {}, oci_error("NAME_INVALID", "invalid repository name")))
    with pytest.raises(RegistryError, match="NAME_INVALID") as exc:
        client(server).list_tags("x")
    assert not exc.value.temporary
    assert len(server.matching("GET", "/tags/")) == 1


def test_404_is_not_found(serve: Any) -> None:
    server = serve(lambda req: v2_ok(req) or Resp(404, {}, oci_error("MANIFEST_UNKNOWN", "manifest unknown")))
    with pytest.raises(RegistryNotFoundError, match="MANIFEST_UNKNOWN"):
        client(server).get_manifest(Reference(server.host, "team/app", "v1"))


def test_connection_refused_is_retried_then_reported(serve: Any) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    sleeps = Sleeps()
    c = RegistryClient(f"127.0.0.1:{port}", credentials=ANON, retry=FAST, sleep=sleeps)
    with pytest.raises(RegistryError, match=r"connection refused.*gave up after 4 attempts") as exc:
        c.list_tags("x")
    assert exc.value.temporary
    assert len(sleeps) == 3


# -- bodies -----------------------------------------------------------------------------------------------------
def _flaky_puts(times: int) -> Callable[[Req], Resp]:
    count = {"n": 0}

    def handler(req: Req) -> Resp:
        if (r := v2_ok(req)) is not None:
            return r
        count["n"] += 1
        return Resp(503) if count["n"] <= times else Resp(201)

    return handler


def test_file_body_is_rewound_to_its_start_for_each_attempt(serve: Any) -> None:
    server = serve(_flaky_puts(2))
    t = Transport(server.host, credentials=ANON, retry=FAST, sleep=Sleeps())
    f = io.BytesIO(b"HEADERpayload")
    f.seek(6)
    t.request("PUT", "/v2/x/upload", op=_op(), body=f, ok=(201,))
    puts = server.matching("PUT", "/upload")
    assert [r.body for r in puts] == [b"payload"] * 3


def test_bytes_body_is_resent(serve: Any) -> None:
    server = serve(_flaky_puts(1))
    t = Transport(server.host, credentials=ANON, retry=FAST, sleep=Sleeps())
    t.request("PUT", "/v2/x/upload", op=_op(), body=b"abc", ok=(201,))
    assert [r.body for r in server.matching("PUT", "/upload")] == [b"abc", b"abc"]


def test_stream_body_is_never_replayed(serve: Any) -> None:
    server = serve(_flaky_puts(5))
    t = Transport(server.host, credentials=ANON, retry=FAST, sleep=Sleeps())

    def gen() -> Iterator[bytes]:
        yield b"once"

    with pytest.raises(RegistryError, match="not retried: the request body cannot be sent again"):
        t.request("PUT", "/v2/x/upload", op=_op(), body=gen(), ok=(201,))
    assert len(server.matching("PUT", "/upload")) == 1


def _op() -> Any:
    from imgci.registry.responses import Operation

    return Operation("upload to", "x")


# -- redirects and credentials ----------------------------------------------------------------------------------
SECRET = "s3cr3t-pa55"


def basic_registry(inner: Handler, user: str = "alice", password: str = SECRET) -> Handler:
    import base64

    good = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def handler(req: Req) -> Resp:
        if req.headers.get("Authorization") != good:
            return Resp(
                401, {"WWW-Authenticate": 'Basic realm="fake"'}, oci_error("UNAUTHORIZED", "authentication required")
            )
        return inner(req)

    return handler


def test_blob_redirect_to_another_host_drops_authorization(serve: Any, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    data = b"layer bytes"
    desc = Descriptor("", Digest.of(data), len(data))
    storage = serve(lambda req: Resp(200, {}, data))
    registry = serve(
        basic_registry(lambda req: v2_ok(req) or Resp(307, {"Location": f"{storage.url}/bucket/blob?sig=abc"}))
    )
    sink = Hasher()
    c = client(registry, credentials=Credentials("alice", SECRET))
    assert c.fetch_blob("team/app", desc, sink) == len(data)
    assert sink.data == data
    assert any("Authorization" in r.headers for r in registry.requests)
    assert storage.requests and all("Authorization" not in r.headers for r in storage.requests)
    assert SECRET not in caplog.text and "Basic " not in caplog.text


def test_wrong_credentials_say_run_imgci_login(serve: Any, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    server = serve(basic_registry(lambda req: Resp(200)))
    with pytest.raises(AuthenticationError) as exc:
        client(server, credentials=Credentials("alice", "wrong-password")).list_tags("team/app")
    assert exc.value.hint == f"run `imgci login {server.host}`"
    assert "as alice" in str(exc.value) and "wrong-password" not in str(exc.value)
    assert "wrong-password" not in caplog.text


def test_403_is_authorization_error(serve: Any) -> None:
    server = serve(
        lambda req: v2_ok(req) or Resp(403, {}, oci_error("DENIED", "requested access to the resource is denied"))
    )
    with pytest.raises(AuthorizationError, match="DENIED"):
        client(server).put_manifest("team/app", "v1", b"{}", OCI_MANIFEST)


def test_bearer_token_is_fetched_once_and_reused(serve: Any) -> None:
    token_hits: list[Req] = []

    def token(req: Req) -> Resp:
        token_hits.append(req)
        return Resp(
            200, {"Content-Type": "application/json"}, json.dumps({"token": "tok-123", "expires_in": 300}).encode()
        )

    issuer = serve(token)

    def registry_handler(req: Req) -> Resp:
        challenge = {"WWW-Authenticate": f'Bearer realm="{issuer.url}/token",service="fake"'}
        if req.headers.get("Authorization") != "Bearer tok-123":
            return Resp(401, challenge)
        return Resp(200, {}, b'{"tags":["v1"]}')

    server = serve(registry_handler)
    c = client(server, credentials=Credentials("alice", SECRET))
    assert c.list_tags("team/app") == ["v1"]
    assert c.list_tags("team/app") == ["v1"]
    assert len(token_hits) == 1
    assert "scope=repository%3Ateam%2Fapp%3Apull" in token_hits[0].path
    assert token_hits[0].headers["Authorization"].startswith("Basic ")
    # the token server's host never sees the registry token, the registry never sees the password
    assert all(SECRET not in json.dumps(r.headers) for r in server.requests)


def test_warm_up_probes_and_gets_the_push_token_ahead_of_the_first_request(serve: Any) -> None:
    token_hits: list[Req] = []

    def token(req: Req) -> Resp:
        token_hits.append(req)
        return Resp(200, {}, json.dumps({"token": "tok-push", "expires_in": 300}).encode())

    issuer = serve(token)

    def registry_handler(req: Req) -> Resp:
        if req.headers.get("Authorization") != "Bearer tok-push":
            return Resp(401, {"WWW-Authenticate": f'Bearer realm="{issuer.url}/token",service="fake"'})
        return Resp(404, {}, oci_error("MANIFEST_UNKNOWN", "no such manifest"))

    server = serve(registry_handler)
    c = client(server, credentials=Credentials("alice", SECRET))
    c.warm_up("team/app", push=True)
    assert [r.path for r in server.requests] == ["/v2/"]  # the probe, nothing else
    assert len(token_hits) == 1 and "scope=repository%3Ateam%2Fapp%3Apull%2Cpush" in token_hits[0].path
    assert c.head_manifest(parse_reference(f"{server.host}/team/app:1"), push=True) is None
    # the push's first request went out with the token already: no second probe, no second token, no 401 first
    assert [r.method for r in server.requests] == ["GET", "HEAD"]
    assert server.requests[1].headers["Authorization"] == "Bearer tok-push"
    assert len(token_hits) == 1


def test_warm_up_failing_is_silent_once_and_remembers_nothing(serve: Any) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    sleeps = Sleeps()
    c = RegistryClient(f"127.0.0.1:{port}", credentials=ANON, retry=FAST, sleep=sleeps)
    c.warm_up("x", push=True)  # no exception, no retries (no sleeps)
    assert sleeps == []
    with pytest.raises(RegistryError, match=r"connection refused.*gave up after 4 attempts"):
        c.list_tags("x")  # the real request meets the failure itself, with its own retries
    assert len(sleeps) == 3


def test_identity_token_uses_oauth2_refresh_grant(serve: Any) -> None:
    seen: list[Req] = []

    def token(req: Req) -> Resp:
        seen.append(req)
        return Resp(200, {}, json.dumps({"access_token": "tok-9"}).encode())

    issuer = serve(token)

    def registry_handler(req: Req) -> Resp:
        if req.headers.get("Authorization") != "Bearer tok-9":
            return Resp(401, {"WWW-Authenticate": f'Bearer realm="{issuer.url}/token",service="svc"'})
        return Resp(200, {}, b'{"tags":[]}')

    server = serve(registry_handler)
    client(server, credentials=Credentials(identity_token="refresh-me")).list_tags("team/app")
    assert seen[0].method == "POST"
    form = dict(p.split("=", 1) for p in seen[0].body.decode().split("&"))
    assert form["grant_type"] == "refresh_token" and form["refresh_token"] == "refresh-me"
    assert form["service"] == "svc" and "Authorization" not in seen[0].headers


# -- manifests --------------------------------------------------------------------------------------------------
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}).encode()


def test_get_manifest_sends_accept_and_verifies_header_digest(serve: Any) -> None:
    def handler(req: Req) -> Resp:
        return v2_ok(req) or Resp(
            200, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": Digest.of(MANIFEST).value}, MANIFEST
        )

    server = serve(handler)
    got = client(server).get_manifest(Reference(server.host, "team/app", "v1"))
    assert got.raw == MANIFEST and got.media_type == OCI_MANIFEST and got.digest == Digest.of(MANIFEST)
    accept = server.matching("GET", "/manifests/")[0].headers["Accept"]
    for mt in ("image.index.v1", "manifest.list.v2", "image.manifest.v1", "distribution.manifest.v2"):
        assert mt in accept


def test_get_manifest_rejects_a_lying_digest_header(serve: Any) -> None:
    wrong = Digest.of(b"something else").value
    server = serve(lambda req: v2_ok(req) or Resp(200, {"Docker-Content-Digest": wrong}, MANIFEST))
    with pytest.raises(DigestMismatchError, match="Docker-Content-Digest"):
        client(server).get_manifest(Reference(server.host, "team/app", "v1"))


def test_get_manifest_by_digest_verifies_the_content(serve: Any) -> None:
    server = serve(lambda req: v2_ok(req) or Resp(200, {}, MANIFEST))
    pinned = Digest.of(b"what I asked for")
    with pytest.raises(DigestMismatchError, match="requested digest"):
        client(server).get_manifest(Reference(server.host, "team/app", None, pinned))


def test_get_manifest_refuses_huge_documents(serve: Any) -> None:
    server = serve(lambda req: v2_ok(req) or Resp(200, {}, b"{" + b" " * 5000 + b"}"))
    with pytest.raises(RegistryProtocolError, match="larger than 4096 bytes"):
        client(server, max_manifest_size=4096).get_manifest(Reference(server.host, "team/app", "v1"))


# -- blob download resume ---------------------------------------------------------------------------------------
BLOB = bytes(range(256)) * 400  # 102400 bytes


def _ranged(req: Req, honour_range: bool = True) -> Resp:
    m = re.match(r"bytes=(\d+)-", req.headers.get("Range", ""))
    if m and honour_range:
        start = int(m.group(1))
        return Resp(206, {"Content-Range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"}, BLOB[start:])
    return Resp(200, {"Accept-Ranges": "bytes"}, BLOB)


@pytest.mark.parametrize("honour_range", [True, False])
def test_dropped_download_resumes(serve: Any, honour_range: bool) -> None:
    calls = {"n": 0}

    def handler(req: Req) -> Resp:
        if (r := v2_ok(req)) is not None:
            return r
        calls["n"] += 1
        resp = _ranged(req, honour_range)
        if calls["n"] == 1:
            resp.drop_after = 70000  # past the first 64 KiB read: some bytes are written before the drop
        return resp

    server = serve(handler)
    sink = Hasher()
    desc = Descriptor("", Digest.of(BLOB), len(BLOB))
    assert client(server).fetch_blob("team/app", desc, sink) == len(BLOB)
    assert sink.data == BLOB
    gets = server.matching("GET", "/blobs/")
    assert len(gets) == 2
    assert "Range" not in gets[0].headers
    assert re.match(r"bytes=\d+-$", gets[1].headers["Range"])


def test_download_longer_than_declared_is_refused(serve: Any) -> None:
    server = serve(lambda req: v2_ok(req) or Resp(200, {}, BLOB))
    desc = Descriptor("", Digest.of(BLOB), 1000)
    with pytest.raises(DigestMismatchError, match="more than the declared 1000 bytes"):
        client(server).fetch_blob("team/app", desc, Hasher())


# -- uploads ----------------------------------------------------------------------------------------------------
class FakeUploads:
    """Enough of the upload protocol to test chunking, 416 recovery and foreign upload locations."""

    def __init__(self, location_base: str = "") -> None:
        self.data = b""
        self.location_base = location_base
        self.fail_patch_at: set[int] = set()
        self.refuse_416_once = False
        self.final: bytes | None = None

    def __call__(self, req: Req) -> Resp:
        if (r := v2_ok(req)) is not None:
            return r
        loc = {"Location": f"{self.location_base}/v2/team/app/blobs/uploads/u1?_state=s"}
        rng = {"Range": f"0-{max(0, len(self.data) - 1)}"}
        if req.method == "POST":
            self.data = b""
            return Resp(202, loc)
        if req.method == "GET":
            return Resp(204, {**loc, **rng})
        if req.method == "PATCH":
            start, _end = map(int, req.headers["Content-Range"].split("-"))
            if start != len(self.data) or self.refuse_416_once:
                self.refuse_416_once = False
                return Resp(416, {**loc, **rng})
            if start in self.fail_patch_at:
                self.fail_patch_at.discard(start)
                self.data += req.body[: len(req.body) // 2]  # half arrived before the connection broke
                return Resp(502)
            self.data += req.body
            return Resp(202, {**loc, "Range": f"0-{len(self.data) - 1}"})
        if req.method == "PUT":
            assert "digest=sha256" in req.path
            self.final = self.data + req.body
            return Resp(201)
        if req.method == "HEAD":
            return Resp(404)
        return Resp(405)


def test_chunked_upload_recovers_from_a_broken_chunk_and_a_416(serve: Any) -> None:
    fake = FakeUploads()
    fake.fail_patch_at = {4096}
    server = serve(fake)
    data = bytes(range(256)) * 64  # 16 KiB
    desc = Descriptor("", Digest.of(data), len(data))
    c = client(server, chunk_threshold=1024, chunk_size=4096)
    reports: list[int] = []
    c.upload_blob("team/app", desc, lambda: io.BytesIO(data), progress=reports.append)
    assert fake.final == data
    ranges = [r.headers["Content-Range"] for r in server.matching("PATCH", "")]
    assert ranges[0] == "0-4095" and ranges[1] == "4096-8191"
    assert ranges[2] == "6144-10239"  # resumed where the registry said it stood, not where the chunk began
    assert server.matching("GET", "/uploads/")  # the status query
    assert reports[-1] == len(data)

    fake2 = FakeUploads()
    fake2.refuse_416_once = True
    server2 = serve(fake2)
    client(server2, chunk_threshold=1024, chunk_size=4096).upload_blob("team/app", desc, lambda: io.BytesIO(data))
    assert fake2.final == data


def test_upload_location_on_another_host_gets_no_credentials(serve: Any) -> None:
    storage_fake = FakeUploads()
    storage = serve(storage_fake)
    front_fake = FakeUploads(location_base=storage.url)
    front = serve(basic_registry(front_fake))
    data = b"x" * 3000
    desc = Descriptor("", Digest.of(data), len(data))
    client(front, credentials=Credentials("alice", SECRET)).upload_blob("team/app", desc, lambda: io.BytesIO(data))
    assert storage_fake.final == data
    assert storage.requests and all("Authorization" not in r.headers for r in storage.requests)


def test_monolithic_upload_restarts_after_a_failed_put(serve: Any) -> None:
    fake = FakeUploads()
    puts = {"n": 0}

    def handler(req: Req) -> Resp:
        if req.method == "PUT":
            puts["n"] += 1
            if puts["n"] == 1:
                return Resp(404, {}, oci_error("BLOB_UPLOAD_UNKNOWN", "blob upload unknown"))
        return fake(req)

    server = serve(handler)
    data = b"y" * 500
    desc = Descriptor("", Digest.of(data), len(data))
    client(server).upload_blob("team/app", desc, lambda: io.BytesIO(data))
    assert fake.final == data
    assert len(server.matching("POST", "/uploads/")) == 2


# -- tags -------------------------------------------------------------------------------------------------------
def test_list_tags_follows_link_pagination(serve: Any) -> None:
    def handler(req: Req) -> Resp:
        if (r := v2_ok(req)) is not None:
            return r
        if "last=b" in req.path:
            return Resp(200, {}, b'{"name":"x","tags":["c"]}')
        link = '</v2/x/tags/list?n=2&last=b>; rel="next"'
        return Resp(200, {"Link": link}, b'{"name":"x","tags":["a","b"]}')

    server = serve(handler)
    assert client(server).list_tags("x", page_size=2) == ["a", "b", "c"]


def test_loopback_registry_falls_back_to_http_and_others_do_not(serve: Any) -> None:
    server = serve(lambda req: v2_ok(req) or Resp(200, {}, b'{"tags":[]}'))
    t = Transport(server.host, credentials=ANON, retry=FAST, sleep=Sleeps())
    assert t.base_url == server.url  # https failed (plain HTTP server), http allowed for loopback
    assert Transport("registry.example.com", credentials=ANON).allow_http is False
    assert Transport("registry.example.com", insecure=True, credentials=ANON).allow_http is True
    assert Transport("localhost:5000", credentials=ANON).allow_http is True


def test_docker_hub_endpoint_library_prefix_and_credentials_key(
    serve: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    from imgci.reference import parse

    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hubpw").decode()}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert RegistryClient("docker.io").transport.endpoint == "registry-1.docker.io"
    assert RegistryClient("docker.io").transport.allow_http is False
    server = serve(
        basic_registry(
            lambda req: v2_ok(req) or Resp(200, {"Content-Type": OCI_MANIFEST}, MANIFEST), "hubuser", "hubpw"
        )
    )
    # stand-in endpoint; the credentials must still be looked up under Docker Hub's key
    hub = RegistryClient("docker.io", endpoint=server.host, credentials=None, retry=FAST, sleep=Sleeps())
    basic_ok = "Basic " + base64.b64encode(b"hubuser:hubpw").decode()
    got = hub.get_manifest(parse("busybox"))
    assert got.raw == MANIFEST
    paths = [r.path for r in server.requests if r.headers.get("Authorization") == basic_ok]
    assert "/v2/library/busybox/manifests/latest" in paths


# -- trust: certs.d and the system's CAs ---------------------------------------------------------------------
def test_registry_cas_follow_dockers_certs_d_layout(tmp_path: Any) -> None:
    from imgci.registry.transport import registry_cas

    one, two = tmp_path / "one", tmp_path / "two"
    for d, name, files in [
        (one, "reg.example:5000", ["ca.crt", "client.cert", "client.key", "b.crt"]),
        (two, "reg.example:5000", ["extra.crt"]),
        (one, "reg.example", ["default-port.crt"]),
        (one, "[::1]:5000", ["v6.crt"]),
        (one, "other:5000", ["no.crt"]),
    ]:
        (d / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            (d / name / f).write_text("x")
    dirs = (one, two, tmp_path / "missing")
    assert registry_cas("reg.example:5000", dirs) == (
        str(one / "reg.example:5000" / "b.crt"),
        str(one / "reg.example:5000" / "ca.crt"),
        str(two / "reg.example:5000" / "extra.crt"),
    )  # CAs only (client .cert/.key are not CAs), every directory, in a stable order
    assert registry_cas("reg.example", dirs) == (str(one / "reg.example" / "default-port.crt"),)
    assert registry_cas("reg.example:443", dirs) == (str(one / "reg.example" / "default-port.crt"),)
    assert registry_cas("[::1]:5000", dirs) == (str(one / "[::1]:5000" / "v6.crt"),)
    assert registry_cas("unknown:1", dirs) == ()


def test_certs_d_dirs_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from imgci.registry.transport import certs_d_dirs

    monkeypatch.delenv("IMGCI_CERTS_D", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert [str(p) for p in certs_d_dirs()] == [
        str(tmp_path / "imgci" / "certs.d"),
        "/etc/imgci/certs.d",
        "/etc/containers/certs.d",
        "/etc/docker/certs.d",
    ]
    monkeypatch.setenv("IMGCI_CERTS_D", f"{tmp_path}/a:{tmp_path}/b")
    assert [str(p) for p in certs_d_dirs()] == [f"{tmp_path}/a", f"{tmp_path}/b"]


def test_system_trust_prefers_a_hashed_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import ssl

    from imgci.registry import transport

    hashed, bundle = tmp_path / "certs", tmp_path / "bundle.pem"
    hashed.mkdir()
    bundle.write_text("x")
    paths = ssl.DefaultVerifyPaths(str(bundle), str(hashed), "", "", "", "")
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: paths)
    transport._system_trust.cache_clear()
    try:
        assert transport._system_trust() == str(bundle)  # no c_rehash links: the bundle
        (hashed / "5ad8a5d6.0").write_text("x")
        transport._system_trust.cache_clear()
        assert transport._system_trust() == str(hashed)  # links: OpenSSL reads only the CA a chain needs
    finally:
        transport._system_trust.cache_clear()


def test_the_system_bundle_named_by_the_environment_is_read_from_its_hashed_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """REQUESTS_CA_BUNDLE / SSL_CERT_FILE pointing at the system's own bundle: the same CAs come from the system's
    hashed directory (nothing parsed up front), but only where that directory holds as many CAs as the bundle."""
    import ssl

    from imgci.registry import transport

    hashed, bundle, other = tmp_path / "certs", tmp_path / "bundle.pem", tmp_path / "other.pem"
    hashed.mkdir()
    pem = "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"
    bundle.write_text(pem * 2)
    other.write_text(pem * 2)
    paths = ssl.DefaultVerifyPaths("", "", "SSL_CERT_FILE", str(bundle), "SSL_CERT_DIR", str(hashed))
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: paths)
    for var in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(var, raising=False)

    def verify(path: Path) -> str | bool:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(path))
        transport._system_dir_for.cache_clear()
        return transport._default_verify()

    try:
        (hashed / "5ad8a5d6.0").write_text("x")
        assert verify(bundle) == str(bundle)  # 2 CAs in the bundle, 1 in the directory: not the same list
        (hashed / "9d04f354.0").write_text("x")
        (hashed / "ca-one.pem").write_text("x")  # not a hash link: not counted
        assert verify(bundle) == str(hashed)
        assert verify(other) == str(other)  # another bundle is read as it is
        os.symlink(bundle, tmp_path / "link.pem")
        assert verify(tmp_path / "link.pem") == str(hashed)  # the same file under another name
    finally:
        transport._system_dir_for.cache_clear()
