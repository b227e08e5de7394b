"""A build cache in a local directory (a CI cache such as actions/cache): ``type=local,dest=DIR`` / ``src=DIR``.

The directory is an OCI image layout::

    DIR/oci-layout              {"imageLayoutVersion": "1.0.0"}
    DIR/index.json              an image index; the cache manifest's entry is annotated
                                org.opencontainers.image.ref.name=imgci-cache (other entries are kept)
    DIR/blobs/sha256/<hex>      layer blobs, the records blob, the cache manifest (format: .artifact)
    DIR/.lock                   flock: exclusive while exporting, shared while reading the index

Contract (export, :class:`LocalDirExporter`): under the exclusive lock, the records already in DIR are merged
with the new ones (by key; the new record wins and is marked used now), blobs are written through a temp file
and a rename after their digest and size were checked, then the records blob and the manifest, and index.json
(temp + rename) last — so a reader sees the old cache or the new one, never a mix. ``max_size`` then evicts the
least recently used records until the layer blobs they reference fit, and blobs nothing references any more are
removed. Two processes exporting to one DIR both end up in it, consistent. Records already in DIR whose blobs
are missing or truncated are dropped.

Contract (import, :class:`LocalDirImporter`): lazy; index.json → manifest → records, each digest-verified. A
missing DIR or index.json is a note and a miss; a corrupt index, manifest or records blob raises ImgciError (the
manager warns once); a record whose blob is missing or has the wrong size is a miss (one warning for all such).
:meth:`~LocalDirImporter.fetch_blob` copies one blob into the store, verified; a blob that fails verification is
removed from DIR (when writable) so the next export writes it again.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

from imgci.cache.backends.artifact import (
    CACHE_ARTIFACT_TYPE,
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    LOCAL_REF_NAME,
    RECORDS_MEDIA_TYPE,
    REF_NAME_ANNOTATION,
    CacheFormatError,
    cache_manifest,
    layer_blobs,
    records_document,
)
from imgci.cache.backends.base import ExportResult, Fetch, Note, drop_unavailable, obtain
from imgci.cache.backends.layout import TMP_PREFIX, CacheDir, file_chunks, is_cache_entry
from imgci.cache.records import CacheRecord
from imgci.errors import BlobNotFoundError, DigestMismatchError, ImgciError, StoreError
from imgci.oci import INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST, Descriptor, Digest
from imgci.store import Store, fsync_dir


def _quiet(message: str) -> None:
    pass


class LocalDirImporter:
    def __init__(self, src: Path, *, on_note: Note = _quiet) -> None:
        self.dir = CacheDir(src)
        self.on_note = on_note
        self._lock = threading.Lock()
        self._records: dict[str, CacheRecord] | None = None
        self._error: ImgciError | None = None

    def describe(self) -> str:
        return f"local:{self.dir.root}"

    def _load(self) -> dict[str, CacheRecord]:
        with self._lock:
            if self._records is not None:
                return self._records
            if self._error is not None:
                raise self._error
            try:
                self._records = self._read()
            except ImgciError as e:
                self._error = e
                raise
            return self._records

    def _read(self) -> dict[str, CacheRecord]:
        if not self.dir.root.is_dir():
            self.on_note(f"cache {self.describe()}: the directory does not exist (no cache yet); building without it")
            return {}
        with self.dir.locked(exclusive=False):
            loaded = self.dir.load()
        if loaded is None:
            self.on_note(f"cache {self.describe()}: no imgci cache in the directory yet; building without it")
            return {}
        records, _, _ = loaded
        complete = {r.key: r for r in records if all(self.dir.has(d) for d, _ in r.layers)}
        if len(complete) < len(records):
            self.on_note(
                f"warning: cache {self.describe()}: {len(records) - len(complete)} of {len(records)} records have a "
                "missing or truncated blob (a partly restored directory?); those steps will be built"
            )
        return complete

    def lookup(self, key: str) -> CacheRecord | None:
        return self._load().get(key)

    def fetch_blob(self, descriptor: Descriptor, store: Store) -> None:
        if store.claim(descriptor.digest):
            return
        path = self.dir.blob(descriptor.digest)
        try:
            with store.blob_writer(descriptor.digest, descriptor.size) as writer:
                for chunk in file_chunks(path):
                    writer.write(chunk)
                writer.commit()
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {descriptor.digest.short} is missing from {self.dir.root}") from None
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror or e}") from None
        except DigestMismatchError:
            self._quarantine(path, descriptor.digest)
            raise

    def _quarantine(self, path: Path, digest: Digest) -> None:
        """Remove a blob whose content does not hash to its name, so the next export writes it again (a wrong
        size in the caller's descriptor is not the directory's fault)."""
        with contextlib.suppress(OSError), self.dir.locked(exclusive=True):
            h = digest.hasher()
            for chunk in file_chunks(path):
                h.update(chunk)
            if h.hexdigest() != digest.hex:
                path.unlink()


class LocalDirExporter:
    def __init__(self, dest: Path, *, max_size: int | None = None, on_note: Note = _quiet) -> None:
        self.dir = CacheDir(dest)
        self.max_size = max_size
        self.on_note = on_note

    def describe(self) -> str:
        return f"local:{self.dir.root}"

    def export(self, records: list[CacheRecord], store: Store, fetch: Fetch) -> ExportResult:
        result = ExportResult(self.describe())
        try:
            self.dir.blobs.mkdir(parents=True, exist_ok=True)
            if not (self.dir.root / "oci-layout").exists():
                self.dir.write_file("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        except OSError as e:
            raise StoreError(f"cannot create the cache directory {self.dir.root}: {e.strerror or e}") from None
        with self.dir.locked(exclusive=True):
            self._sweep_temps()
            merged, used = self._existing()
            now = time.time()
            unavailable: dict[Digest, str] = {}
            for descriptor in layer_blobs(records):
                why = self._put_blob(descriptor, store, fetch, result)
                if why:
                    unavailable[descriptor.digest] = why
            for record in drop_unavailable(records, unavailable, result, self.on_note):
                merged[record.key] = record
                used[record.key] = now
            kept = self._evict(list(merged.values()), used, result)
            self._publish(kept, used)
            result.records = len(kept)
            result.blobs = len(layer_blobs(kept))
            self._collect(kept)
        return result

    def _existing(self) -> tuple[dict[str, CacheRecord], dict[str, float]]:
        try:
            loaded = self.dir.load()
        except ImgciError as e:
            self.on_note(f"warning: cache {self.describe()}: {e.message}; replacing what was there")
            return {}, {}
        if loaded is None:
            return {}, {}
        records, used, _ = loaded
        complete = {r.key: r for r in records if all(self.dir.has(d) for d, _ in r.layers)}
        if len(complete) < len(records):
            self.on_note(f"cache {self.describe()}: dropped {len(records) - len(complete)} records with missing blobs")
        return complete, used

    def _put_blob(self, descriptor: Descriptor, store: Store, fetch: Fetch, result: ExportResult) -> str:
        """Write one layer blob unless DIR has it; returns "" or why the blob is unavailable."""
        if self.dir.has(descriptor):
            result.existing += 1
            return ""
        why = obtain(store, descriptor, fetch)
        if why:
            return why
        try:
            self.dir.write(descriptor, file_chunks(store.blob_path(descriptor.digest)))
        except DigestMismatchError as e:
            return f"the store's copy is corrupt ({e.message}); run `imgci fsck`"
        result.uploaded += 1
        result.bytes_written += descriptor.size
        return ""

    def _evict(self, records: list[CacheRecord], used: dict[str, float], result: ExportResult) -> list[CacheRecord]:
        """Least recently used records out until the blobs of the rest fit in ``max_size``."""
        if self.max_size is None:
            return records
        refs: dict[Digest, int] = {}
        sizes: dict[Digest, int] = {}
        for record in records:
            for d in {d.digest: d for d, _ in record.layers}.values():
                refs[d.digest] = refs.get(d.digest, 0) + 1
                sizes[d.digest] = d.size
        total = sum(sizes.values())
        order = sorted(records, key=lambda r: (used.get(r.key, r.created), r.created))
        doomed: set[str] = set()
        for record in order:
            if total <= self.max_size:
                break
            doomed.add(record.key)
            for digest in {d.digest for d, _ in record.layers}:
                refs[digest] -= 1
                if refs[digest] == 0:
                    total -= sizes[digest]
        result.evicted = len(doomed)
        return [r for r in records if r.key not in doomed]

    def _publish(self, records: list[CacheRecord], used: dict[str, float]) -> None:
        """Records blob and manifest, then index.json (the switch to the new cache)."""
        raw = records_document(records, used)
        records_blob = Descriptor(RECORDS_MEDIA_TYPE, Digest.of(raw), len(raw))
        self.dir.write(records_blob, iter([raw]))
        if not layer_blobs(records) and not self.dir.has(EMPTY_DESCRIPTOR):
            self.dir.write(EMPTY_DESCRIPTOR, iter([EMPTY_JSON]))
        manifest = cache_manifest(records_blob, records)
        top = Descriptor(
            OCI_MANIFEST,
            Digest.of(manifest),
            len(manifest),
            annotations={REF_NAME_ANNOTATION: LOCAL_REF_NAME},
            artifact_type=CACHE_ARTIFACT_TYPE,
        )
        self.dir.write(top, iter([manifest]))
        fsync_dir(self.dir.blobs)
        try:
            index = self.dir.read_index() or {}
        except CacheFormatError:
            index = {}
        others = [m for m in index.get("manifests", []) if isinstance(m, dict) and not is_cache_entry(m)]
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*others, top.to_dict()]}
        self.dir.write_file("index.json", json.dumps(doc, indent=2).encode())

    def _collect(self, records: list[CacheRecord]) -> None:
        """Remove blobs that nothing in index.json reaches any more (evicted, replaced records and manifests)."""
        index = self.dir.read_index() or {}
        keep: set[str] = set()
        try:
            for entry in index.get("manifests", []):
                self._reach(Descriptor.from_dict(entry), keep)
        except (ImgciError, OSError, ValueError) as e:
            self.on_note(f"cache {self.describe()}: not removing unused blobs: {e}")
            return
        for path in self.dir.blobs.iterdir():
            if path.name.startswith(TMP_PREFIX) or path.name in keep:
                continue
            with contextlib.suppress(OSError):
                path.unlink()

    def _reach(self, descriptor: Descriptor, keep: set[str]) -> None:
        keep.add(descriptor.digest.hex)
        if descriptor.media_type not in MANIFEST_TYPES | INDEX_TYPES:
            return
        doc = json.loads(self.dir.blob(descriptor.digest).read_bytes())
        children = [doc["config"], *doc.get("layers", [])] if "config" in doc else doc.get("manifests", [])
        for child in children:
            self._reach(Descriptor.from_dict(child), keep)

    def _sweep_temps(self) -> None:
        """Temp files of an exporter that died (we hold the lock: no live writer has any)."""
        for parent in (self.dir.root, self.dir.blobs):
            for path in parent.glob(f"{TMP_PREFIX}*"):
                with contextlib.suppress(OSError):
                    path.unlink()
