"""The build cache as one build sees it: local records, then imported caches, then exports.

Contract of :class:`BuildCache`:
- :meth:`lookup` answers a step key from the local cache, then from each importer in the order given (``--cache-from``
  order). An imported hit's layer blobs stay remote until :meth:`ensure` is asked for them — before a later step
  reads that state's files, and for the final image — so a hit whose content nothing needs downloads nothing. A
  fetched record is recorded locally. An importer that cannot be read is a warning and a miss (STYLE.md rule 8); a
  blob that cannot be fetched raises :class:`CacheBlobUnavailable`, and the builder runs the build again with
  those steps as misses (:meth:`poison`).
- :meth:`miss` explains a miss (see :mod:`imgci.cache.explain`) and remembers it; :meth:`put` stores what a step
  produced; both feed :meth:`summary` (hits, misses with reasons, bytes reused, time saved).
- ``disabled`` (``--no-cache``) or a stage in ``no_cache_stages`` (``--no-cache-filter``) makes lookups miss with
  that reason, but results are still recorded, as BuildKit does.
- :meth:`records_for_export` gives the records an exporter writes: every record this build used or made (``max``)
  or only those of the final image's chain (``min``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from imgci.cache.explain import explain
from imgci.cache.local import LocalCache
from imgci.cache.records import CacheRecord
from imgci.errors import ImgciError
from imgci.oci import Descriptor, Digest
from imgci.store import Store


class Importer(Protocol):
    """A cache to read from (``--cache-from``). Lazy: nothing is read before the first lookup, and a layer blob
    only when the build needs its content (:meth:`fetch_blob`)."""

    def describe(self) -> str: ...

    def lookup(self, key: str) -> CacheRecord | None:
        """The record of ``key``, or None; raises ImgciError when the cache cannot be read (a warning)."""
        ...

    def fetch_blob(self, descriptor: Descriptor, store: Store) -> None:
        """Bring one layer blob into ``store``, digest-verified; raises ImgciError on failure."""
        ...


class CacheBlobUnavailable(ImgciError):
    """A layer of an imported cache hit could not be fetched; ``keys`` are the records to treat as misses."""

    def __init__(self, message: str, keys: set[str]) -> None:
        super().__init__(message)
        self.keys = keys


@dataclass
class StepOutcome:
    name: str
    key: str
    cached: bool
    reason: str = ""
    source: str = ""  # where a hit came from: "local" or an importer's description
    duration: float = 0.0
    bytes: int = 0


@dataclass
class BuildCache:
    store: Store
    importers: list[Importer] = field(default_factory=list)
    disabled: bool = False
    no_cache_stages: set[str] = field(default_factory=set)
    on_warning: Callable[[str], None] = lambda message: None

    def __post_init__(self) -> None:
        self.local = LocalCache(self.store)
        self.attempt = 1  # the builder's try (a retry after CacheBlobUnavailable gets fresh solver vertices)
        self._lock = threading.Lock()
        self.outcomes: list[StepOutcome] = []
        self.used: dict[str, CacheRecord] = {}  # every record this build hit or made, by key
        self.missed: set[str] = set()
        self.bases: dict[str, tuple[str, str]] = {}  # base key -> (image name, digest)
        self._broken: set[int] = set()  # importers that failed once: not asked again in this build
        self.poisoned: set[str] = set()  # imported records whose blobs could not be fetched: misses from now on
        self._pending: dict[Digest, tuple[Importer, Descriptor, str]] = {}  # blob -> (importer, descriptor, key)

    # -- lookups ---------------------------------------------------------------------------------------------------
    def lookup(self, key: str, *, stage: str, name: str) -> CacheRecord | None:
        if self.disabled or stage.lower() in self.no_cache_stages:
            return None
        record = self.local.lookup(key)
        source = "local"
        if record is None:
            record, source = self._import(key)
        if record is not None:
            with self._lock:
                self.used[key] = record
                self.outcomes.append(
                    StepOutcome(name, key, True, source=source, duration=record.duration, bytes=record.size)
                )
        return record

    def _import(self, key: str) -> tuple[CacheRecord | None, str]:
        if key in self.poisoned:
            return None, ""
        for n, importer in enumerate(self.importers):
            if n in self._broken:
                continue
            try:
                record = importer.lookup(key)
            except ImgciError as e:
                self._warn_once(n, f"cache {importer.describe()}: {e.message}; continuing without it")
                continue
            if record is None:
                continue
            remote = [d for d, _ in record.layers if not self.store.claim(d.digest)]
            with self._lock:
                for d in remote:
                    self._pending.setdefault(d.digest, (importer, d, key))
            if not remote:  # nothing to fetch (a metadata step, or layers the store has): keep it locally now
                try:
                    self.local.put(record)
                except ImgciError as e:
                    self.on_warning(f"cannot record an imported cache entry locally: {e.message}")
            return record, importer.describe()
        return None, ""

    def ensure(self, layers: Any) -> None:
        """Fetch the blobs of ``layers`` (imgci.build.image.Layer) that imported hits left remote, before their
        content is used; raises CacheBlobUnavailable (the build then runs again with those steps as misses)."""
        for layer in layers:
            with self._lock:
                pending = self._pending.get(layer.descriptor.digest)
            if pending is None:
                continue
            importer, descriptor, key = pending
            try:
                importer.fetch_blob(descriptor, self.store)
            except ImgciError as e:
                raise CacheBlobUnavailable(
                    f"cache {importer.describe()}: layer {descriptor.digest.short}: {e.message}", {key}
                ) from None
            with self._lock:
                self._pending.pop(layer.descriptor.digest, None)
            record = self.used.get(key)
            if record is not None and all(self.store.has_blob(d.digest) for d, _ in record.layers):
                try:
                    self.local.put(record)
                except ImgciError as e:
                    self.on_warning(f"cannot record an imported cache entry locally: {e.message}")

    def poison(self, keys: set[str]) -> None:
        with self._lock:
            self.poisoned |= keys
            self._pending = {d: p for d, p in self._pending.items() if p[2] not in keys}
            self.outcomes = []
            self.used = {}
            self.missed = set()

    def _warn_once(self, n: int, message: str) -> None:
        with self._lock:
            if n in self._broken:
                return
            self._broken.add(n)
        self.on_warning(message)

    # -- misses and results ----------------------------------------------------------------------------------------
    def note_base(self, key: str, image: str, digest: str) -> None:
        """A FROM: remembered so that a changed base image digest can be named."""
        with self._lock:
            self.bases[key] = (image, digest)
        record = CacheRecord(
            key=key, parent=f"from:{image}", instruction=f"FROM {image}", inputs={"digest": digest}, config={}
        )
        try:
            if self.local.lookup(key) is None:
                self.local.put(record)
        except ImgciError:
            pass

    def miss(self, key: str, parent: str, *, stage: str, name: str, instruction: str, inputs: dict[str, Any]) -> str:
        if self.disabled:
            reason = "--no-cache"
        elif key in self.poisoned:
            reason = "the cached layer could not be fetched from the imported cache"
        elif stage.lower() in self.no_cache_stages:
            reason = f"--no-cache-filter {stage}"
        else:
            try:
                siblings = [r for r in self.local.siblings(parent) if r.key != key]
            except ImgciError:
                siblings = []
            reason = explain(
                instruction,
                inputs,
                siblings,
                parent_missed=parent in self.missed,
                base_change=self._base_change(parent),
            )
        with self._lock:
            self.missed.add(key)
            self.outcomes.append(StepOutcome(name, key, False, reason=reason))
        return reason

    def _base_change(self, parent: str) -> str:
        base = self.bases.get(parent)
        if base is None:
            return ""
        image, digest = base
        try:
            previous = [r for r in self.local.siblings(f"from:{image}") if r.key != parent]
        except ImgciError:
            return ""
        if not previous:
            return ""
        old = str(previous[0].inputs.get("digest", ""))
        return f"base image {image} digest changed: {old[:19]} → {digest[:19]}"

    def put(self, record: CacheRecord) -> None:
        try:
            self.local.put(record)
        except ImgciError as e:
            self.on_warning(f"cannot record the cache entry of {record.instruction}: {e.message}")
        with self._lock:
            self.used[record.key] = record
            for outcome in self.outcomes:
                if outcome.key == record.key and not outcome.cached:
                    outcome.duration = record.duration

    # -- reporting and export --------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        with self._lock:
            hits = [o for o in self.outcomes if o.cached]
            misses = [o for o in self.outcomes if not o.cached]
            return {
                "hits": len(hits),
                "misses": len(misses),
                "bytes_reused": sum(o.bytes for o in hits),
                "time_saved": round(sum(o.duration for o in hits), 3),
                "steps": [
                    {"step": o.name, "cached": o.cached, **({"source": o.source} if o.cached else {"reason": o.reason})}
                    for o in self.outcomes
                ],
            }

    def records_for_export(self, mode: str, final_key: str) -> list[CacheRecord]:
        with self._lock:
            used = dict(self.used)
        if mode == "max":
            return list(used.values())
        chain = []
        key = final_key
        while key in used:
            chain.append(used[key])
            key = used[key].parent
        return list(reversed(chain))
