"""OCI / Docker wire models: digests, descriptors, platforms, manifests, indexes, image configs.

Contract: parsing never re-serialises — a parsed manifest keeps the exact bytes it came from, and its digest is
the digest of those bytes. Serialising (``canonical_json``) is only for documents imgci creates itself.
Models are plain dataclasses (cheap to import; pydantic is reserved for build.yaml).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from imgci.errors import DigestMismatchError, InvalidDigestError, PlatformError, RegistryProtocolError

# Media types ---------------------------------------------------------------------------------------------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
ALL_MANIFEST_TYPES = MANIFEST_TYPES | INDEX_TYPES
LAYER_TYPES = frozenset(
    {OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_LAYER_NONDIST_GZIP, DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN}
)

# Digests -------------------------------------------------------------------------------------------------------
_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")


@dataclass(frozen=True, order=True)
class Digest:
    """A validated content digest ``algorithm:hex``; only sha256 and sha512 are accepted.

    Validation happens before the digest is used anywhere, so ``hex`` is always safe in a file path.
    """

    value: str

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or not _DIGEST_RE.fullmatch(self.value):  # "$" matches before "\n"
            raise InvalidDigestError(f"invalid digest {self.value!r}: expected sha256:<64 hex> or sha512:<128 hex>")

    @classmethod
    def parse(cls, value: str | Digest) -> Digest:
        return value if isinstance(value, Digest) else cls(value)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls("sha256:" + hashlib.sha256(data).hexdigest())

    @property
    def algorithm(self) -> str:
        return self.value.split(":", 1)[0]

    @property
    def hex(self) -> str:
        return self.value.split(":", 1)[1]

    @property
    def short(self) -> str:
        return self.hex[:12]

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    def verify(self, data: bytes, *, what: str = "content") -> None:
        """Raise DigestMismatchError unless ``data`` hashes to this digest."""
        h = self.hasher()
        h.update(data)
        actual = f"{self.algorithm}:{h.hexdigest()}"
        if actual != self.value:
            raise DigestMismatchError(
                f"{what} digest mismatch: expected {self.value}, got {actual}", expected=self.value, actual=actual
            )

    def __str__(self) -> str:
        return self.value


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON for documents imgci creates (sorted keys, no spaces, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# Platforms -----------------------------------------------------------------------------------------------------
_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


@dataclass(frozen=True)
class Platform:
    """An OS/architecture[/variant] triple as in an OCI index (``linux/arm64/v8``)."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) == 1 and parts[0]:
            parts = ["linux", parts[0]]
        if len(parts) not in (2, 3) or not all(parts):
            raise PlatformError(f"invalid platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
        arch = _ARCH_ALIASES.get(parts[1], parts[1])
        variant = parts[2] if len(parts) == 3 else ""
        return cls(parts[0], arch, variant).normalized()

    @classmethod
    def host(cls) -> Platform:
        machine = os.uname().machine.lower()  # platform.machine(), without importing platform (~2 ms)
        arch = _ARCH_ALIASES.get(machine, machine)
        variant = ""
        if machine.startswith("armv7"):
            variant = "v7"
        elif machine.startswith("armv6"):
            variant = "v6"
        return cls("linux", arch, variant).normalized()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Platform:
        return cls(
            str(d.get("os", "")),
            str(d.get("architecture", "")),
            str(d.get("variant", "") or ""),
            str(d.get("os.version", "") or ""),
        )

    def normalized(self) -> Platform:
        variant = self.variant
        if self.architecture == "arm64" and variant == "v8":
            variant = ""
        if self.architecture == "arm" and not variant:
            variant = "v7"
        return Platform(self.os, self.architecture, variant, self.os_version)

    def matches(self, other: Platform) -> bool:
        """True if ``other`` (a candidate from an index) satisfies this requested platform."""
        a, b = self.normalized(), other.normalized()
        return a.os == b.os and a.architecture == b.architecture and (not a.variant or a.variant == b.variant)

    def to_dict(self) -> dict[str, str]:
        d = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            d["variant"] = self.variant
        if self.os_version:
            d["os.version"] = self.os_version
        return d

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


# Descriptors, manifests, indexes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Descriptor:
    """A pointer to content: media type, digest, size (+ optional platform, annotations, urls)."""

    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    urls: tuple[str, ...] = ()
    artifact_type: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Descriptor:
        try:
            size = int(d["size"])
            if size < 0:
                raise ValueError("negative size")
            return cls(
                media_type=str(d.get("mediaType", "")),
                digest=Digest.parse(d["digest"]),
                size=size,
                platform=Platform.from_dict(d["platform"]) if isinstance(d.get("platform"), dict) else None,
                annotations=dict(d.get("annotations") or {}),
                urls=tuple(d.get("urls") or ()),
                artifact_type=str(d.get("artifactType", "") or ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RegistryProtocolError(f"malformed descriptor {d!r}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest.value, "size": self.size}
        if self.platform is not None:
            d["platform"] = self.platform.to_dict()
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.urls:
            d["urls"] = list(self.urls)
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        return d


def _load_json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RegistryProtocolError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RegistryProtocolError(f"{what} is not a JSON object")
    return doc


def detect_media_type(raw: bytes, declared: str = "") -> str:
    """The media type of a manifest document: its own ``mediaType`` field, else the declared one, else sniffed."""
    doc = _load_json(raw, "manifest")
    mt = doc.get("mediaType") or declared
    if mt in ALL_MANIFEST_TYPES:
        return str(mt)
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc and "config" in doc:
        return OCI_MANIFEST
    if doc.get("schemaVersion") == 1:
        raise RegistryProtocolError("docker schema1 manifests are not supported (deprecated since 2019)")
    raise RegistryProtocolError(f"unsupported manifest media type {mt!r}")


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker schema2), with the exact bytes it was parsed from."""

    raw: bytes
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def digest(self) -> Digest:
        return Digest.of(self.raw)

    @classmethod
    def parse(cls, raw: bytes, media_type: str = "") -> Manifest:
        mt = detect_media_type(raw, media_type)
        if mt not in MANIFEST_TYPES:
            raise RegistryProtocolError(f"expected an image manifest, got {mt}")
        doc = _load_json(raw, "manifest")
        try:
            layers = tuple(Descriptor.from_dict(x) for x in doc.get("layers") or [])
            config = Descriptor.from_dict(doc["config"])
        except KeyError:
            raise RegistryProtocolError("manifest has no config descriptor") from None
        return cls(raw, mt, config, layers, dict(doc.get("annotations") or {}))

    @classmethod
    def build(
        cls,
        config: Descriptor,
        layers: list[Descriptor],
        *,
        media_type: str = OCI_MANIFEST,
        annotations: dict[str, str] | None = None,
    ) -> Manifest:
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config.to_dict(),
            "layers": [x.to_dict() for x in layers],
        }
        if annotations:
            doc["annotations"] = annotations
        raw = json.dumps(doc, indent=2).encode()
        return cls(raw, media_type, config, tuple(layers), dict(annotations or {}))

    def descriptor(self, platform: Platform | None = None) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.raw), platform)


@dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list, with its exact bytes."""

    raw: bytes
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def digest(self) -> Digest:
        return Digest.of(self.raw)

    @classmethod
    def parse(cls, raw: bytes, media_type: str = "") -> Index:
        mt = detect_media_type(raw, media_type)
        if mt not in INDEX_TYPES:
            raise RegistryProtocolError(f"expected an image index, got {mt}")
        doc = _load_json(raw, "index")
        manifests = tuple(Descriptor.from_dict(x) for x in doc.get("manifests") or [])
        return cls(raw, mt, manifests, dict(doc.get("annotations") or {}))

    @classmethod
    def build(cls, manifests: list[Descriptor], *, annotations: dict[str, str] | None = None) -> Index:
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [m.to_dict() for m in manifests],
        }
        if annotations:
            doc["annotations"] = annotations
        raw = json.dumps(doc, indent=2).encode()
        return cls(raw, OCI_INDEX, tuple(manifests), dict(annotations or {}))

    def select(self, wanted: Platform) -> Descriptor:
        """The manifest for ``wanted``; attestation manifests (platform unknown/unknown) are never chosen."""
        candidates = [m for m in self.manifests if m.platform is not None and m.media_type in ALL_MANIFEST_TYPES | {""}]
        for m in candidates:
            assert m.platform is not None
            if wanted.matches(m.platform):
                return m
        available = (
            ", ".join(str(m.platform) for m in candidates if m.platform and m.platform.os != "unknown") or "none"
        )
        raise PlatformError(
            f"no manifest for platform {wanted} in index {self.digest.short} (available: {available})",
            hint="pass --platform with one of the available platforms",
        )


def parse_manifest_or_index(raw: bytes, media_type: str = "") -> Manifest | Index:
    mt = detect_media_type(raw, media_type)
    return Index.parse(raw, mt) if mt in INDEX_TYPES else Manifest.parse(raw, mt)


# Image config --------------------------------------------------------------------------------------------------
@dataclass
class ImageConfig:
    """An image configuration document (``application/vnd.oci.image.config.v1+json``), kept as a dict.

    The dict is the source of truth so that fields imgci does not know survive a round trip; accessors cover
    what imgci reads. ``raw`` holds the exact bytes when parsed.
    """

    doc: dict[str, Any]
    raw: bytes = b""

    @classmethod
    def parse(cls, raw: bytes) -> ImageConfig:
        return cls(_load_json(raw, "image config"), raw)

    @property
    def diff_ids(self) -> list[Digest]:
        rootfs = self.doc.get("rootfs") or {}
        return [Digest.parse(d) for d in rootfs.get("diff_ids") or []]

    @property
    def created(self) -> str:
        return str(self.doc.get("created") or "")

    @property
    def platform(self) -> Platform:
        return Platform(
            str(self.doc.get("os", "linux")),
            str(self.doc.get("architecture", "")),
            str(self.doc.get("variant", "") or ""),
        )

    @property
    def config(self) -> dict[str, Any]:
        c = self.doc.get("config")
        return c if isinstance(c, dict) else {}

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.doc.get("history") or [])

    def to_bytes(self) -> bytes:
        return canonical_json(self.doc)


def verify_size(data: bytes, expected: int, what: str) -> None:
    if len(data) != expected:
        raise DigestMismatchError(
            f"{what} size mismatch: expected {expected} bytes, got {len(data)}",
            expected=str(expected),
            actual=str(len(data)),
        )
