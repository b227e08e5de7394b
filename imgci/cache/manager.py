"""The build cache as one build sees it: local records, then imported caches, then exports.

Contract of :class:`BuildCache`:
- :meth:`lookup` answers a step key from the local cache, then from each importer in the order given (``--cache-from``
  order); an imported hit brings the record's layer blobs into the store (digest-verified by the importer) and
  records it locally. Any importer failure is a warning and a miss, never a failed build (STYLE.md rule 8).
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
from imgci.store import Store


class Importer(Protocol):
    """A cache to read from (``--cache-from``)."""

    def describe(self) -> str: ...

    def lookup(self, key: str) -> CacheRecord | None:
        """The record of ``key``, or None; raises ImgciError when the cache cannot be read (a warning)."""
        ...

    def fetch(self, record: CacheRecord, store: Store) -> None:
        """Bring the record's layer blobs into ``store``, verified; raises ImgciError on failure (a miss)."""
        ...


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
        self._lock = threading.Lock()
        self.outcomes: list[StepOutcome] = []
        self.used: dict[str, CacheRecord] = {}  # every record this build hit or made, by key
        self.missed: set[str] = set()
        self.bases: dict[str, tuple[str, str]] = {}  # base key -> (image name, digest)
        self._broken: set[int] = set()  # importers that failed once: not asked again in this build

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
        for n, importer in enumerate(self.importers):
            if n in self._broken:
                continue
            try:
                record = importer.lookup(key)
                if record is None:
                    continue
                importer.fetch(record, self.store)
            except ImgciError as e:
                self._warn_once(n, f"cache {importer.describe()}: {e.message}; continuing without it")
                continue
            try:
                self.local.put(record)
            except ImgciError as e:
                self.on_warning(f"cannot record an imported cache entry locally: {e.message}")
            return record, importer.describe()
        return None, ""

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
