"""A deliberately small registry client built on ``requests``, for checking what the test servers hold.

Contract: it speaks just enough of the distribution API to push a blob (monolithic POST + PUT), push and
fetch manifests and blobs, and answer Basic and Bearer challenges (one retry per request after a 401).
It is independent of imgci on purpose: tests use it as a second opinion on what imgci pushed.
Requests return ``requests.Response`` objects unchecked unless the method says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import requests

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split ``Bearer realm="…",service="…",scope="…"`` into ("bearer", {params})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


class SimpleRegistryClient:
    """Talks to one registry at ``base_url`` with optional credentials and a CA bundle (``verify``)."""

    def __init__(
        self,
        base_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        verify: str | bool = True,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = (username, password or "") if username is not None else None
        self.session = requests.Session()
        # Without this, REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE silently override session.verify, and *_PROXY
        # variables could route 127.0.0.1 traffic through a CI proxy.
        self.session.trust_env = False
        self.session.verify = verify
        self.timeout = timeout
        self._authorization: str | None = None

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def _token(self, params: dict[str, str]) -> str:
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        resp = self.session.get(params["realm"], params=query, auth=self.auth, timeout=self.timeout)
        resp.raise_for_status()
        body = resp.json()
        return str(body.get("token") or body["access_token"])

    def request(self, method: str, path_or_url: str, **kwargs: Any) -> requests.Response:
        """One request; on a 401 with a challenge, authenticate and retry once (bodies must be bytes)."""
        url = path_or_url if "://" in path_or_url else self.base_url + path_or_url
        headers = dict(kwargs.pop("headers", None) or {})
        kwargs.setdefault("timeout", self.timeout)
        if self._authorization:
            headers["Authorization"] = self._authorization
        resp = self.session.request(method, url, headers=headers, **kwargs)
        challenge = resp.headers.get("WWW-Authenticate")
        if resp.status_code != 401 or not challenge:
            return resp
        scheme, params = parse_challenge(challenge)
        if scheme == "bearer":
            self._authorization = "Bearer " + self._token(params)
        elif scheme == "basic" and self.auth:
            self._authorization = requests.auth._basic_auth_str(*self.auth)
        else:
            return resp
        headers["Authorization"] = self._authorization
        return self.session.request(method, url, headers=headers, **kwargs)

    def push_blob(self, repo: str, data: bytes) -> str:
        """Monolithic upload (POST then PUT ?digest=); returns the digest. Raises on failure."""
        digest = sha256_digest(data)
        start = self.request("POST", f"/v2/{repo}/blobs/uploads/")
        if start.status_code != 202:
            raise RuntimeError(f"POST upload: {start.status_code} {start.text}")
        location = start.headers["Location"]
        if "://" not in location:
            location = self.base_url + location
        sep = "&" if "?" in location else "?"
        put = self.request(
            "PUT", f"{location}{sep}digest={digest}", data=data, headers={"Content-Type": "application/octet-stream"}
        )
        if put.status_code != 201:
            raise RuntimeError(f"PUT upload: {put.status_code} {put.text}")
        return digest

    def get_blob(self, repo: str, digest: str) -> bytes:
        """The blob's bytes, verified against ``digest``. Raises on failure or mismatch."""
        resp = self.request("GET", f"/v2/{repo}/blobs/{digest}")
        resp.raise_for_status()
        if sha256_digest(resp.content) != digest:
            raise RuntimeError(f"blob {digest} came back with the wrong content")
        return resp.content

    def put_manifest(self, repo: str, reference: str, body: bytes, media_type: str = OCI_MANIFEST) -> str:
        """PUT a manifest; returns the registry's Docker-Content-Digest. Raises on failure."""
        resp = self.request("PUT", f"/v2/{repo}/manifests/{reference}", data=body, headers={"Content-Type": media_type})
        if resp.status_code != 201:
            raise RuntimeError(f"PUT manifest: {resp.status_code} {resp.text}")
        return resp.headers.get("Docker-Content-Digest") or sha256_digest(body)

    def get_manifest(self, repo: str, reference: str, accept: str = OCI_MANIFEST) -> tuple[bytes, str]:
        """(body, content type) of a manifest. Raises on failure."""
        resp = self.request("GET", f"/v2/{repo}/manifests/{reference}", headers={"Accept": accept})
        resp.raise_for_status()
        return resp.content, resp.headers.get("Content-Type", "")

    def push_image(self, repo: str, tag: str, layers: list[bytes], config: dict[str, Any] | None = None) -> str:
        """Push layers (uncompressed tar media type), a config and an OCI manifest; returns the manifest digest."""
        config_bytes = json.dumps(
            config
            or {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer) for layer in layers]},
            },
            sort_keys=True,
        ).encode()
        config_desc = {"mediaType": OCI_CONFIG, "digest": self.push_blob(repo, config_bytes), "size": len(config_bytes)}
        layer_descs = [
            {"mediaType": OCI_LAYER, "digest": self.push_blob(repo, layer), "size": len(layer)} for layer in layers
        ]
        manifest = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc, "layers": layer_descs},
            sort_keys=True,
        ).encode()
        return self.put_manifest(repo, tag, manifest)
