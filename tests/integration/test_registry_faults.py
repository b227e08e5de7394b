"""Faults between imgci and the real docker-registry, injected by tests/infra's FaultProxy: retries with
Retry-After, resumed downloads and uploads, corrupt and truncated bodies, and the errors when retrying is over.

Clients here sleep through a recorder, so Retry-After values are asserted, never waited for."""

from __future__ import annotations

import time
from email.utils import formatdate
from pathlib import Path

import pytest

from imgci.errors import DigestMismatchError, RegistryError, RegistryUnreachableError
from imgci.oci import Digest, Platform
from imgci.reference import parse
from imgci.store import Store
from imgci.transfer import pull_image, push_image
from tests.infra.client import SimpleRegistryClient
from tests.infra.faultproxy import FaultProxy, corrupt_body, delay, reset_after, status, truncate_body
from tests.infra.registry import RegistryServer
from tests.integration.conftest_registry import (
    Sleeps,
    make_image,
    pool,
    random_bytes,
)

pytestmark = pytest.mark.integration

BLOB_GET = r"/blobs/sha256:"
LAYER = random_bytes(400_000)
LAYER_GET = rf"/blobs/{Digest.of(LAYER).value}$"


@pytest.fixture
def pushed(proxy: FaultProxy, docker_config: Path, state: Store, request: pytest.FixtureRequest) -> str:
    """An image pushed through the proxy (faults are added afterwards); returns its reference text."""
    m = make_image(state, "localhost/app:1", [LAYER, b"second layer"])
    ref = f"{proxy.host}/faults/{request.node.name.replace('[', '-').replace(']', '')[:60]}:v1"
    push_image(state, "localhost/app:1", parse(ref), client_factory=pool())
    assert m.layers[0].size == len(LAYER)
    proxy.clear()
    return ref


def assert_nothing_pulled(store: Store, layer_digest: object) -> None:
    assert store.list_refs() == []
    assert not store.has_blob(layer_digest)  # type: ignore[arg-type]
    assert list(store.ingest_dir.iterdir()) == []


def layer_digest(state: Store) -> object:
    return state.read_manifest(state.get_ref("localhost/app:1").digest).layers[0].digest  # type: ignore[union-attr]


# -- retried, then fine -----------------------------------------------------------------------------------------
def test_503_on_manifest_is_retried(proxy: FaultProxy, pushed: str, state2: Store, sleeps: Sleeps) -> None:
    proxy.add_fault("GET", r"/manifests/", times=2, action=status(503))
    pull_image(state2, parse(pushed), client_factory=pool(sleeps))
    assert proxy.count("GET", r"/manifests/v1", status=503) == 2
    assert proxy.count("GET", r"/manifests/v1", status=200) == 1
    assert len(sleeps) == 2 and all(s < 1 for s in sleeps)  # exponential backoff from 10 ms


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_retry_after_is_honoured(proxy: FaultProxy, pushed: str, state2: Store, sleeps: Sleeps, form: str) -> None:
    after = "7" if form == "seconds" else formatdate(time.time() + 7, usegmt=True)
    proxy.add_fault("GET", BLOB_GET, times=1, action=status(429, {"Retry-After": after}))
    result = pull_image(state2, parse(pushed), client_factory=pool(sleeps))
    assert result.downloaded_blobs == 3
    assert proxy.count("GET", BLOB_GET, status=429) == 1
    assert len(sleeps) == 1 and 5.0 <= sleeps[0] <= 7.0


