"""OCI distribution client: credentials (docker's config.json and helpers), auth, transport, registry API.

Contract: importing this package is cheap — ``requests`` and ``tenacity`` load only when a client, transport or
login is first used (PEP 562 lazy attributes), so commands that never talk to a registry do not pay for them.

Modules: ``credentials`` (config.json, helpers), ``auth`` (challenges, tokens), ``retry`` (policy, Retry-After),
``responses`` (errors from answers), ``transport`` (one endpoint: TLS, redirects, retries), ``upload`` (one blob
upload), ``client`` (the API: manifests, blobs, mounts, tags).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgci.registry.client import ClientPool, FetchedManifest, MountResult, RegistryClient
    from imgci.registry.credentials import Credentials
    from imgci.registry.retry import RetryPolicy

__all__ = [
    "ClientPool",
    "Credentials",
    "FetchedManifest",
    "MountResult",
    "RegistryClient",
    "RetryPolicy",
    "login",
    "logout",
    "normalize_server",
]

_LAZY = {
    "ClientPool": "imgci.registry.client",
    "FetchedManifest": "imgci.registry.client",
    "MountResult": "imgci.registry.client",
    "RegistryClient": "imgci.registry.client",
    "Credentials": "imgci.registry.credentials",
    "RetryPolicy": "imgci.registry.retry",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def normalize_server(server: str) -> str:
    """What ``imgci login SERVER`` means: ``docker.io`` for Docker Hub in any spelling, else ``host[:port]``."""
    from imgci.registry.credentials import DOCKER_HUB_SERVER, normalize_key

    key = normalize_key(server.strip() or "docker.io")
    return "docker.io" if key == DOCKER_HUB_SERVER else key


def login(server: str, username: str, password: str, *, insecure: bool = False, **client_kwargs: Any) -> str:
    """Check the credentials against the registry (as ``docker login`` does), then store them in docker's
    config.json (or its credential helper). Returns the registry name. Wrong credentials raise
    AuthenticationError and store nothing."""
    from imgci.registry.client import RegistryClient
    from imgci.registry.credentials import Credentials, save_credentials

    registry = normalize_server(server)
    with RegistryClient(
        registry, insecure=insecure, credentials=Credentials(username=username, password=password), **client_kwargs
    ) as client:
        client.ping()
    save_credentials(registry, username, password)
    return registry


def logout(server: str) -> str:
    """Forget the stored credentials for ``server`` (helper and config.json). Returns the registry name."""
    from imgci.registry.credentials import remove_credentials

    registry = normalize_server(server)
    remove_credentials(registry)
    return registry
