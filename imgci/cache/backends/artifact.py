"""The exported cache format, shared by the registry and local-directory backends (and the inline reader).

Contract: what :func:`records_document` and :func:`cache_manifest` write, :func:`parse_records_document`,
:func:`parse_cache_manifest` and :func:`inline_records` read back; a document they cannot read is an ImgciError
(never another exception), which callers turn into a warning and a cache miss.

An exported cache is an OCI 1.1 artifact — an image manifest (image-spec "guidelines for artifact usage"):

- ``artifactType``: ``application/vnd.imgci.cache.v1+json``
- ``config``: the records blob, media type ``application/vnd.imgci.cache.records.v1+json`` (the artifact's own
  config type, so no registry mistakes it for a runnable image), a JSON document::

      {"version": 1,
       "records": [<CacheRecord JSON>, ...],        # imgci.cache.records.CacheRecord.dumps() objects
       "used": {"<key>": <unix time last exported/used>, ...}}   # for max-size eviction (local dirs)

- ``layers``: every layer blob a record references, once each, with the descriptor the record holds (its media
  type as built: gzip/zstd/uncompressed tar). A cache without layer blobs lists the empty descriptor
  (``application/vnd.oci.empty.v1+json``, ``{}``), as the spec asks for artifacts without content.
- ``annotations``: ``org.opencontainers.image.created`` (the export time) and ``dev.imgci.cache.records`` (count).

Inline cache (``--cache-to type=inline``): the image config gets a top-level key ``"imgci.cache.v1"`` whose value
is the list of the final image's chain of records (min mode, parent first), each a CacheRecord JSON object as
in ``records`` above — i.e. ``config["imgci.cache.v1"] = [json.loads(r.dumps()) for r in chain]``. Their layer
descriptors are the image's own layers, so the image's repository holds every blob they need.
"""

from __future__ import annotations

import json
import time
from typing import Any

from imgci.cache.records import CacheRecord
from imgci.errors import ImgciError, InvalidDigestError, RegistryProtocolError
from imgci.oci import OCI_MANIFEST, Descriptor, Digest, canonical_json

CACHE_ARTIFACT_TYPE = "application/vnd.imgci.cache.v1+json"
RECORDS_MEDIA_TYPE = "application/vnd.imgci.cache.records.v1+json"
INLINE_CONFIG_KEY = "imgci.cache.v1"
RECORDS_VERSION = 1
LOCAL_REF_NAME = "imgci-cache"  # org.opencontainers.image.ref.name of the cache manifest in a local directory
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
MAX_DOCUMENT_SIZE = 64 * 1024 * 1024  # a records document or manifest larger than this is refused, not read
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
EMPTY_DESCRIPTOR = Descriptor(EMPTY_MEDIA_TYPE, Digest.of(EMPTY_JSON), len(EMPTY_JSON))


class CacheFormatError(ImgciError):
    """An exported cache document that cannot be read (corrupt, foreign, or from a newer imgci)."""


def layer_blobs(records: list[CacheRecord]) -> list[Descriptor]:
    """Every layer blob the records reference, once each, in record order."""
    seen: dict[Digest, Descriptor] = {}
    for record in records:
        for descriptor, _ in record.layers:
            seen.setdefault(descriptor.digest, descriptor)
    return list(seen.values())


def records_document(records: list[CacheRecord], used: dict[str, float] | None = None) -> bytes:
    now = time.time()
    used = used or {}
    return canonical_json(
        {
            "version": RECORDS_VERSION,
            "records": [json.loads(r.dumps()) for r in records],
            "used": {r.key: float(used.get(r.key, now)) for r in records},
        }
    )


def _records(items: Any, where: str) -> list[CacheRecord]:
    if not isinstance(items, list):
        raise CacheFormatError(f"{where}: the records are not a list")
    out = []
    for item in items:
        try:
            out.append(CacheRecord.loads(json.dumps(item)))
        except (KeyError, TypeError, ValueError, AttributeError, InvalidDigestError, RegistryProtocolError) as e:
            raise CacheFormatError(f"{where}: malformed cache record: {e}") from None
    return out


def parse_records_document(raw: bytes, where: str) -> tuple[list[CacheRecord], dict[str, float]]:
    """(records, last-used times by key) from a records blob; ``where`` names it in errors."""
    doc = _json_object(raw, where, "the cache records document")
    version = doc.get("version")
    if version != RECORDS_VERSION:
        raise CacheFormatError(
            f"{where}: cache records version {version!r} is not supported (this imgci reads version {RECORDS_VERSION})",
            hint="a newer imgci may have written it; export the cache again with this version",
        )
    records = _records(doc.get("records"), where)
    raw_used = doc.get("used")
    used: dict[str, float] = {}
    for key, value in (raw_used if isinstance(raw_used, dict) else {}).items():
        if isinstance(value, int | float):
            used[str(key)] = float(value)
    return records, used


def cache_manifest(records_blob: Descriptor, records: list[CacheRecord]) -> bytes:
    """The artifact manifest over a records blob (with its digest and size) and the records' layer blobs."""
    layers = layer_blobs(records) or [EMPTY_DESCRIPTOR]
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": CACHE_ARTIFACT_TYPE,
        "config": Descriptor(RECORDS_MEDIA_TYPE, records_blob.digest, records_blob.size).to_dict(),
        "layers": [Descriptor(d.media_type, d.digest, d.size).to_dict() for d in layers],
        "annotations": {
            "org.opencontainers.image.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dev.imgci.cache.records": str(len(records)),
        },
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def manifest_json(raw: bytes, where: str) -> dict[str, Any]:
    return _json_object(raw, where, "the manifest")


def _json_object(raw: bytes, where: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"{where}: {what} is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CacheFormatError(f"{where}: {what} is not a JSON object")
    return doc


def is_cache_manifest(doc: dict[str, Any]) -> bool:
    config = doc.get("config")
    return doc.get("artifactType") == CACHE_ARTIFACT_TYPE or (
        isinstance(config, dict) and config.get("mediaType") == RECORDS_MEDIA_TYPE
    )


def parse_cache_manifest(doc: dict[str, Any], where: str) -> tuple[Descriptor, list[Descriptor]]:
    """(records blob, layer blobs) of a cache manifest (see :func:`is_cache_manifest`)."""
    try:
        config = Descriptor.from_dict(doc["config"])
        layers = [Descriptor.from_dict(x) for x in doc.get("layers") or []]
    except (KeyError, TypeError, InvalidDigestError, RegistryProtocolError) as e:
        raise CacheFormatError(f"{where}: malformed cache manifest: {e}") from None
    if config.size > MAX_DOCUMENT_SIZE:
        raise CacheFormatError(f"{where}: the cache records are {config.size} bytes, more than imgci reads")
    return config, [d for d in layers if d.media_type != EMPTY_MEDIA_TYPE]


def inline_records(config_raw: bytes, where: str) -> list[CacheRecord] | None:
    """The records an image config carries under ``"imgci.cache.v1"``, or None if it carries none."""
    try:
        doc = json.loads(config_raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"{where}: the image config is not JSON: {e}") from None
    if not isinstance(doc, dict) or INLINE_CONFIG_KEY not in doc:
        return None
    return _records(doc[INLINE_CONFIG_KEY], f"{where} ({INLINE_CONFIG_KEY})")
