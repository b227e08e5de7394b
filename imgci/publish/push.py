"""Pushing the tags of a built image, counting retries; finding an unchanged image in the registry and re-tagging it.

Contract:
- :func:`push_tag` pushes the local ref ``tag`` to the same name, with the registry client's bounded retries (its
  :class:`~imgci.registry.retry.RetryPolicy`); every retried attempt is recorded in the returned :class:`PushInfo`
  (``attempts``, ``retries``). A failure past the bound is recorded (``ok=False``, ``error``), never raised, so one
  entry's push cannot lose another's results.
- :func:`remote_image_key` reads the image key (``dev.imgci.image-key``: a config label of a manifest, an annotation
  of an index) of the image a tag names, or None when the tag does not exist or carries no key.
- :func:`retag` makes ``dest`` name the image ``source`` names without rebuilding: in the same repository by
  putting the manifest under the new tag, in another repository of the same registry by mounting the blobs first;
  anything else (another registry, a refused mount) pulls the image into the store and pushes it.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from imgci import reference
from imgci.build.builder import IMAGE_KEY_LABEL
from imgci.errors import ImgciError, RegistryError, RegistryNotFoundError
from imgci.oci import INDEX_TYPES, Descriptor, Index, Manifest
from imgci.publish.report import PushInfo
from imgci.reference import Reference
from imgci.registry.retry import RetryEvent, listen
from imgci.store import Store
from imgci.transfer import TransferEvent, pull_image, push_image

ClientFactory = Callable[[str], Any]
Log = Callable[[str], None]


class _RetryLog:
    """Collects the retries made while pushing one tag (from every transfer thread)."""

    def __init__(self, tag: str, log: Log) -> None:
        self.tag = tag
        self.log = log
        self.reasons: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, e: RetryEvent) -> None:
        with self._lock:
            self.reasons.append(e.reason)
        what = f" ({e.digest[:19]})" if e.digest else ""
        self.log(f"retrying push of {self.tag}{what}: {e.reason} on attempt {e.attempt}, next in {e.delay:.1f}s")


def push_tag(
    store: Store,
    tag: str,
    *,
    client_factory: ClientFactory,
    mount_from: Iterable[str] = (),
    log: Log = lambda line: None,
) -> PushInfo:
    """Push the local image ``tag`` to the registry it names; see the module contract."""
    info = PushInfo(tag=tag)
    retries = _RetryLog(tag, log)
    started = time.monotonic()

    def progress(e: TransferEvent) -> None:
        if e.done and e.action in ("uploaded", "mounted"):
            log(e.message)

    try:
        with listen(retries):
            result = push_image(
                store,
                tag,
                reference.parse(tag),
                client_factory=client_factory,
                progress=progress,
                mount_from=list(mount_from),
            )
    except ImgciError as e:
        info.error = e.message + (f" ({e.hint})" if e.hint else "")
        log(f"push of {tag} failed: {info.error}")
    else:
        info.ok = True
        info.digest = result.digest.value
        info.uploaded_bytes = result.uploaded_bytes
        info.uploaded_blobs = result.uploaded_blobs
        info.skipped_blobs = result.skipped_blobs
        info.mounted_blobs = result.mounted_blobs
        log(
            f"pushed {tag}@{result.digest.value}: {result.uploaded_blobs} blobs uploaded ({result.uploaded_bytes} B), "
            f"{result.skipped_blobs} already there, {result.mounted_blobs} mounted"
        )
    info.retries = list(retries.reasons)
    info.attempts = 1 + len(info.retries)
    info.duration = time.monotonic() - started
    return info


@dataclass(frozen=True)
class RemoteImage:
    ref: Reference
    raw: bytes
    media_type: str
    digest: str
    key: str  # "" when the image carries none


def remote_image(ref: Reference, client_factory: ClientFactory) -> RemoteImage | None:
    """The image ``ref`` names in its registry with its image key, or None when the tag does not exist."""
    client = client_factory(ref.registry)
    try:
        fetched = client.get_manifest(ref)
    except RegistryNotFoundError:
        return None
    key = ""
    if fetched.media_type in INDEX_TYPES:
        key = Index.parse(fetched.raw, fetched.media_type).annotations.get(IMAGE_KEY_LABEL, "")
    else:
        manifest = Manifest.parse(fetched.raw, fetched.media_type)
        if manifest.config.size <= 4 * 1024 * 1024:
            buf = io.BytesIO()
            client.fetch_blob(ref.repository, manifest.config, buf)
            manifest.config.digest.verify(buf.getvalue())
            try:
                config = json.loads(buf.getvalue())
                key = str(((config.get("config") or {}).get("Labels") or {}).get(IMAGE_KEY_LABEL, ""))
            except (ValueError, AttributeError):
                key = ""
    return RemoteImage(ref, fetched.raw, fetched.media_type, fetched.digest.value, key)


def _blobs(image: RemoteImage, client: Any) -> tuple[list[Descriptor], list[tuple[Descriptor, bytes]]]:
    """(blobs, child manifests) of a remote manifest or index."""
    if image.media_type not in INDEX_TYPES:
        m = Manifest.parse(image.raw, image.media_type)
        return [m.config, *m.layers], []
    blobs: list[Descriptor] = []
    children: list[tuple[Descriptor, bytes]] = []
    for child in Index.parse(image.raw, image.media_type).manifests:
        fetched = client.get_manifest(image.ref.with_digest(child.digest))
        m = Manifest.parse(fetched.raw, fetched.media_type)
        blobs += [m.config, *m.layers]
        children.append((child, fetched.raw))
    return blobs, children


def retag(
    store: Store, source: RemoteImage, dest: str, *, client_factory: ClientFactory, log: Log = lambda line: None
) -> PushInfo:
    """Make ``dest`` name ``source``'s image; see the module contract. Never raises for registry failures."""
    info = PushInfo(tag=dest, only_tagged=True)
    retries = _RetryLog(dest, log)
    started = time.monotonic()
    dest_ref = reference.parse(dest)
    try:
        with listen(retries):
            if dest_ref.registry == source.ref.registry and _tag_in_place(source, dest_ref, client_factory):
                info.digest = source.digest
            else:
                pulled = pull_image(store, source.ref, platform=None, client_factory=client_factory)
                store.set_ref(dest, pulled.manifest)  # another registry: this platform's image is copied
                result = push_image(store, dest, dest_ref, client_factory=client_factory)
                info.digest = result.digest.value
                info.uploaded_blobs, info.uploaded_bytes = result.uploaded_blobs, result.uploaded_bytes
        info.ok = True
        log(f"tagged {dest}@{info.digest} (unchanged image, nothing rebuilt)")
    except ImgciError as e:
        info.error = e.message
        log(f"tagging {dest} failed: {e.message}")
    info.retries = list(retries.reasons)
    info.attempts = 1 + len(info.retries)
    info.duration = time.monotonic() - started
    return info


def _tag_in_place(source: RemoteImage, dest: Reference, client_factory: ClientFactory) -> bool:
    """Put the manifest under ``dest`` in the same registry (mounting blobs across repositories); False when the
    registry refuses a mount (the caller then copies through the store)."""
    client = client_factory(dest.registry)
    if dest.repository != source.ref.repository:
        blobs, children = _blobs(source, client_factory(source.ref.registry))
        for blob in {b.digest: b for b in blobs}.values():
            if client.blob_exists(dest.repository, blob.digest, push=True) is not None:
                continue
            try:
                mounted = client.mount_blob(dest.repository, blob.digest, source.ref.repository)
            except RegistryError as e:
                if e.temporary:
                    raise
                return False
            if not mounted.mounted:
                return False
        for child, raw in children:
            client.put_manifest(dest.repository, child.digest.value, raw, child.media_type)
    client.put_manifest(dest.repository, dest.tag or "latest", source.raw, source.media_type)
    return True
