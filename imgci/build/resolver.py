"""Base images for FROM and COPY --from=<image>: the small interface the build engine sees, and its implementation.

Contract: ``resolve(name, platform)`` returns the image's manifest and config for ``platform``, with every blob in
the local store. The local store is tried first (images made by ``imgci import``, pulled, or built earlier); a name
not in the store is pulled through the registry client (``pull=always`` pulls even when present, ``never`` never
pulls). Resolutions are memoised per resolver, so a build resolves each base once even when several stages use it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from imgci import reference
from imgci.errors import ImageNotFoundError, RegistryNotFoundError
from imgci.oci import Digest, ImageConfig, Manifest, Platform
from imgci.store import Store

PullPolicy = Literal["missing", "always", "never"]


@dataclass(frozen=True)
class ResolvedImage:
    name: str  # normalised reference, e.g. docker.io/library/alpine:3.19
    digest: Digest  # manifest (or index) digest the name resolved to
    manifest: Manifest
    config: ImageConfig


class ImageResolver(Protocol):
    def resolve(self, name: str, platform: Platform) -> ResolvedImage: ...


class StoreResolver:
    """Local store first, then the registry (through ``pull_fn``, normally imgci.transfer.pull_image)."""

    def __init__(
        self,
        store: Store,
        *,
        client_factory: Any = None,
        pull: PullPolicy = "missing",
        progress: Callable[[Any], None] | None = None,
    ) -> None:
        self.store = store
        self.client_factory = client_factory
        self.pull = pull
        self.progress = progress
        self._memo: dict[tuple[str, str], ResolvedImage] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def resolve(self, name: str, platform: Platform) -> ResolvedImage:
        ref = reference.parse(name)
        key = (str(ref), str(platform))
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._memo:
                self._memo[key] = self._resolve(ref, platform)
            return self._memo[key]

    def _resolve(self, ref: reference.Reference, platform: Platform) -> ResolvedImage:
        from imgci.images import config_of

        if self.pull != "always":
            rec = self.store.find_ref(str(ref))
            if rec is None and ref.digest is not None:
                rec = next((r for r in self.store.list_refs() if r.digest == ref.digest), None)
            if rec is not None:
                try:
                    manifest, cfg = config_of(self.store, rec, platform)
                    if platform.matches(cfg.platform) or self.pull == "never":
                        return ResolvedImage(str(ref), rec.digest, manifest, cfg)
                except ImageNotFoundError:
                    pass
        if self.pull == "never":
            raise ImageNotFoundError(
                f"base image {ref} is not in the local store (pull=never)", hint=f"run `imgci pull {ref}`"
            )
        if self.client_factory is None:
            raise ImageNotFoundError(f"base image {ref} is not in the local store and no registry client is set")
        from imgci.transfer import pull_image

        try:
            result = pull_image(
                self.store, ref, platform=platform, client_factory=self.client_factory, progress=self.progress
            )
        except RegistryNotFoundError as e:
            raise ImageNotFoundError(
                f"base image {ref} not found: {e.message}",
                hint="check the name and tag, or make it locally with `imgci import` / `imgci build`",
            ) from None
        desc = result.manifest
        doc = self.store.read_manifest(desc.digest, desc.media_type)
        assert isinstance(doc, Manifest)
        cfg = self.store.read_config(doc.config.digest)
        return ResolvedImage(str(ref), result.digest, doc, cfg)
