"""Proves the integration-test infrastructure in tests/infra works against the real distribution registry."""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.infra import rootfs
from tests.infra.client import SimpleRegistryClient, parse_challenge, sha256_digest
from tests.infra.faultproxy import (
    FaultProxy,
    corrupt_body,
    delay,
    reset_after,
    status,
    truncate_body,
)
from tests.infra.registry import RegistryServer, free_port
from tests.infra.tokenserver import TokenServer

pytestmark = [
    pytest.mark.integration,
]

BLOB = os.urandom(200_000)  # larger than one proxy read buffer, so faults land mid-stream


def _session(verify: str | bool = True) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify=
    session.verify = verify
    return session


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path_factory.mktemp("plain")) as reg:
        yield reg


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path_factory.mktemp("tls"), tls=True) as reg:
        yield reg


@pytest.fixture(scope="module")
def blob_repo(plain_registry: RegistryServer) -> tuple[str, str]:
    """(repo, digest) of BLOB pushed directly to the plain registry."""
    client = SimpleRegistryClient(plain_registry.url)
    return "faults/blob", client.push_blob("faults/blob", BLOB)


@pytest.fixture
def proxy(plain_registry: RegistryServer) -> Iterator[FaultProxy]:
    with FaultProxy(plain_registry.url) as p:
        yield p


