"""What every cache exporter shares: the :class:`Exporter` protocol, its result, and how a blob is obtained.

Contract: ``Exporter.export(records, store, fetch)`` writes ``records`` and every layer blob they reference to the
exporter's destination, or raises ImgciError (the CLI makes that a warning unless ``ignore-error=false``). A
blob that is neither in ``store`` nor at the destination is brought into the store with ``fetch`` (an imported
cache hit left remote, see :meth:`imgci.cache.manager.BuildCache.ensure`); a record with a blob that cannot be
obtained is left out (``ExportResult.dropped``), never exported half.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from imgci.cache.records import CacheRecord
from imgci.errors import ImgciError
from imgci.oci import Descriptor, Digest
from imgci.store import Store

Fetch = Callable[[Descriptor], None]  # bring one blob into the store (digest-verified) or raise ImgciError
Note = Callable[[str], None]


@dataclass
class ExportResult:
    """What one export did: records written, blobs referenced, and how each blob got there."""

    destination: str
    records: int = 0
    blobs: int = 0
    uploaded: int = 0  # blobs written (uploaded or copied)
    existing: int = 0  # blobs the destination already had
    mounted: int = 0  # blobs mounted from another repository of the registry
    bytes_written: int = 0
    evicted: int = 0  # records removed by max-size
    dropped: list[str] = field(default_factory=list)  # records left out: a blob could not be obtained

    def summary(self) -> str:
        parts = [f"{self.records} records", f"{self.blobs} blobs ({self.uploaded} written"]
        if self.mounted:
            parts[-1] += f", {self.mounted} mounted"
        parts[-1] += f", {self.existing} already there)"
        if self.evicted:
            parts.append(f"{self.evicted} evicted by max-size")
        if self.dropped:
            parts.append(f"{len(self.dropped)} left out (blob unavailable)")
        return f"cache exported to {self.destination}: " + ", ".join(parts)


class Exporter(Protocol):
    """A cache to write to (``--cache-to``)."""

    def describe(self) -> str: ...

    def export(self, records: list[CacheRecord], store: Store, fetch: Fetch) -> ExportResult: ...


def obtain(store: Store, descriptor: Descriptor, fetch: Fetch) -> str:
    """Make sure the store has ``descriptor``'s blob; returns "" or why it cannot be had."""
    if store.has_blob(descriptor.digest):
        return ""
    try:
        fetch(descriptor)
    except ImgciError as e:
        return e.message
    return "" if store.has_blob(descriptor.digest) else "not in the store and no cache holds it"


def drop_unavailable(
    records: list[CacheRecord], unavailable: dict[Digest, str], result: ExportResult, on_note: Note
) -> list[CacheRecord]:
    """``records`` without those that reference an unavailable blob (noted once per record)."""
    kept = []
    for record in records:
        bad = next((d for d, _ in record.layers if d.digest in unavailable), None)
        if bad is None:
            kept.append(record)
            continue
        result.dropped.append(record.instruction)
        on_note(f"cache export: {record.instruction!r} left out: layer {bad.digest.short}: {unavailable[bad.digest]}")
    return kept
