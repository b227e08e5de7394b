"""Image state during a build, and assembling the final config + manifest into the store.

Contract: :class:`ImageState` is immutable — every step returns a new one (``evolve``), so a state can be shared
between stages and vertices without copying surprises. ``assemble`` writes the config and manifest blobs (layers
are already in the store) and returns the manifest descriptor; the same state always yields the same bytes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from typing import Any

from imgci.oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Digest,
    ImageConfig,
    Manifest,
    Platform,
)
from imgci.store import Store

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INLINE_CACHE_KEY = "imgci.cache.v1"  # top-level config field of an image built with --cache-to type=inline
NOT_INHERITED = (INLINE_CACHE_KEY,)  # a base image's own build cache says nothing about the image built on it


@dataclass(frozen=True)
class Layer:
    """A layer of the image being built: its compressed blob and its diff_id."""

    descriptor: Descriptor
    diff_id: Digest


@dataclass(frozen=True)
class ImageState:
    """The image as built so far: config section, layers, history, platform, and where it came from."""

    platform: Platform
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    layers: tuple[Layer, ...] = ()
    history: tuple[dict[str, Any], ...] = ()
    base_name: str = ""  # e.g. docker.io/library/alpine:3.19 ("" for scratch)
    base_digest: str = ""  # manifest digest of the base ("" for scratch)
    os_version: str = ""
    base_extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # unknown config keys
    cache_key: str = field(default="", compare=False)  # the build cache key of the step that produced this state

    @classmethod
    def scratch(cls, platform: Platform) -> ImageState:
        return cls(platform=platform, config={"Env": [f"PATH={DEFAULT_PATH}"], "WorkingDir": "/"})

    @classmethod
    def from_image(cls, cfg: ImageConfig, layers: list[Layer], name: str, digest: str) -> ImageState:
        doc = cfg.doc
        section = copy.deepcopy(doc.get("config") or {})
        extra = {k: v for k, v in doc.items() if k not in _KNOWN_TOP_LEVEL and k not in NOT_INHERITED}
        return cls(
            platform=cfg.platform,
            config=section,
            layers=tuple(layers),
            history=tuple(copy.deepcopy(doc.get("history") or [])),
            base_name=name,
            base_digest=digest,
            os_version=str(doc.get("os.version", "") or ""),
            base_extra=extra,
        )

    # -- config helpers -------------------------------------------------------------------------------------
    @property
    def env(self) -> list[str]:
        return list(self.config.get("Env") or [])

    def env_map(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.env:
            k, _, v = item.partition("=")
            out[k] = v
        return out

    @property
    def workdir(self) -> str:
        return str(self.config.get("WorkingDir") or "/")

    @property
    def user(self) -> str:
        return str(self.config.get("User") or "")

    @property
    def diff_ids(self) -> list[Digest]:
        return [layer.diff_id for layer in self.layers]

    def evolve(self, **changes: Any) -> ImageState:
        """A new state with top-level fields replaced; pass ``config=`` a full new dict to change the config."""
        return replace(self, **changes)

    def with_config(self, **fields: Any) -> ImageState:
        """A new state with config-section fields set (``None`` removes a field)."""
        cfg = copy.deepcopy(self.config)
        for k, v in fields.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        return replace(self, config=cfg)

    def with_history(self, created_by: str, *, empty_layer: bool, created: str, comment: str = "") -> ImageState:
        entry: dict[str, Any] = {"created": created, "created_by": created_by}
        if comment:
            entry["comment"] = comment
        if empty_layer:
            entry["empty_layer"] = True
        return replace(self, history=(*self.history, entry))

    def with_layer(self, layer: Layer) -> ImageState:
        return replace(self, layers=(*self.layers, layer))

    # -- assembly -------------------------------------------------------------------------------------------
    def config_document(self, created: str) -> dict[str, Any]:
        doc: dict[str, Any] = dict(self.base_extra)
        doc.update(
            {
                "architecture": self.platform.architecture,
                "os": self.platform.os,
                "created": created,
                "config": self.config,
                "rootfs": {"type": "layers", "diff_ids": [d.value for d in self.diff_ids]},
                "history": list(self.history),
            }
        )
        if self.platform.variant:
            doc["variant"] = self.platform.variant
        if self.os_version:
            doc["os.version"] = self.os_version
        return doc


_KNOWN_TOP_LEVEL = {
    "architecture",
    "os",
    "variant",
    "os.version",
    "created",
    "config",
    "rootfs",
    "history",
    "author",
    "container",
    "container_config",
    "docker_version",
    "id",
    "parent",
    "comment",
}


def assemble(
    store: Store,
    state: ImageState,
    *,
    created: str,
    docker_media_types: bool = False,
    annotations: dict[str, str] | None = None,
) -> tuple[Manifest, Descriptor]:
    """Write the config and manifest for ``state``; returns the manifest and its descriptor (with platform)."""
    doc = state.config_document(created)
    raw_config = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    cfg = store.write_blob(raw_config)
    layers = list(_layer_descriptors(state.layers, docker_media_types))
    config_desc = Descriptor(DOCKER_CONFIG if docker_media_types else OCI_CONFIG, cfg.digest, cfg.size)
    manifest = Manifest.build(
        config_desc,
        layers,
        media_type=DOCKER_MANIFEST if docker_media_types else OCI_MANIFEST,
        annotations=None if docker_media_types else annotations,
    )
    written = store.write_blob(manifest.raw)
    platform = state.platform
    return manifest, Descriptor(manifest.media_type, written.digest, written.size, platform)


def _layer_descriptors(layers: tuple[Layer, ...], docker: bool) -> list[Descriptor]:
    out = []
    for layer in layers:
        d = layer.descriptor
        mt = d.media_type
        if docker and mt == OCI_LAYER_GZIP:
            mt = DOCKER_LAYER_GZIP
        elif not docker and mt == DOCKER_LAYER_GZIP:
            mt = OCI_LAYER_GZIP
        out.append(Descriptor(mt, d.digest, d.size, annotations=d.annotations, urls=d.urls))
    return out
