"""Registry faults through tests/infra's FaultProxy (the "reliability and security suite"): 5xx on
HEAD/GET/PATCH/PUT, 429 with Retry-After in both forms, connections reset mid-upload, 416 on a chunk, a mount
answered 202, an upload Location on another host, wrong digests and sizes, malformed digests.

Every case asserts both halves: the clear error (an ImgciError naming the registry and the digest, which the CLI
prints as one ``error:`` line) or the recovery, and that nothing was lost or corrupted: the registry holds exactly
the bytes (checked with SimpleRegistryClient, independent of imgci), the local store passes ``fsck``, and no half
blob is visible on either side. Clients sleep through a recorder: Retry-After is asserted, never waited for.

Covered elsewhere and not repeated here: tests/integration/test_registry_faults.py (503 on GET manifest, 429 on
GET blob in both Retry-After forms, 503/502/500 on POST, blob PUT and manifest PUT, persistent 500 on GET, corrupt,
truncated and reset downloads, a reset mid-PATCH resumed, a reset mid-PUT restarted, 502 on a PATCH, a lost upload
session) and tests/unit/test_registry_http.py (416 and a foreign upload Location against a fake server, Retry-After
parsing and capping, redirects that drop Authorization).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from imgci.errors import (
    DigestMismatchError,
    ImgciError,
    InvalidReferenceError,
    RegistryError,
    RegistryProtocolError,
)
from imgci.oci import OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, Digest, Manifest
from imgci.reference import parse
from imgci.registry.client import ClientPool
from imgci.registry.credentials import Credentials
from imgci.store import Store
from imgci.transfer import pull_image, push_image
from tests.conftest import Imgci
from tests.infra.client import SimpleRegistryClient
from tests.infra.faultproxy import (
    FaultProxy,
    corrupt_body,
    delay,
    drop_answer,
    relocate,
    reset_after,
    status,
)
from tests.infra.registry import RegistryServer
from tests.integration.conftest_registry import Sleeps, make_image, pool, random_bytes

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024  # chunk threshold and size of the chunked cases: a 200 KB layer is 4 PATCHes
LAYER = random_bytes(200_000)
LAYER_DIGEST = Digest.of(LAYER)
LAYER_URL = rf"/blobs/{LAYER_DIGEST}$"
OCI_ERROR = b'{"errors":[{"code":"UNKNOWN","message":"unknown error","detail":"disk on fire"}]}'
JSON = {"Content-Type": "application/json"}


# -- helpers ----------------------------------------------------------------------------------------------------
def clients(sleeps: Sleeps | None = None, *, chunked: bool = False, **kw: Any) -> ClientPool:
    if chunked:
        kw.update(chunk_threshold=CHUNK, chunk_size=CHUNK)
    return pool(sleeps, **kw)


def checker(reg: RegistryServer) -> SimpleRegistryClient:
    """The second opinion on what the registry holds (talks to it directly, not through the proxy)."""
    return SimpleRegistryClient(reg.url, username=reg.username, password=reg.password, verify=reg.verify)


def assert_registry_has(reg: RegistryServer, repo: str, data: bytes) -> None:
    assert checker(reg).get_blob(repo, Digest.of(data).value) == data  # digest-checked by the client


def assert_registry_lacks(reg: RegistryServer, repo: str, digest: Digest, tag: str = "v1") -> None:
    """No half blob is visible: HEAD says 404 (not a short blob), and the tag was never written."""
    c = checker(reg)
    assert c.request("HEAD", f"/v2/{repo}/blobs/{digest}").status_code == 404
    assert c.request("GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}).status_code == 404


def assert_store_clean(store: Store) -> None:
    assert store.fsck() == []
    assert list(store.ingest_dir.iterdir()) == []


def assert_clear(e: ImgciError, *parts: str) -> None:
    """The error a user sees: names each of ``parts`` (registry, repository, digest, status)."""
    msg = str(e)
    for part in parts:
        assert part in msg, (part, msg)


def app_image(state: Store, data: bytes = LAYER) -> Manifest:
    return make_image(state, "localhost/app:1", [data])


def preload_config(reg: RegistryServer, repo: str, state: Store, m: Manifest) -> None:
    """Put the image's config in the registry first, so the only blob imgci uploads is the layer."""
    checker(reg).push_blob(repo, state.read_blob(m.config.digest))


