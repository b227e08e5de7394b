"""The on-disk side of a local cache directory (an OCI image layout): paths, the lock, verified reads, atomic
writes. See :mod:`imgci.cache.backends.localdir` for the layout and what the importer and exporter promise.

Contract: :meth:`CacheDir.write` makes a blob visible only after its digest and size matched (temp file in
``blobs/sha256/``, fsync, rename); :meth:`CacheDir.write_file` replaces a top-level file (``index.json``) the same
way; :meth:`CacheDir.load` reads index.json → cache manifest → records, each digest-verified, raising
:class:`CacheFormatError` for anything it cannot read and returning None when the directory holds no cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgci.cache.backends.artifact import (
    LOCAL_REF_NAME,
    MAX_DOCUMENT_SIZE,
    REF_NAME_ANNOTATION,
    CacheFormatError,
    manifest_json,
    parse_cache_manifest,
    parse_records_document,
)
from imgci.cache.records import CacheRecord
from imgci.errors import DigestMismatchError, ImgciError, StoreError
from imgci.oci import Descriptor, Digest
from imgci.store import fsync_dir

TMP_PREFIX = ".tmp-"
_READ = 1 << 20


class CacheDir:
    """The layout on disk: paths, the lock, verified reads and atomic writes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"

    def blob(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex

    def has(self, descriptor: Descriptor) -> bool:
        """The blob is present with its declared size (the digest is checked when it is read)."""
        try:
            return self.blob(descriptor.digest).stat().st_size == descriptor.size
        except OSError:
            return False

    @contextlib.contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[None]:
        """The directory's flock; a reader of a directory it cannot write (no .lock) goes without."""
        try:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            if exclusive:
                raise
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read_verified(self, descriptor: Descriptor, what: str) -> bytes:
        if descriptor.size > MAX_DOCUMENT_SIZE:
            raise CacheFormatError(f"{self.root}: {what} is {descriptor.size} bytes, more than imgci reads")
        try:
            data = self.blob(descriptor.digest).read_bytes()
        except OSError as e:
            raise CacheFormatError(f"{self.root}: cannot read {what} {descriptor.digest.short}: {e.strerror}") from None
        if len(data) != descriptor.size:
            raise CacheFormatError(f"{self.root}: {what} is {len(data)} bytes, its descriptor says {descriptor.size}")
        descriptor.digest.verify(data, what=f"{self.root}: {what}")
        return data

    def read_index(self) -> dict[str, Any] | None:
        """index.json, or None when the directory holds no layout yet."""
        try:
            raw = (self.root / "index.json").read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CacheFormatError(f"{self.root}: cannot read index.json: {e.strerror}") from None
        doc = manifest_json(raw, f"{self.root}/index.json")
        if not isinstance(doc.get("manifests", []), list):
            raise CacheFormatError(f"{self.root}/index.json: manifests is not a list")
        return doc

    def load(self) -> tuple[list[CacheRecord], dict[str, float], set[Digest]] | None:
        """(records, last used, the cache's blobs) from the cache manifest index.json names; None if there is none."""
        index = self.read_index()
        if index is None:
            return None
        entry = next((m for m in index.get("manifests", []) if is_cache_entry(m)), None)
        if entry is None:
            return None
        try:
            top = Descriptor.from_dict(entry)
        except ImgciError as e:
            raise CacheFormatError(f"{self.root}/index.json: {e.message}") from None
        doc = manifest_json(self.read_verified(top, "cache manifest"), f"{self.root}: cache manifest")
        records_blob, layers = parse_cache_manifest(doc, f"{self.root}: cache manifest")
        records, used = parse_records_document(self.read_verified(records_blob, "cache records"), str(self.root))
        return records, used, {top.digest, records_blob.digest, *(d.digest for d in layers)}

    def write(self, descriptor: Descriptor, chunks: Iterator[bytes]) -> None:
        """Write a blob through a temp file, checking its digest and size before the rename."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        tmp = self.blobs / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        h = hashlib.new(descriptor.digest.algorithm)
        size = 0
        try:
            with open(tmp, "xb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            actual = f"{descriptor.digest.algorithm}:{h.hexdigest()}"
            if actual != descriptor.digest.value or size != descriptor.size:
                raise DigestMismatchError(
                    f"{self.root}: blob {descriptor.digest} came out as {actual} ({size} bytes)",
                    expected=descriptor.digest.value,
                    actual=actual,
                )
            os.replace(tmp, self.blob(descriptor.digest))
        except OSError as e:
            raise StoreError(f"cannot write the cache directory {self.root}: {e.strerror or e}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def write_file(self, name: str, data: bytes) -> None:
        tmp = self.root / f"{TMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / name)
            fsync_dir(self.root)
        except OSError as e:
            raise StoreError(f"cannot write {self.root / name}: {e.strerror or e}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def is_cache_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and (entry.get("annotations") or {}).get(REF_NAME_ANNOTATION) == LOCAL_REF_NAME


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(_READ), b"")
