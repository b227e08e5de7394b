"""A build cache in a registry: ``--cache-from type=registry,ref=REF`` and ``--cache-to type=registry,ref=REF``.

Contract (import, :class:`RegistryImporter`): lazy — the first :meth:`~RegistryImporter.lookup` GETs the manifest at
REF; an imgci cache artifact (format: :mod:`imgci.cache.backends.artifact`) gives its records blob (size- and
digest-verified), an image gives the records of its inline cache (:mod:`.inline`). Records are then answered by
key from memory. A ref the registry does not have (404) is a one-line note and a miss for every key; an
unreachable registry, an error status, or a corrupt or foreign document raise ImgciError from that lookup and
from every later one (the manager warns once). :meth:`~RegistryImporter.fetch_blob` streams one layer from REF's
repository into the store, verified by the store's writer. Auth, TLS and retries are the registry client's.

Contract (export, :class:`RegistryExporter`): pushes every layer blob of the records — HEAD first, so what the
repository has is not sent again; then a cross-repository mount from the ``mount_from`` repositories of the same
registry (the ``--cache-from`` refs and the image's names); then an upload from the store, after fetching a blob
that an imported hit left remote — then the records blob, then the artifact manifest, tagged at REF (replacing
what was there, as buildx does). A record whose blob cannot be obtained is left out; registry errors raise.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from imgci import reference as reference_mod
from imgci.cache.backends.artifact import (
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    RECORDS_MEDIA_TYPE,
    cache_manifest,
    is_cache_manifest,
    layer_blobs,
    manifest_json,
    parse_cache_manifest,
    parse_records_document,
    records_document,
)
from imgci.cache.backends.base import ExportResult, Fetch, Note, drop_unavailable, obtain
from imgci.cache.backends.inline import read_small_blob, records_from_image
from imgci.cache.records import CacheRecord
from imgci.errors import ImgciError, RegistryError, RegistryNotFoundError
from imgci.oci import OCI_MANIFEST, Descriptor, Digest, Platform
from imgci.reference import Reference
from imgci.store import Store

if TYPE_CHECKING:
    from imgci.registry.client import RegistryClient

ClientFactory = Callable[[str], "RegistryClient"]
_WORKERS = 4


def _quiet(message: str) -> None:
    pass


class RegistryImporter:
    def __init__(
        self,
        ref: Reference,
        client_factory: ClientFactory,
        *,
        platform: Platform | None = None,
        on_note: Note = _quiet,
    ) -> None:
        self.ref = ref
        self.client_factory = client_factory
        self.platform = platform or Platform.host()
        self.on_note = on_note
        self._lock = threading.Lock()
        self._records: dict[str, CacheRecord] | None = None
        self._error: ImgciError | None = None

    def describe(self) -> str:
        return str(self.ref)

    def _client(self) -> RegistryClient:
        return self.client_factory(self.ref.registry)

    def _load(self) -> dict[str, CacheRecord]:
        with self._lock:
            if self._records is not None:
                return self._records
            if self._error is not None:
                raise self._error
            try:
                self._records = {r.key: r for r in self._read()}
            except ImgciError as e:
                self._error = e
                raise
            return self._records

    def _read(self) -> list[CacheRecord]:
        client = self._client()
        try:
            top = client.get_manifest(self.ref)
        except RegistryNotFoundError:
            self.on_note(f"cache {self.ref}: not found (no cache exported there yet); building without it")
            return []
        doc = manifest_json(top.raw, str(self.ref))
        if not is_cache_manifest(doc):
            return records_from_image(client, self.ref, top, self.platform)
        records_blob, _ = parse_cache_manifest(doc, str(self.ref))
        raw = read_small_blob(client, self.ref.repository, records_blob, f"cache records {records_blob.digest.short}")
        records, _ = parse_records_document(raw, str(self.ref))
        return records

    def lookup(self, key: str) -> CacheRecord | None:
        return self._load().get(key)

    def fetch_blob(self, descriptor: Descriptor, store: Store) -> None:
        if store.claim(descriptor.digest):
            return
        with store.blob_writer(descriptor.digest, descriptor.size) as writer:
            self._client().fetch_blob(self.ref.repository, descriptor, writer)
            writer.commit()


class RegistryExporter:
    def __init__(
        self,
        ref: Reference,
        client_factory: ClientFactory,
        *,
        mount_from: Iterable[str] = (),
        on_note: Note = _quiet,
    ) -> None:
        self.ref = ref
        self.client_factory = client_factory
        self.on_note = on_note
        self.mount_from: list[str] = []
        for hint in mount_from:
            try:
                parsed = reference_mod.parse(hint)
            except ImgciError:
                continue
            same_registry = parsed.registry == ref.registry and parsed.repository != ref.repository
            if same_registry and parsed.repository not in self.mount_from:
                self.mount_from.append(parsed.repository)

    def describe(self) -> str:
        return str(self.ref)

    def export(self, records: list[CacheRecord], store: Store, fetch: Fetch) -> ExportResult:
        client = self.client_factory(self.ref.registry)
        repo = self.ref.repository
        result = ExportResult(str(self.ref))
        unavailable: dict[Digest, str] = {}
        lock = threading.Lock()

        def push(descriptor: Descriptor) -> None:
            outcome = self._push_blob(client, descriptor, store, fetch)
            with lock:
                if outcome in ("existing", "mounted", "uploaded"):
                    setattr(result, outcome, getattr(result, outcome) + 1)
                    if outcome == "uploaded":
                        result.bytes_written += descriptor.size
                else:
                    unavailable[descriptor.digest] = outcome

        blobs = layer_blobs(records)
        with ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="imgci-cache-export") as pool:
            for _ in pool.map(push, blobs):
                pass
        records = drop_unavailable(records, unavailable, result, self.on_note)
        if not layer_blobs(records):
            self._push_bytes(client, EMPTY_DESCRIPTOR, EMPTY_JSON)
        raw = records_document(records)
        records_blob = Descriptor(RECORDS_MEDIA_TYPE, Digest.of(raw), len(raw))
        self._push_bytes(client, records_blob, raw)
        client.put_manifest(repo, self.ref.tag or "latest", cache_manifest(records_blob, records), OCI_MANIFEST)
        result.records = len(records)
        result.blobs = len(layer_blobs(records))
        return result

    def _push_blob(self, client: RegistryClient, descriptor: Descriptor, store: Store, fetch: Fetch) -> str:
        """ "existing", "mounted", "uploaded", or why the blob is unavailable."""
        repo, digest = self.ref.repository, descriptor.digest
        if client.blob_exists(repo, digest, push=True) is not None:
            return "existing"
        location: str | None = None
        for source in self.mount_from:
            try:
                mounted = client.mount_blob(repo, digest, source)
            except RegistryError as e:
                if e.temporary:
                    raise
                continue  # e.g. no pull access to the source: upload instead, as docker does
            if mounted.mounted:
                return "mounted"
            location = mounted.location or location
        why = obtain(store, descriptor, fetch)
        if why:
            return why
        client.upload_blob(repo, descriptor, lambda: store.open_blob(digest), location=location)
        return "uploaded"

    def _push_bytes(self, client: RegistryClient, descriptor: Descriptor, data: bytes) -> None:
        repo = self.ref.repository
        if client.blob_exists(repo, descriptor.digest, push=True) is None:
            client.upload_blob(repo, descriptor, lambda: io.BytesIO(data))