def content_ranges(proxy: FaultProxy) -> list[str]:
    return [h.get("Content-Range") or "" for h in proxy.headers_seen if h.method == "PATCH"]


# -- 5xx on HEAD, PATCH, PUT --------------------------------------------------------------------------------------
def test_5xx_on_head_is_retried(
    proxy: FaultProxy, registry: RegistryServer, docker_config: Path, state: Store, sleeps: Sleeps
) -> None:
    app_image(state)
    proxy.add_fault("HEAD", r"/blobs/sha256:", times=2, action=status(503))
    result = push_image(
        state, "localhost/app:1", parse(f"{proxy.host}/suite/head503:v1"), client_factory=clients(sleeps)
    )
    assert result.uploaded_blobs == 2
    assert proxy.count("HEAD", r"/blobs/sha256:", status=503) == 2
    assert len(sleeps) == 2 and all(s < 1 for s in sleeps)
    assert_registry_has(registry, "suite/head503", LAYER)
    assert_store_clean(state)


@pytest.mark.parametrize(
    ("method", "path", "chunked", "code"),
    [
        ("HEAD", LAYER_URL, False, 500),
        ("PATCH", r"/blobs/uploads/", True, 503),
        ("PUT", r"/blobs/uploads/", False, 502),  # monolithic: restarted each time
        ("PUT", r"/blobs/uploads/", True, 500),  # the closing PUT of a chunked upload: resumed each time
    ],
)
def test_persistent_5xx_fails_clearly_and_leaves_no_half_blob(
    proxy: FaultProxy,
    registry: RegistryServer,
    docker_config: Path,
    state: Store,
    sleeps: Sleeps,
    method: str,
    path: str,
    chunked: bool,
    code: int,
) -> None:
    repo = f"suite/persist-{method.lower()}-{code}"
    m = app_image(state)
    preload_config(registry, repo, state, m)
    proxy.add_fault(method, path, times=None, action=status(code, JSON, OCI_ERROR))
    with pytest.raises(RegistryError) as exc:
        push_image(
            state,
            "localhost/app:1",
            parse(f"{proxy.host}/{repo}:v1"),
            client_factory=clients(sleeps, chunked=chunked),
            max_workers=1,
        )
    assert exc.value.digest == LAYER_DIGEST.value
    assert_clear(exc.value, f"{proxy.host}/{repo}@{LAYER_DIGEST}", f"HTTP {code}", "gave up after 3 attempts")
    if method != "HEAD":
        assert "UNKNOWN: unknown error (disk on fire)" in str(exc.value)
    assert proxy.count(method, path, status=code) == 3  # the policy's bound, then stopped
    assert len(sleeps) == 2
    assert proxy.count("PUT", r"/manifests/") == 0
    assert_registry_lacks(registry, repo, LAYER_DIGEST)
    assert_store_clean(state)


# -- 429 with Retry-After on the upload path ---------------------------------------------------------------------
@pytest.mark.parametrize("form", ["delta-seconds", "http-date"])
@pytest.mark.parametrize(
    ("method", "path", "chunked"),
    [("HEAD", LAYER_URL, False), ("PATCH", r"/blobs/uploads/", True), ("PUT", r"/blobs/uploads/", False)],
)
def test_429_retry_after_is_honoured_on_push(
    proxy: FaultProxy,
    registry: RegistryServer,
    docker_config: Path,
    state: Store,
    sleeps: Sleeps,
    form: str,
    method: str,
    path: str,
    chunked: bool,
) -> None:
    repo = f"suite/r429-{method.lower()}-{form}"
    m = app_image(state)
    preload_config(registry, repo, state, m)
    after = "7" if form == "delta-seconds" else formatdate(time.time() + 7, usegmt=True)
    proxy.add_fault(method, path, times=1, action=status(429, {"Retry-After": after}))
    push_image(
        state, "localhost/app:1", parse(f"{proxy.host}/{repo}:v1"), client_factory=clients(sleeps, chunked=chunked)
    )
    assert proxy.count(method, path, status=429) == 1
    assert len(sleeps) == 1 and 5.0 <= sleeps[0] <= 7.0, sleeps  # what the registry asked, not the 10 ms backoff
    assert_registry_has(registry, repo, LAYER)
    assert_store_clean(state)