# -- registry modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="plain"),
        pytest.param({"tls": True}, id="tls"),
        pytest.param({"auth": "basic"}, id="basic"),
        pytest.param({"auth": "basic", "tls": True}, id="basic-tls"),
        pytest.param({"auth": "token"}, id="token-kid-rsa"),
        pytest.param({"auth": "token", "token_header": "x5c", "token_key_type": "ec"}, id="token-x5c-ec"),
    ],
)
def test_registry_mode_push_and_pull(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with RegistryServer(tmp_path, **kwargs) as reg:
        assert reg.url == f"{'https' if kwargs.get('tls') else 'http'}://{reg.host}"
        assert (reg.ca_path is not None) == bool(kwargs.get("tls"))
        assert (reg.username is not None) == bool(kwargs.get("auth"))
        client = SimpleRegistryClient(reg.url, username=reg.username, password=reg.password, verify=reg.verify)
        layer = b"layer bytes " * 100
        digest = client.push_image("team/app", "v1", [layer])
        body, media_type = client.get_manifest("team/app", "v1")
        assert sha256_digest(body) == digest
        assert media_type == "application/vnd.oci.image.manifest.v1+json"
        assert client.get_blob("team/app", sha256_digest(layer)) == layer
        assert any(reg.storage_dir.rglob("data")), "blobs should land in the registry's own storage dir"
        assert reg.log_path.exists()
    assert not reg.running


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "fake-registry"
    fake.write_text("#!/bin/sh\necho 'configuration error: boom' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="boom"):
        RegistryServer(tmp_path, binary=str(fake))


def test_tls_needs_the_ca(tls_registry: RegistryServer) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        _session(True).get(f"{tls_registry.url}/v2/", timeout=5)
    assert _session(tls_registry.verify).get(f"{tls_registry.url}/v2/", timeout=5).status_code == 200
    # The certificate also names localhost (DNS SAN).
    by_name = f"https://localhost:{tls_registry.port}/v2/"
    assert _session(tls_registry.verify).get(by_name, timeout=5).status_code == 200


def test_basic_auth_rejects_wrong_credentials(tmp_path: Path) -> None:
    with RegistryServer(tmp_path, auth="basic", username="alice", password="s3cret") as reg:
        session = _session()
        anonymous = session.get(f"{reg.url}/v2/", timeout=5)
        assert anonymous.status_code == 401
        assert parse_challenge(anonymous.headers["WWW-Authenticate"])[0] == "basic"
        assert session.get(f"{reg.url}/v2/", auth=("alice", "wrong"), timeout=5).status_code == 401
        assert session.get(f"{reg.url}/v2/", auth=("bob", "s3cret"), timeout=5).status_code == 401
        assert session.get(f"{reg.url}/v2/", auth=("alice", "s3cret"), timeout=5).status_code == 200


# -- token auth ---------------------------------------------------------------------------------------


def _actions(scopes: list[str], repository: str) -> set[str]:
    """Every action requested for ``repository`` across ``scopes``."""
    out: set[str] = set()
    for scope in scopes:
        for part in scope.split(" "):
            kind, _, rest = part.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name == repository:
                out.update(actions.split(","))
    return out


def test_token_auth_push_anonymous_pull_and_mount_scopes(tmp_path: Path) -> None:
    with RegistryServer(tmp_path, auth="token") as reg:
        ts = reg.token_server
        assert ts is not None
        challenge = _session().get(f"{reg.url}/v2/", timeout=5)
        scheme, params = parse_challenge(challenge.headers["WWW-Authenticate"])
        assert (scheme, params["realm"], params["service"]) == ("bearer", ts.realm, ts.service)

        user = SimpleRegistryClient(reg.url, username=reg.username, password=reg.password)
        layer = b"shared layer"
        user.push_image("team/app", "v1", [layer])
        assert _actions(ts.scopes, "team/app") == {"pull", "push"}  # the registry names them in either order
        assert ts.requests[-1].account == reg.username

        anonymous = SimpleRegistryClient(reg.url)
        anonymous.get_manifest("team/app", "v1")
        assert anonymous.get_blob("team/app", sha256_digest(layer)) == layer
        with pytest.raises(RuntimeError, match="401"):
            anonymous.push_blob("team/app", b"not allowed")
        assert ts.requests[-1].account is None
        assert ts.requests[-1].access == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]

        wrong = SimpleRegistryClient(reg.url, username=reg.username, password="wrong")
        with pytest.raises(requests.HTTPError, match="401"):
            wrong.get_manifest("team/app", "v1")
        assert ts.requests[-1].status == 401

        # A cross-repo mount asks for pull on the source repository as well.
        ts.clear()
        fresh = SimpleRegistryClient(reg.url, username=reg.username, password=reg.password)
        mounted = fresh.request("POST", f"/v2/other/blobs/uploads/?mount={sha256_digest(layer)}&from=team/app")
        assert mounted.status_code == 201, mounted.text
        assert "repository:team/app:pull" in ts.scopes
        assert _actions(ts.scopes, "other") == {"pull", "push"}


def test_token_from_an_untrusted_signer_is_rejected(tmp_path: Path) -> None:
    with RegistryServer(tmp_path, auth="token") as reg:
        ts = reg.token_server
        assert ts is not None
        access = [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]
        good = ts.issue("testuser", ts.service, access)
        headers = {"Authorization": f"Bearer {good}"}
        assert _session().post(f"{reg.url}/v2/team/app/blobs/uploads/", headers=headers, timeout=5).status_code == 202
        # Same issuer name, service and kid format, but a key the registry does not trust.
        with TokenServer(tmp_path, service=ts.service, issuer=ts.issuer) as rogue:
            forged = rogue.issue("testuser", ts.service, access)
        headers = {"Authorization": f"Bearer {forged}"}
        assert _session().post(f"{reg.url}/v2/team/app/blobs/uploads/", headers=headers, timeout=5).status_code == 401


def test_token_auth_without_anonymous_access(tmp_path: Path) -> None:
    with RegistryServer(tmp_path, auth="token", anonymous_actions=(), token_header="x5c") as reg:
        user = SimpleRegistryClient(reg.url, username=reg.username, password=reg.password)
        user.push_image("private/app", "v1", [b"x"])
        with pytest.raises(requests.HTTPError, match="401"):
            SimpleRegistryClient(reg.url).get_manifest("private/app", "v1")
        assert reg.token_server is not None
        assert reg.token_server.requests[-1].access == []


def test_token_server_oauth_post(tmp_path: Path) -> None:
    with TokenServer(tmp_path, username="u", password="p") as ts:
        form = {
            "grant_type": "password",
            "username": "u",
            "password": "p",
            "service": ts.service,
            "scope": "repository:a:pull,push repository:b:pull",
        }
        body = _session().post(ts.realm, data=form, timeout=5).json()
        assert body["access_token"] and body["scope"] == form["scope"]
        assert ts.scopes == ["repository:a:pull,push", "repository:b:pull"]
        form["password"] = "nope"
        assert _session().post(ts.realm, data=form, timeout=5).status_code == 401


# -- fault proxy --------------------------------------------------------------------------------------


def test_proxy_forwards_push_and_pull_to_tls_upstream(tls_registry: RegistryServer) -> None:
    with FaultProxy(tls_registry.url, ca_path=tls_registry.ca_path) as p:
        client = SimpleRegistryClient(p.url)
        digest = client.push_image("via/proxy", "v1", [BLOB])
        body, _ = client.get_manifest("via/proxy", "v1")
        assert sha256_digest(body) == digest
        assert client.get_blob("via/proxy", sha256_digest(BLOB)) == BLOB

        start = client.request("POST", "/v2/via/proxy/blobs/uploads/")
        assert start.headers["Location"].startswith(p.url + "/v2/via/proxy/blobs/uploads/")
        # A chunked PATCH (generator body) then the closing PUT.
        patch = client.request(
            "PATCH",
            start.headers["Location"],
            data=iter([b"abc", b"def"]),
            headers={"Content-Type": "application/octet-stream"},
        )
        assert patch.status_code == 202, patch.text
        assert patch.headers["Range"] == "0-5"
        put = client.request("PUT", f"{patch.headers['Location']}&digest={sha256_digest(b'abcdef')}")
        assert put.status_code == 201
        assert put.headers["Docker-Content-Digest"] == sha256_digest(b"abcdef")

        head = client.request("HEAD", f"/v2/via/proxy/blobs/{sha256_digest(BLOB)}")
        assert head.headers["Content-Length"] == str(len(BLOB))
        ranged = client.request("GET", f"/v2/via/proxy/blobs/{sha256_digest(BLOB)}", headers={"Range": "bytes=10-19"})
        assert ranged.status_code == 206 and ranged.content == BLOB[10:20]

        assert p.count("PUT", r"/manifests/v1$", status=201) == 1
        assert p.count("PATCH") == 1
        assert p.requests[-1] == ("GET", f"/v2/via/proxy/blobs/{sha256_digest(BLOB)}", 206)


def test_proxy_status_faults_fire_in_order_then_stop(proxy: FaultProxy) -> None:
    first = proxy.add_fault("GET", r"^/v2/$", times=2, action=status(503))
    proxy.add_fault("GET", r"^/v2/$", times=1, action=status(429, {"Retry-After": "1"}, b"slow down"))
    session = _session()
    assert [session.get(f"{proxy.url}/v2/", timeout=5).status_code for _ in range(2)] == [503, 503]
    limited = session.get(f"{proxy.url}/v2/", timeout=5)
    assert (limited.status_code, limited.headers["Retry-After"], limited.content) == (429, "1", b"slow down")
    assert session.get(f"{proxy.url}/v2/", timeout=5).status_code == 200
    assert first.fired == 2
    assert [r.status for r in proxy.requests] == [503, 503, 429, 200]
    assert proxy.count("GET", "/v2/", status=503) == 2


def test_proxy_status_fault_on_upload_keeps_connection_usable(proxy: FaultProxy) -> None:
    proxy.add_fault("PUT", r"/blobs/uploads/", action=status(500))
    client = SimpleRegistryClient(proxy.url)
    with pytest.raises(RuntimeError, match="500"):
        client.push_blob("faults/retry", b"payload")
    assert client.push_blob("faults/retry", b"payload") == sha256_digest(b"payload")


def test_proxy_reset_during_request_body(proxy: FaultProxy, plain_registry: RegistryServer) -> None:
    proxy.add_fault("PUT", r"/blobs/uploads/", action=reset_after(1000))
    start = _session().post(f"{proxy.url}/v2/faults/reset/blobs/uploads/", timeout=5)
    location = start.headers["Location"] + f"&digest={sha256_digest(BLOB)}"
    with pytest.raises(requests.ConnectionError):
        _session().put(location, data=BLOB, timeout=5)
    assert proxy.requests[-1] == ("PUT", location.removeprefix(proxy.url), None)
    # The registry never saw the PUT: the blob is absent and the same upload can still complete.
    blob_url = f"{plain_registry.url}/v2/faults/reset/blobs/{sha256_digest(BLOB)}"
    assert _session().head(blob_url, timeout=5).status_code == 404
    assert _session().put(location, data=BLOB, timeout=5).status_code == 201


def test_proxy_reset_is_a_tcp_rst(proxy: FaultProxy) -> None:
    proxy.add_fault("GET", r"^/v2/$", action=reset_after(0, on="request"))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)


