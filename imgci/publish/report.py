"""The run report: what ``imgci run`` did for every matrix entry — the one model every report is rendered from.

Contract: :class:`RunReport` is filled by the runner (``imgci.publish.runner``) and never printed here.
``RunReport.to_json()`` is the ``imgci-metadata.json`` document (``write_metadata``); the renderers in
``summary``, ``github`` and ``gitlab`` read only these fields. Secrets never enter a report: it holds names,
digests, sizes, counts, durations and error messages (which the registry layer already keeps free of credentials).

Entry statuses:
- ``built``: built (and pushed when ``push``); ``unchanged``: the registry already had this image (same image
  key), so it was not rebuilt — only missing tags were added; ``failed``: build or push failed (``error``);
  ``cancelled``: not finished because another entry failed (no ``--keep-going``); ``planned``: ``--dry-run``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["built", "unchanged", "failed", "cancelled", "planned"]
METADATA_VERSION = 1


@dataclass
class ErrorInfo:
    message: str
    hint: str = ""
    file: str = ""  # the Dockerfile or build.yaml the error points into, when it does
    line: int = 0
    phase: str = "build"  # config | build | push | cache-export


@dataclass
class PushInfo:
    """One tag of one entry pushed (or not): ``attempts`` counts every try of every request the push made
    that failed and was retried, plus one; ``retries`` says why each retry happened (``HTTP 429``, …)."""

    tag: str
    ok: bool = False
    digest: str = ""
    attempts: int = 1
    retries: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    uploaded_blobs: int = 0
    skipped_blobs: int = 0  # the registry already had them
    mounted_blobs: int = 0
    only_tagged: bool = False  # the image was there already: only the tag was added
    duration: float = 0.0
    error: str = ""


@dataclass
class CacheInfo:
    hits: int = 0
    misses: int = 0
    bytes_reused: int = 0
    time_saved: float = 0.0

    @property
    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


@dataclass
class EntryReport:
    id: str  # unique in the run, safe in file and variable names: "app-python-3.11"
    target: str  # the build.yaml target
    label: str  # for people: "app (python=3.11)"
    matrix: dict[str, str] = field(default_factory=dict)
    status: Status = "planned"
    tags: list[str] = field(default_factory=list)
    digest: str = ""  # manifest (or index) digest
    image_key: str = ""
    platforms: list[str] = field(default_factory=list)
    size: int = 0  # config + compressed layers (+ manifests), bytes
    dockerfile: str = ""  # path, relative to the build.yaml's directory when inside it
    cache: CacheInfo = field(default_factory=CacheInfo)
    build_seconds: float = 0.0
    push_seconds: float = 0.0
    total_seconds: float = 0.0
    pushes: list[PushInfo] = field(default_factory=list)
    cache_exports: list[str] = field(default_factory=list)  # one line per --cache-to: what it exported, or warning
    error: ErrorInfo | None = None
    steps: int = 0

    @property
    def ok(self) -> bool:
        return self.status in ("built", "unchanged", "planned")

    @property
    def push_attempts(self) -> int:
        return sum(p.attempts for p in self.pushes)


@dataclass
class RunReport:
    config: str  # the build.yaml path as given
    entries: list[EntryReport] = field(default_factory=list)
    ci: dict[str, str] = field(default_factory=dict)  # CI metadata used for templates (branch, sha, ...)
    provider: str = ""  # github | gitlab | "" (local)
    duration: float = 0.0
    push: bool = False
    dry_run: bool = False
    error: ErrorInfo | None = None  # a failure before any entry ran (e.g. an invalid build.yaml)

    @property
    def ok(self) -> bool:
        return self.error is None and all(e.ok for e in self.entries)

    def entry(self, entry_id: str) -> EntryReport:
        return next(e for e in self.entries if e.id == entry_id)

    def to_json(self) -> dict[str, Any]:
        entries = []
        for e in self.entries:
            d = asdict(e)
            d["ok"] = e.ok
            d["push_attempts"] = e.push_attempts
            d["cache"]["hit_rate"] = e.cache.hit_rate
            entries.append(d)
        return {
            "version": METADATA_VERSION,
            "config": self.config,
            "ok": self.ok,
            "provider": self.provider,
            "push": self.push,
            "dry_run": self.dry_run,
            "duration": round(self.duration, 3),
            "ci": dict(self.ci),
            "error": asdict(self.error) if self.error else None,
            "entries": entries,
        }


def write_metadata(report: RunReport, path: Path) -> None:
    """``imgci-metadata.json``, written atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".imgci-metadata-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report.to_json(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