# -- connections reset mid-upload: resume or restart, never a corrupt blob ---------------------------------------
@pytest.mark.parametrize(
    ("case", "method", "action", "chunked", "posts", "puts"),
    [
        # the closing PUT never reached the registry: ask where the upload stands, then PUT again
        ("put-lost", "PUT", reset_after(0, on="request"), True, 1, 2),
        # the closing PUT went through but its answer was lost: HEAD shows the blob, nothing is sent again
        ("put-answer-lost", "PUT", drop_answer(), True, 1, 1),
        ("mono-answer-lost", "PUT", drop_answer(), False, 1, 1),
        # a chunk went through but its answer was lost: distribution 2.8 refuses the stale ``_state`` of the last
        # Location it gave (404 BLOB_UPLOAD_INVALID, session cancelled), so the upload restarts from zero
        ("patch-answer-lost", "PATCH", drop_answer(), True, 2, 1),
    ],
)
def test_reset_mid_upload_recovers_without_corrupting(
    proxy: FaultProxy,
    registry: RegistryServer,
    docker_config: Path,
    state: Store,
    state2: Store,
    case: str,
    method: str,
    action: Any,
    chunked: bool,
    posts: int,
    puts: int,
) -> None:
    repo = f"suite/reset-{case}"
    m = app_image(state)
    preload_config(registry, repo, state, m)
    if method == "PATCH":
        proxy.add_fault("PATCH", r"/blobs/uploads/", times=1, action=delay(0))  # the first chunk goes through
    proxy.add_fault(method, r"/blobs/uploads/", times=1, action=action)
    dest = parse(f"{proxy.host}/{repo}:v1")
    result = push_image(state, "localhost/app:1", dest, client_factory=clients(chunked=chunked))
    assert result.uploaded_blobs == 1
    assert proxy.count("POST", r"/blobs/uploads/") == posts
    assert proxy.count("PUT", r"/blobs/uploads/") == puts
    if case == "put-lost":
        assert proxy.count("GET", r"/blobs/uploads/", status=204) == 1  # where the upload stands: complete
    if method == "PATCH":
        assert proxy.count("GET", r"/blobs/uploads/", status=404) == 1  # asked first; restarted only when refused
        assert content_ranges(proxy)[2] == f"0-{CHUNK - 1}"
    assert_registry_has(registry, repo, LAYER)
    pull_image(state2, dest, client_factory=clients())
    assert state2.read_blob(LAYER_DIGEST) == LAYER
    assert_store_clean(state2)


# -- 416 on a chunk ----------------------------------------------------------------------------------------------
def test_416_on_a_chunk_resumes_from_the_registry_offset(
    proxy: FaultProxy, registry: RegistryServer, docker_config: Path, state: Store, sleeps: Sleeps
) -> None:
    repo = "suite/r416"
    m = app_image(state)
    preload_config(registry, repo, state, m)
    proxy.add_fault("PATCH", r"/blobs/uploads/", times=1, action=delay(0))
    proxy.add_fault("PATCH", r"/blobs/uploads/", times=1, action=status(416, {"Range": "0-0"}))
    push_image(state, "localhost/app:1", parse(f"{proxy.host}/{repo}:v1"), client_factory=clients(sleeps, chunked=True))
    assert proxy.count("GET", r"/blobs/uploads/", status=204) == 1  # asked the registry where it stands
    assert proxy.count("POST", r"/blobs/uploads/") == 1  # same session, not restarted
    # the refused chunk is sent again from the registry's offset (the 416's own Range header is not trusted)
    assert content_ranges(proxy)[:3] == [f"0-{CHUNK - 1}", f"{CHUNK}-{2 * CHUNK - 1}", f"{CHUNK}-{2 * CHUNK - 1}"]
    assert len(sleeps) == 1
    assert_registry_has(registry, repo, LAYER)
    assert_store_clean(state)