def test_503_on_blob_upload_and_manifest_put_are_retried(
    proxy: FaultProxy, docker_config: Path, state: Store, state2: Store, sleeps: Sleeps
) -> None:
    make_image(state, "localhost/app:1", [random_bytes(100_000)])
    proxy.add_fault("POST", r"/blobs/uploads/", times=1, action=status(503))
    proxy.add_fault("PUT", r"/blobs/uploads/", times=1, action=status(502))
    proxy.add_fault("PUT", r"/manifests/", times=1, action=status(500))
    dest = parse(f"{proxy.host}/faults/retry-push:v1")
    result = push_image(state, "localhost/app:1", dest, client_factory=pool(sleeps))
    assert result.uploaded_blobs == 2
    assert proxy.count("PUT", r"/manifests/v1", status=201) == 1
    pull_image(state2, dest, client_factory=pool())
    assert state2.fsck() == []


# -- retried until the bound ------------------------------------------------------------------------------------
def test_persistent_500_names_registry_repository_digest_and_attempts(
    proxy: FaultProxy, pushed: str, state: Store, state2: Store, sleeps: Sleeps
) -> None:
    body = b'{"errors":[{"code":"UNKNOWN","message":"unknown error","detail":"disk on fire"}]}'
    proxy.add_fault("GET", BLOB_GET, times=None, action=status(500, {"Content-Type": "application/json"}, body))
    with pytest.raises(RegistryError) as exc:
        pull_image(state2, parse(pushed), client_factory=pool(sleeps), max_workers=1)
    msg = str(exc.value)
    ref = parse(pushed)
    assert proxy.host in msg and ref.repository in msg and "sha256:" in msg
    assert exc.value.digest and exc.value.digest in msg
    assert "HTTP 500 UNKNOWN: unknown error (disk on fire)" in msg
    assert "gave up after 3 attempts" in msg
    assert proxy.count("GET", BLOB_GET, status=500) == 3  # then stopped: the first failure ends the pull
    assert_nothing_pulled(state2, layer_digest(state))


# -- bad bodies -------------------------------------------------------------------------------------------------
def test_corrupt_blob_is_refused_and_nothing_is_stored(
    proxy: FaultProxy, pushed: str, state: Store, state2: Store
) -> None:
    proxy.add_fault("GET", BLOB_GET, times=None, action=corrupt_body(offset=1000, count=4))
    with pytest.raises(DigestMismatchError, match="digest mismatch"):
        pull_image(state2, parse(pushed), client_factory=pool())
    assert_nothing_pulled(state2, layer_digest(state))


