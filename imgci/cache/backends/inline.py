"""Reading an inline cache: the records an image built with ``--cache-to type=inline`` carries in its config.

Contract: :func:`records_from_image` takes the manifest (or index) a registry ref resolved to and returns the
records of the image's config key ``"imgci.cache.v1"`` (format: :mod:`imgci.cache.backends.artifact`) — for an
index, of the manifest for ``platform`` — or raises ImgciError when the image carries no cache or cannot be read.
Writing the key is the builder's job (``--cache-to type=inline``); the exporter side has nothing to push.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgci.cache.backends.artifact import INLINE_CONFIG_KEY, MAX_DOCUMENT_SIZE, CacheFormatError, inline_records
from imgci.cache.records import CacheRecord
from imgci.errors import ImgciError
from imgci.oci import INDEX_TYPES, Descriptor, Index, Manifest, Platform
from imgci.reference import Reference

if TYPE_CHECKING:
    from imgci.registry.client import FetchedManifest, RegistryClient


class _Buffer:
    """A BlobSink that keeps the bytes (for small documents: records, configs)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes, /) -> int:
        self.parts.append(bytes(data))
        return len(data)


def read_small_blob(client: RegistryClient, repository: str, descriptor: Descriptor, what: str) -> bytes:
    """A small blob's bytes, size- and digest-verified (raises ImgciError)."""
    if descriptor.size > MAX_DOCUMENT_SIZE:
        raise CacheFormatError(f"{what} is {descriptor.size} bytes, more than imgci reads")
    sink = _Buffer()
    client.fetch_blob(repository, descriptor, sink)
    data = b"".join(sink.parts)
    descriptor.digest.verify(data, what=what)
    if len(data) != descriptor.size:
        raise CacheFormatError(f"{what} is {len(data)} bytes, its descriptor says {descriptor.size}")
    return data


def records_from_image(
    client: RegistryClient, ref: Reference, top: FetchedManifest, platform: Platform
) -> list[CacheRecord]:
    try:
        if top.media_type in INDEX_TYPES:
            chosen = Index.parse(top.raw, top.media_type).select(platform)
            fetched = client.get_manifest(ref.with_digest(chosen.digest))
            manifest = Manifest.parse(fetched.raw, fetched.media_type)
        else:
            manifest = Manifest.parse(top.raw, top.media_type)
    except ImgciError as e:
        raise CacheFormatError(f"{ref} is neither an imgci cache nor an image: {e.message}") from None
    config = read_small_blob(client, ref.repository, manifest.config, f"image config {manifest.config.digest.short}")
    records = inline_records(config, str(ref))
    if records is None:
        raise CacheFormatError(
            f"{ref} is an image without an inline cache (no {INLINE_CONFIG_KEY!r} in its config)",
            hint="build it with --cache-to type=inline, or export a cache with --cache-to type=registry,ref=…",
        )
    return records