def test_proxy_reset_during_response_body(proxy: FaultProxy, blob_repo: tuple[str, str]) -> None:
    repo, digest = blob_repo
    proxy.add_fault("GET", "/blobs/", action=reset_after(1000))
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.ConnectionError)):
        _session().get(f"{proxy.url}/v2/{repo}/blobs/{digest}", timeout=5)
    assert proxy.count("GET", "/blobs/", status=200) == 1
    assert _session().get(f"{proxy.url}/v2/{repo}/blobs/{digest}", timeout=5).content == BLOB


def test_proxy_corrupt_body_keeps_length_and_digest_header(proxy: FaultProxy, blob_repo: tuple[str, str]) -> None:
    repo, digest = blob_repo
    proxy.add_fault("GET", "/blobs/", action=corrupt_body(offset=100_000, count=3))
    resp = _session().get(f"{proxy.url}/v2/{repo}/blobs/{digest}", timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Docker-Content-Digest"] == digest
    assert len(resp.content) == len(BLOB) and sha256_digest(resp.content) != digest
    differing = [i for i, (a, b) in enumerate(zip(resp.content, BLOB, strict=True)) if a != b]
    assert differing == [100_000, 100_001, 100_002]


def test_proxy_truncate_body(proxy: FaultProxy, blob_repo: tuple[str, str]) -> None:
    repo, digest = blob_repo
    proxy.add_fault("GET", "/blobs/", action=truncate_body(100))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    try:
        conn.request("GET", f"/v2/{repo}/blobs/{digest}")
        resp = conn.getresponse()
        assert resp.getheader("Content-Length") == str(len(BLOB))
        with pytest.raises(http.client.IncompleteRead) as err:
            resp.read()
        assert err.value.partial == BLOB[:100]
    finally:
        conn.close()


def test_proxy_delay(proxy: FaultProxy) -> None:
    proxy.add_fault(None, r"^/v2/$", action=delay(0.3))
    started = time.monotonic()
    assert _session().get(f"{proxy.url}/v2/", timeout=5).status_code == 200
    assert time.monotonic() - started >= 0.3


def test_proxy_answers_502_when_upstream_is_down() -> None:
    with FaultProxy(f"http://127.0.0.1:{free_port()}") as p:
        assert _session().get(f"{p.url}/v2/", timeout=5).status_code == 502
        assert p.requests == [("GET", "/v2/", 502)]


# -- tarballs -----------------------------------------------------------------------------------------


def test_busybox_rootfs_tar(tmp_path: Path) -> None:
    script = b"#!/bin/sh\necho hi\n"
    path = rootfs.make_busybox_rootfs_tar(tmp_path / "a.tar", extra_files={"usr/local/bin/hi": script})
    again = rootfs.make_busybox_rootfs_tar(tmp_path / "b.tar", extra_files={"usr/local/bin/hi": script})
    assert path.read_bytes() == again.read_bytes()
    with tarfile.open(path) as tar:
        members = {m.name.rstrip("/"): m for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
        assert names == sorted(names)
        assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
        for applet in ("ls", "cat", "echo", "true", "id", "env"):
            assert members[f"bin/{applet}"].linkname == "busybox"
        busybox = members["bin/busybox"]
        assert busybox.isreg() and busybox.mode == 0o755
        assert busybox.size == Path(rootfs.BUSYBOX).stat().st_size
        assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
        for d in ("root", "proc", "dev", "etc", "var", "usr/bin", "usr/local"):
            assert members[d].isdir()
        assert members["usr/local/bin/hi"].mode == 0o755
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None and passwd.read().startswith(b"root:x:0:0:")
        assert {(m.uid, m.gid, m.mtime) for m in members.values()} == {(0, 0, rootfs.FIXED_MTIME)}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chroot") is None, reason="chroot needs root")
def test_busybox_rootfs_runs(tmp_path: Path) -> None:
    path = rootfs.make_busybox_rootfs_tar(tmp_path / "rootfs.tar")
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "-xf", str(path), "-C", str(root)], check=True)  # a trusted tar we just made
    out = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", "echo hello from $(id -un)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    assert out.stdout.strip() == "hello from root"