def test_416_on_every_chunk_fails_clearly(
    proxy: FaultProxy, registry: RegistryServer, docker_config: Path, state: Store, sleeps: Sleeps
) -> None:
    repo = "suite/r416-always"
    m = app_image(state)
    preload_config(registry, repo, state, m)
    proxy.add_fault("PATCH", r"/blobs/uploads/", times=None, action=status(416))
    with pytest.raises(RegistryError) as exc:
        push_image(
            state, "localhost/app:1", parse(f"{proxy.host}/{repo}:v1"), client_factory=clients(sleeps, chunked=True)
        )
    assert_clear(exc.value, f"{proxy.host}/{repo}@{LAYER_DIGEST}", "HTTP 416", "gave up after 3 attempts")
    assert proxy.count("PATCH", r"/blobs/uploads/") == 3
    assert_registry_lacks(registry, repo, LAYER_DIGEST)
    assert_store_clean(state)


# -- a mount answered 202 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunked", [False, True], ids=["monolithic", "chunked"])
def test_mount_answered_202_uploads_to_the_session_it_opened(
    proxy: FaultProxy, registry: RegistryServer, docker_config: Path, state: Store, state2: Store, chunked: bool
) -> None:
    repo = f"suite/mount202-{int(chunked)}"
    app_image(state)
    dest = parse(f"{proxy.host}/{repo}:v1")
    # the source repository does not hold the blobs: distribution declines the mount and opens an upload (202)
    result = push_image(
        state,
        "localhost/app:1",
        dest,
        client_factory=clients(chunked=chunked),
        mount_from=[f"{proxy.host}/suite/not-there"],
    )
    assert (result.mounted_blobs, result.uploaded_blobs) == (0, 2)
    assert proxy.count("POST", r"/blobs/uploads/\?mount=", status=202) == 2
    assert proxy.count("POST", r"/blobs/uploads/") == 2  # no session of its own: it used the one the mount opened
    assert_registry_has(registry, repo, LAYER)
    pull_image(state2, dest, client_factory=clients())
    assert_store_clean(state2)


def test_mount_answered_202_without_a_location_starts_an_upload(
    proxy: FaultProxy, registry: RegistryServer, docker_config: Path, state: Store
) -> None:
    repo = "suite/mount202-noloc"
    app_image(state)
    proxy.add_fault("POST", r"/blobs/uploads/\?mount=", times=None, action=status(202))
    result = push_image(
        state,
        "localhost/app:1",
        parse(f"{proxy.host}/{repo}:v1"),
        client_factory=clients(),
        mount_from=[f"{proxy.host}/suite/elsewhere"],
    )
    assert (result.mounted_blobs, result.uploaded_blobs) == (0, 2)
    assert proxy.count("POST", r"/blobs/uploads/$", status=202) == 2
    assert_registry_has(registry, repo, LAYER)
    assert_store_clean(state)


# -- an upload Location on another host ---------------------------------------------------------------------------
def registry_authorization(reg: RegistryServer, repo: str) -> str:
    """What a storage front end would use to reach the registry on its own behalf (never the user's header)."""
    assert reg.username is not None and reg.password is not None
    if reg.auth == "basic":
        return "Basic " + base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
    ts = reg.token_server
    assert ts is not None
    access = [{"type": "repository", "name": repo, "actions": ["pull", "push"]}]
    return "Bearer " + ts.issue("storage-front", ts.service, access)


@pytest.mark.parametrize("start", ["upload", "mount"])
@pytest.mark.parametrize("auth", ["basic", "token"])
def test_upload_location_on_another_host_gets_no_credentials(
    request: pytest.FixtureRequest, docker_config: Path, state: Store, auth: str, start: str
) -> None:
    reg: RegistryServer = request.getfixturevalue(f"{auth}_registry")
    assert reg.username is not None and reg.password is not None
    repo = f"suite/elsewhere-{auth}-{start}"
    app_image(state)
    storage_auth = registry_authorization(reg, repo)
    with (
        FaultProxy(reg.url, ca_path=reg.ca_path) as front,
        FaultProxy(reg.url, ca_path=reg.ca_path, upstream_headers={"Authorization": storage_auth}) as storage,
    ):
        front.add_fault("POST", r"/blobs/uploads/", times=None, action=relocate(storage.url))
        result = push_image(
            state,
            "localhost/app:1",
            parse(f"{front.host}/{repo}:v1"),
            client_factory=clients(chunked=True, credentials=Credentials(reg.username, reg.password)),
            mount_from=[f"{front.host}/suite/nowhere"] if start == "mount" else (),
        )
        assert result.uploaded_blobs == 2
        # the uploads went to the other host (the layer in PATCHes), and carried no credentials of any kind
        assert storage.count("PUT", r"/blobs/uploads/", status=201) == 2 and storage.count("PATCH") >= 4
        assert front.count("PUT", r"/blobs/uploads/") == 0 and front.count("PATCH") == 0
        for seen in storage.headers_seen:
            assert seen.get("Authorization") is None, seen
            assert not any(reg.password in v or v.startswith(("Basic ", "Bearer ")) for v in seen.headers.values())
            assert reg.password not in seen.path
        # while the registry's own host did get them: the test is not passing for want of credentials
        assert any(seen.get("Authorization") for seen in front.headers_seen)
    assert_registry_has(reg, repo, LAYER)
    assert_store_clean(state)