def test_truncated_body_is_resumed(proxy: FaultProxy, pushed: str, state2: Store) -> None:
    proxy.add_fault("GET", LAYER_GET, times=1, action=truncate_body(len(LAYER) // 2))
    result = pull_image(state2, parse(pushed), client_factory=pool(), max_workers=1)
    assert result.downloaded_blobs == 3 and state2.fsck() == []
    # the truncated blob was fetched twice, the second time only its missing part (206)
    assert proxy.count("GET", LAYER_GET, status=206) == 1


def test_truncated_every_time_fails_cleanly(proxy: FaultProxy, pushed: str, state: Store, state2: Store) -> None:
    proxy.add_fault("GET", BLOB_GET, times=None, action=truncate_body(70_000))
    with pytest.raises(RegistryUnreachableError, match="gave up after 3 attempts"):
        pull_image(state2, parse(pushed), client_factory=pool())
    assert_nothing_pulled(state2, layer_digest(state))


def test_reset_mid_download_resumes_with_range(proxy: FaultProxy, pushed: str, state2: Store) -> None:
    proxy.add_fault("GET", LAYER_GET, times=1, action=reset_after(150_000, on="response"))
    result = pull_image(state2, parse(pushed), client_factory=pool(), max_workers=1)
    assert result.downloaded_blobs == 3 and state2.fsck() == []
    assert proxy.count("GET", LAYER_GET, status=206) == 1


# -- uploads that break -----------------------------------------------------------------------------------------
def test_chunked_upload_resumes_after_a_reset(
    proxy: FaultProxy, registry: RegistryServer, docker_config: Path, state: Store, state2: Store
) -> None:
    big = random_bytes(1_200_000)
    m = make_image(state, "localhost/big:1", [big])
    # let two chunks through, then cut the third one off mid-body
    proxy.add_fault("PATCH", r"/blobs/uploads/", times=2, action=delay(0))
    proxy.add_fault("PATCH", r"/blobs/uploads/", times=1, action=reset_after(65536))
    dest = parse(f"{proxy.host}/faults/chunked:v1")
    clients = pool(chunk_threshold=256 * 1024, chunk_size=256 * 1024)
    result = push_image(state, "localhost/big:1", dest, client_factory=clients)
    assert result.uploaded_blobs == 2
    patches = proxy.count("PATCH", r"/blobs/uploads/")
    assert patches >= 6  # 1.2 MB in 256 KiB chunks is 5, plus the one that broke
    # resumed in the same session, from the offset the registry reported
    assert proxy.count("GET", r"/blobs/uploads/", status=204) == 1
    assert proxy.count("POST", r"/blobs/uploads/") == 2  # one session per blob: no restart
    # the registry has exactly the bytes: a digest-checked download by another client, and a pull
    other = SimpleRegistryClient(registry.url)
    assert other.get_blob("faults/chunked", m.layers[0].digest.value) == big
    pull_image(state2, dest, platform=Platform.parse("linux/amd64"), client_factory=pool())
    assert state2.read_blob(m.layers[0].digest) == big


def test_chunked_upload_restarts_when_the_session_is_gone(
    proxy: FaultProxy, registry: RegistryServer, docker_config: Path, state: Store
) -> None:
    big = random_bytes(700_000)
    m = make_image(state, "localhost/big:1", [big])
    gone = b'{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN","message":"blob upload unknown to registry"}]}'
    proxy.add_fault("PATCH", r"/blobs/uploads/", times=1, action=delay(0))
    proxy.add_fault("PATCH", r"/blobs/uploads/", times=1, action=reset_after(0, on="request"))
    proxy.add_fault("GET", r"/blobs/uploads/", times=1, action=status(404, {}, gone))
    dest = parse(f"{proxy.host}/faults/restart:v1")
    push_image(state, "localhost/big:1", dest, client_factory=pool(chunk_threshold=200_000, chunk_size=200_000))
    assert proxy.count("POST", r"/blobs/uploads/") == 3  # the big blob's session was started over
    assert SimpleRegistryClient(registry.url).get_blob("faults/restart", m.layers[0].digest.value) == big


def test_chunked_upload_resumes_after_a_502(proxy: FaultProxy, docker_config: Path, state: Store) -> None:
    big = random_bytes(700_000)
    make_image(state, "localhost/big:1", [big])
    proxy.add_fault("PATCH", r"/blobs/uploads/", times=1, action=delay(0))
    proxy.add_fault("PATCH", r"/blobs/uploads/", times=1, action=status(502))
    dest = parse(f"{proxy.host}/faults/chunked502:v1")
    push_image(state, "localhost/big:1", dest, client_factory=pool(chunk_threshold=200_000, chunk_size=200_000))
    assert proxy.count("GET", r"/blobs/uploads/", status=204) == 1  # asked where to go on
    assert proxy.count("POST", r"/blobs/uploads/") == 2  # no restart: one session per blob


def test_monolithic_put_reset_restarts_the_upload(
    proxy: FaultProxy, registry: RegistryServer, docker_config: Path, state: Store
) -> None:
    data = random_bytes(300_000)
    m = make_image(state, "localhost/app:1", [data])
    proxy.add_fault("PUT", r"/blobs/uploads/", times=1, action=reset_after(100_000))
    dest = parse(f"{proxy.host}/faults/monolithic:v1")
    result = push_image(state, "localhost/app:1", dest, client_factory=pool(), max_workers=1)
    assert result.uploaded_blobs == 2
    assert proxy.count("POST", r"/blobs/uploads/") == 3  # two blobs, one of them twice
    assert SimpleRegistryClient(registry.url).get_blob("faults/monolithic", m.layers[0].digest.value) == data
