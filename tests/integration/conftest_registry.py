"""Fixtures and helpers for the registry/transfer integration tests (imported by tests/integration/test_registry_*).

The registries themselves are the session fixtures of tests/conftest.py (``registry``, ``tls_registry``,
``basic_registry``, ``token_registry``); this adds per-test isolation and a fault proxy:

- ``docker_config``: an empty ``DOCKER_CONFIG`` directory for the test (never the user's ~/.docker); returns the
  config.json path. ``REQUESTS_CA_BUNDLE``/``SSL_CERT_FILE`` are cleared so only what a test sets is trusted.
- ``state``: a fresh :class:`Store`; ``state2``: a second one to pull into.
- ``proxy``: a :class:`FaultProxy` in front of the plain ``registry``.
- ``sleeps``: a recording sleep; clients built with ``pool(..., sleeps=sleeps)`` never really wait.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgci.oci import OCI_CONFIG, OCI_LAYER_GZIP, Descriptor, Index, Manifest, Platform, canonical_json
from imgci.registry.client import ClientPool
from imgci.registry.credentials import save_credentials
from imgci.registry.retry import RetryPolicy
from imgci.store import Store
from tests.infra.faultproxy import FaultProxy
from tests.infra.registry import RegistryServer

FAST_RETRY = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.05, max_retry_after=30.0, max_elapsed=60.0)


class Sleeps(list[float]):
    """A ``sleep`` that records instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "docker-config"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    for var in (
        "REQUESTS_CA_BUNDLE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    return d / "config.json"


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state") as s:
        yield s


@pytest.fixture
def state2(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state2") as s:
        yield s


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as p:
        yield p


def trust(reg: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust the registry's CA the way users do: REQUESTS_CA_BUNDLE."""
    if reg.ca_path:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(reg.ca_path))


def login_to(reg: RegistryServer) -> None:
    """Put the registry's credentials in the (test's) docker config.json, as ``imgci login`` would."""
    if reg.username and getattr(reg, "auth", None):
        save_credentials(reg.host, reg.username, reg.password)


def pool(sleeps: Sleeps | None = None, **kw: Any) -> ClientPool:
    kw.setdefault("retry", FAST_RETRY)
    kw.setdefault("timeout", (5.0, 20.0))
    return ClientPool(sleep=sleeps if sleeps is not None else Sleeps(), **kw)


def make_image(store: Store, name: str, layers: list[bytes], arch: str = "amd64") -> Manifest:
    """An image with the given layer blobs (content is not a real tar: registries do not look)."""
    ldescs = [Descriptor(OCI_LAYER_GZIP, store.write_blob(data).digest, len(data)) for data in layers]
    cfg = canonical_json(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [d.digest.value for d in ldescs]},
        }
    )
    cd = store.write_blob(cfg)
    m = Manifest.build(Descriptor(OCI_CONFIG, cd.digest, len(cfg)), ldescs)
    store.write_blob(m.raw)
    store.set_ref(name, m.descriptor())
    return m


def make_multi_arch(store: Store, name: str) -> tuple[Index, dict[str, Manifest]]:
    """An index over linux/amd64 and linux/arm64 images plus an attestation entry (which must never be chosen)."""
    mans = {
        arch: make_image(store, f"{name}-{arch}", [f"{arch} layer {i}".encode() * 100 for i in range(2)], arch)
        for arch in ("amd64", "arm64")
    }
    attestation = make_image(store, f"{name}-att", [b'{"predicate": {}}'], "unknown")
    index = Index.build(
        [
            mans["amd64"].descriptor(Platform("linux", "amd64")),
            mans["arm64"].descriptor(Platform("linux", "arm64")),
            Descriptor(
                attestation.media_type,
                attestation.digest,
                len(attestation.raw),
                Platform("unknown", "unknown"),
                {"vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": "x"},
            ),
        ]
    )
    store.write_blob(index.raw)
    store.set_ref(name, Descriptor(index.media_type, index.digest, len(index.raw)))
    return index, mans


def config_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def random_bytes(n: int, seed: int = 0) -> bytes:
    return os.urandom(n) if seed == 0 else bytes((i * seed) % 251 for i in range(n))