def test_other_host_asking_for_credentials_gets_none_and_the_error_is_clear(
    basic_registry: RegistryServer, docker_config: Path, state: Store
) -> None:
    reg = basic_registry
    assert reg.username is not None and reg.password is not None
    repo = "suite/elsewhere-401"
    m = app_image(state)
    preload_config(reg, repo, state, m)
    with (
        FaultProxy(reg.url, ca_path=reg.ca_path) as front,
        FaultProxy(reg.url, ca_path=reg.ca_path) as storage,  # forwards as is: the registry answers 401 + challenge
    ):
        front.add_fault("POST", r"/blobs/uploads/", times=None, action=relocate(storage.url))
        with pytest.raises(RegistryError) as exc:
            push_image(
                state,
                "localhost/app:1",
                parse(f"{front.host}/{repo}:v1"),
                client_factory=clients(credentials=Credentials(reg.username, reg.password)),
            )
        assert storage.count("PUT", r"/blobs/uploads/", status=401) >= 1
        assert all(seen.get("Authorization") is None for seen in storage.headers_seen)
        # who asked, and that logging in again would not help: the credentials were withheld on purpose
        assert_clear(exc.value, f"{front.host}/{repo}@{LAYER_DIGEST}", f"{storage.host}, where the registry sent")
        assert "HTTP 401" in str(exc.value) and "imgci login" not in (exc.value.hint or "")
    assert reg.password not in str(exc.value) and reg.password not in (exc.value.hint or "")
    assert_registry_lacks(reg, repo, LAYER_DIGEST)
    assert_store_clean(state)


# -- wrong digest or size ----------------------------------------------------------------------------------------
def push_lying_manifest(reg: RegistryServer, repo: str, layer: bytes, declared_size: int) -> Manifest:
    """An image whose manifest gives the layer a size it does not have (distribution checks only existence)."""
    c = checker(reg)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})
    config_digest = c.push_blob(repo, config.encode())
    layer_digest = c.push_blob(repo, layer)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": declared_size}],
    }
    raw = json.dumps(doc).encode()
    c.put_manifest(repo, "v1", raw)
    return Manifest.parse(raw, OCI_MANIFEST)


@pytest.mark.parametrize("declared", [len(LAYER) - 1000, len(LAYER) + 1000], ids=["smaller", "larger"])
def test_blob_of_another_size_than_the_manifest_says_is_refused(
    proxy: FaultProxy, registry: RegistryServer, state2: Store, sleeps: Sleeps, declared: int
) -> None:
    repo = f"suite/size-{'small' if declared < len(LAYER) else 'large'}"
    push_lying_manifest(registry, repo, LAYER, declared)
    with pytest.raises(DigestMismatchError) as exc:
        pull_image(state2, parse(f"{proxy.host}/{repo}:v1"), client_factory=clients(sleeps), max_workers=1)
    assert_clear(exc.value, f"{proxy.host}/{repo}@{LAYER_DIGEST}", str(declared))
    assert proxy.count("GET", LAYER_URL) == 1  # a wrong size is not a network fault: no retry
    assert not state2.has_blob(LAYER_DIGEST) and state2.list_refs() == []
    assert_store_clean(state2)