def test_make_tar_keeps_hostile_entries(tmp_path: Path) -> None:
    entries = [
        rootfs.file("../x", b"escape"),
        rootfs.file("/abs", b"absolute"),
        rootfs.symlink("link", "/etc/passwd"),
        rootfs.hardlink("hard", "../x"),
        rootfs.char_device("dev/null", 1, 3),
        rootfs.whiteout("a/b"),
        rootfs.opaque_whiteout("a/"),
        rootfs.file("setuid", b"", 0o4755),
        rootfs.file("long/" + "n" * 150, b"long name"),
    ]
    for gz in (False, True):
        path = rootfs.make_tar(tmp_path / f"evil{int(gz)}.tar", entries, gzip=gz)
        assert path.read_bytes() == rootfs.make_tar(tmp_path / "again", entries, gzip=gz).read_bytes()
        with tarfile.open(path, "r:gz" if gz else "r:") as tar:
            members = tar.getmembers()
            assert [m.name for m in members] == [
                "../x",
                "/abs",
                "link",
                "hard",
                "dev/null",
                "a/.wh.b",
                "a/.wh..wh..opq",
                "setuid",
                "long/" + "n" * 150,
            ]
            assert members[2].issym() and members[2].linkname == "/etc/passwd"
            assert members[3].islnk() and members[3].linkname == "../x"
            assert members[4].ischr() and (members[4].devmajor, members[4].devminor) == (1, 3)
            assert members[7].mode == 0o4755
            assert tar.extractfile(members[0]).read() == b"escape"  # type: ignore[union-attr]


def test_make_tar_declared_size_can_lie() -> None:
    data = rootfs.build_tar([rootfs.file("short", b"abc", size=10_000)])
    header = tarfile.TarInfo.frombuf(data[:512], "utf-8", "surrogateescape")
    assert header.size == 10_000
    assert len(data) < 10_000
    with tarfile.open(fileobj=io.BytesIO(data)) as tar, pytest.raises(tarfile.ReadError):
        tar.extractfile("short").read()  # type: ignore[union-attr]


def test_sha256_helper_matches_hashlib() -> None:
    assert sha256_digest(b"x") == "sha256:" + hashlib.sha256(b"x").hexdigest()
