"""Image reference parsing and normalisation, exactly as docker does it.

``busybox`` → ``docker.io/library/busybox:latest``; ``localhost:5000/a/b@sha256:…``; ``[::1]:5000/x``.
The first path component is a registry host when it contains ``.`` or ``:`` or is ``localhost``
(distribution/reference's rule); otherwise the registry is Docker Hub, whose API endpoint is
``registry-1.docker.io`` and whose single-component names live under ``library/``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from imgci.errors import InvalidDigestError, InvalidReferenceError
from imgci.oci import Digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

# Matched with fullmatch and re.ASCII, as Go's regexp does: "$" would also match before a trailing newline, and "\w"
# would take any Unicode letter or digit ("busybox:v1\n@sha256:…" and "busybox:\u0661" are not references).
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", re.ASCII)
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.%]+\])(?::[0-9]+)?", re.ASCII)
_NAME_TOTAL_MAX = 255


@dataclass(frozen=True)
class Reference:
    """A normalised image reference. ``tag`` and ``digest`` may both be set (``name:tag@digest``)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def name(self) -> str:
        """``registry/repository`` — the fully qualified name without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def endpoint(self) -> str:
        """The host[:port] to send API requests to."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    @property
    def identifier(self) -> str:
        """What to put after ``/manifests/``: the digest if pinned, else the tag."""
        if self.digest is not None:
            return self.digest.value
        return self.tag or "latest"

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag, None)

    def with_digest(self, digest: Digest) -> Reference:
        return Reference(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += ":" + self.tag
        if self.digest is not None:
            s += "@" + self.digest.value
        return s

    def familiar(self) -> str:
        """Docker's short display form: ``busybox:latest``, ``user/app:1``, ``localhost:5000/x:y``."""
        name = self.name
        # Docker Hub's prefix goes, unless the first path component would then read as a registry host
        # (docker.io/l.ibrary/x must not become l.ibrary/x, which names the registry l.ibrary).
        if self.registry == DOCKER_HUB and not _is_domain(self.repository.split("/", 1)[0]):
            name = self.repository.removeprefix("library/") if self.repository.count("/") == 1 else self.repository
        s = name
        if self.tag:
            s += ":" + self.tag
        if self.digest is not None:
            s += "@" + self.digest.value
        return s


def _is_domain(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost" or component.startswith("[")


def parse(text: str, *, default_tag: str | None = "latest") -> Reference:
    """Parse and normalise ``text``; tag defaults to ``default_tag`` when neither tag nor digest is given."""
    original = text
    if not text or text != text.strip():
        raise InvalidReferenceError(f"invalid reference format: {original!r} is empty or has surrounding spaces")

    digest: Digest | None = None
    if "@" in text:
        text, _, dig = text.partition("@")
        try:
            digest = Digest.parse(dig)
        except InvalidDigestError:
            raise InvalidReferenceError(f"invalid reference format: {original!r} has an invalid digest") from None

    # The tag is after the last ':' unless that ':' belongs to a host:port (i.e. a '/' follows it).
    tag: str | None = None
    colon = text.rfind(":")
    if colon > text.rfind("/"):
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReferenceError(f"invalid reference format: {original!r} has an invalid tag {tag!r}")

    parts = text.split("/")
    if len(parts) > 1 and _is_domain(parts[0]):
        registry, path = parts[0], parts[1:]
        if not _DOMAIN.fullmatch(registry):
            raise InvalidReferenceError(f"invalid reference format: {original!r} has an invalid registry host")
        if registry.startswith("["):
            try:
                ipaddress.IPv6Address(registry[1 : registry.index("]")])
            except ValueError:
                raise InvalidReferenceError(f"invalid reference format: {original!r} has a bad IPv6 host") from None
    else:
        registry, path = DOCKER_HUB, parts
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
        if len(path) == 1:
            path = ["library", *path]

    for comp in path:
        if not _COMPONENT.fullmatch(comp):
            if comp.lower() != comp and _COMPONENT.fullmatch(comp.lower()):
                raise InvalidReferenceError(
                    f"invalid reference format: repository name {'/'.join(path)!r} must be lowercase"
                )
            raise InvalidReferenceError(
                f"invalid reference format: {original!r} (bad path component {comp!r}; allowed: lowercase "
                "letters, digits, and separators . _ __ -)"
            )
    repository = "/".join(path)
    if len(registry) + 1 + len(repository) > _NAME_TOTAL_MAX:
        raise InvalidReferenceError(f"invalid reference format: {original!r} is longer than 255 characters")
    if tag is None and digest is None:
        tag = default_tag
    return Reference(registry, repository, tag, digest)


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port) — docker allows plain HTTP there."""
    h = host
    if h.startswith("["):
        h = h[1 : h.index("]")] if "]" in h else h
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