def test_corrupt_blob_names_registry_and_digest(
    proxy: FaultProxy, registry: RegistryServer, docker_config: Path, state: Store, state2: Store
) -> None:
    repo = "suite/corrupt-blob"
    app_image(state)
    push_image(state, "localhost/app:1", parse(f"{proxy.host}/{repo}:v1"), client_factory=clients())
    proxy.add_fault("GET", LAYER_URL, times=None, action=corrupt_body(offset=5000, count=3))
    with pytest.raises(DigestMismatchError) as exc:
        pull_image(state2, parse(f"{proxy.host}/{repo}:v1"), client_factory=clients())
    assert_clear(exc.value, f"{proxy.host}/{repo}", str(LAYER_DIGEST), "digest mismatch")
    assert not state2.has_blob(LAYER_DIGEST) and state2.list_refs() == []
    assert_store_clean(state2)
    assert_registry_has(registry, repo, LAYER)  # the registry's copy is fine: only the wire lied


def test_corrupt_manifest_is_refused(proxy: FaultProxy, registry: RegistryServer, state: Store, state2: Store) -> None:
    repo = "suite/corrupt-manifest"
    app_image(state)
    push_image(state, "localhost/app:1", parse(f"{proxy.host}/{repo}:v1"), client_factory=clients())
    proxy.add_fault("GET", r"/manifests/v1$", times=None, action=corrupt_body(offset=40, count=1))
    with pytest.raises(DigestMismatchError) as exc:
        pull_image(state2, parse(f"{proxy.host}/{repo}:v1"), client_factory=clients())
    assert_clear(exc.value, f"{proxy.host}/{repo}", "Docker-Content-Digest")
    assert proxy.count("GET", r"/blobs/") == 0
    assert state2.list_refs() == [] and list(state2.iter_blobs()) == []
    assert_store_clean(state2)


def test_registry_refusing_the_digest_is_not_retried(
    proxy: FaultProxy, registry: RegistryServer, docker_config: Path, state: Store, sleeps: Sleeps
) -> None:
    repo = "suite/digest-invalid"
    m = app_image(state)
    preload_config(registry, repo, state, m)
    body = b'{"errors":[{"code":"DIGEST_INVALID","message":"provided digest did not match uploaded content"}]}'
    proxy.add_fault("PUT", r"/blobs/uploads/", times=None, action=status(400, JSON, body))
    with pytest.raises(RegistryError) as exc:
        push_image(state, "localhost/app:1", parse(f"{proxy.host}/{repo}:v1"), client_factory=clients(sleeps))
    assert_clear(exc.value, f"{proxy.host}/{repo}@{LAYER_DIGEST}", "HTTP 400 DIGEST_INVALID")
    assert not exc.value.temporary and sleeps == []
    assert proxy.count("PUT", r"/blobs/uploads/") == 1
    assert_registry_lacks(registry, repo, LAYER_DIGEST)
    assert_store_clean(state)


# -- malformed digests: rejected before any path or URL is built ---------------------------------------------------
HEX = "ab" * 32
ESCAPE = f"imgci-escape-{uuid.uuid4().hex}"
MALFORMED = [
    "sha256:../x",
    f"sha256:../../../../../../../../tmp/{ESCAPE}",
    f"sha256:{HEX}/../../../x",
    "sha256:" + HEX.upper(),
    "SHA256:" + HEX,
    "sha256:" + HEX[:-1],
    "sha256:" + HEX + "a",
    "sha512:" + HEX,
    "md5:" + HEX[:32],
    "sha256:",
    "",
    f"sha256:{HEX}\n",  # "$" in a regex also matches before a trailing newline
]


def state_files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def assert_nothing_written_for(state: Store, tmp_path: Path, before: set[Path]) -> None:
    """Nothing new but the store's own bookkeeping (files at its top level): no blob, no temp file, nothing
    outside STATE/blobs, and every name under blobs/ a well-formed digest."""
    new = state_files(tmp_path) - before
    assert all(p.parts[0] == "state" and len(p.parts) == 2 and (tmp_path / p).is_file() for p in new), new
    for p in state.blobs_dir.rglob("*"):
        rel = p.relative_to(state.blobs_dir)
        assert rel.parts[0] in ("sha256", "sha512") and len(rel.parts) <= 2, rel
        if len(rel.parts) == 2:
            Digest(f"{rel.parts[0]}:{rel.parts[1]}")  # raises for anything but a valid digest
    assert not Path("/tmp", ESCAPE).exists()
    assert list(state.ingest_dir.iterdir()) == []


def evil_manifest(layer_digest: str, config_digest: str | None = None) -> bytes:
    good = Digest.of(b"{}").value
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": good if config_digest is None else config_digest, "size": 2},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": 10}],
    }
    return json.dumps(doc).encode()


@pytest.mark.parametrize("where", ["layer", "config", "index"])
@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_digest_in_a_manifest_is_rejected_before_any_path(
    proxy: FaultProxy, state: Store, tmp_path: Path, bad: str, where: str
) -> None:
    good = Digest.of(b"layer").value
    if where == "index":
        child = {
            "mediaType": OCI_MANIFEST,
            "digest": bad,
            "size": 10,
            "platform": {"os": "linux", "architecture": "amd64"},
        }
        body, media_type = (
            json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]}).encode(),
            OCI_INDEX,
        )
    else:
        body = evil_manifest(bad, None) if where == "layer" else evil_manifest(good, bad)
        media_type = OCI_MANIFEST
    # answered by the proxy: distribution would refuse to store such a manifest, a hostile registry would not
    proxy.add_fault("GET", r"/manifests/", times=None, action=status(200, {"Content-Type": media_type}, body))
    before = state_files(tmp_path)
    with pytest.raises(ImgciError) as exc:
        pull_image(state, parse(f"{proxy.host}/suite/evil:v1"), client_factory=clients())
    assert isinstance(exc.value, RegistryProtocolError), repr(exc.value)
    assert_clear(exc.value, f"{proxy.host}/suite/evil", "invalid digest", repr(bad))
    assert proxy.count("GET", r"/blobs/") == 0 and proxy.count("GET", r"/manifests/sha") == 0
    assert state.list_refs() == []
    assert_nothing_written_for(state, tmp_path, before)


@pytest.mark.parametrize("bad", ["sha256:../x", "sha256:" + HEX.upper(), "sha256:" + HEX[:-2]])
def test_malformed_docker_content_digest_is_rejected(proxy: FaultProxy, state: Store, tmp_path: Path, bad: str) -> None:
    body = evil_manifest(Digest.of(b"layer").value)
    headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": bad}
    proxy.add_fault("GET", r"/manifests/", times=None, action=status(200, headers, body))
    before = state_files(tmp_path)
    with pytest.raises(RegistryProtocolError) as exc:
        pull_image(state, parse(f"{proxy.host}/suite/evil-header:v1"), client_factory=clients())
    assert_clear(exc.value, f"{proxy.host}/suite/evil-header", "invalid Docker-Content-Digest")
    assert proxy.count("GET", r"/blobs/") == 0
    assert_nothing_written_for(state, tmp_path, before)


@pytest.mark.parametrize("bad", ["sha256:../x", "sha256:" + HEX.upper(), "sha256:" + HEX[:-1]])
def test_malformed_digest_in_a_reference_is_refused(bad: str) -> None:
    with pytest.raises(InvalidReferenceError):
        parse(f"127.0.0.1:5000/suite/app@{bad}")


# -- the same faults at the CLI: one error line, no traceback ------------------------------------------------------
def test_cli_reports_registry_faults_in_one_line(imgci: Imgci, proxy: FaultProxy, tmp_path: Path) -> None:
    imgci.env["IMGCI_REGISTRY_RETRIES"] = "2"
    with Store(imgci.state) as s:
        m = make_image(s, f"{proxy.host}/suite/cli:v1", [b"cli layer" * 100])
    proxy.add_fault("HEAD", r"/blobs/sha256:", times=None, action=status(500))
    err = imgci.fails("push", f"{proxy.host}/suite/cli:v1")
    assert f"{proxy.host}/suite/cli@sha256:" in err and "HTTP 500" in err and "gave up after 2 attempts" in err
    assert any(d.value in err for d in (m.config.digest, *(x.digest for x in m.layers)))

    proxy.clear_faults()
    body = evil_manifest("sha256:../x")
    proxy.add_fault("GET", r"/manifests/", times=None, action=status(200, {"Content-Type": OCI_MANIFEST}, body))
    err = imgci.fails("pull", f"{proxy.host}/suite/cli-evil:v1")
    assert f"{proxy.host}/suite/cli-evil" in err and "invalid digest 'sha256:../x'" in err
    assert "ok:" in imgci.run("fsck").stdout
