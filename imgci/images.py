"""Local image operations on the store: resolve, list, tag, remove, disk usage.

Contract: these functions never print; they return records the CLI renders. Names are stored fully qualified
(``docker.io/library/busybox:latest``) and accepted in any form docker accepts (``busybox``), or as an image
digest / unambiguous digest prefix (at least 4 hex characters) of a ref in the store.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from dataclasses import dataclass, field

from imgci import reference
from imgci.errors import ImageNotFoundError, ImgciError, StoreError, UsageError
from imgci.oci import INDEX_TYPES, Descriptor, Digest, ImageConfig, Index, Manifest, Platform
from imgci.store import RefRecord, Store

_HEX_PREFIX = re.compile(r"^(sha256:)?[a-f0-9]{4,64}$")


@dataclass(frozen=True)
class ImageSummary:
    """One row of ``imgci ls``."""

    name: str
    familiar: str
    digest: Digest
    media_type: str
    size: int
    created: str
    updated: float
    platforms: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class UsageRecord:
    """One row of ``imgci du`` / ``imgci prune``: a blob, whether gc would free it, and what it is."""

    digest: Digest
    reclaimable: bool
    size: int
    description: str


def normalise_name(text: str) -> str:
    return str(reference.parse(text))


def resolve(store: Store, text: str) -> RefRecord:
    """The ref ``text`` names: an exact name, a docker-style short name, or a digest (prefix) of a ref."""
    with contextlib.suppress(ImgciError):
        rec = store.find_ref(normalise_name(text))
        if rec is not None:
            return rec
    if _HEX_PREFIX.match(text):
        prefix = text if text.startswith("sha256:") else "sha256:" + text
        matches = [r for r in store.list_refs() if r.digest.value.startswith(prefix)]
        digests = {r.digest for r in matches}
        if len(digests) == 1:
            return matches[0]
        if len(digests) > 1:
            raise UsageError(f"digest prefix {text} is ambiguous: it matches {len(digests)} images")
    try:
        reference.parse(text)
    except ImgciError as e:
        raise UsageError(f"{e}") from None
    raise ImageNotFoundError(f"image {text} is not in the local store", hint="see `imgci ls`, or `imgci pull` it")


def manifests_of(store: Store, digest: Digest, media_type: str = "") -> list[tuple[Manifest, Platform | None]]:
    """The image manifests under ``digest`` (itself if a manifest, its present children if an index)."""
    doc = store.read_manifest(digest, media_type)
    if isinstance(doc, Manifest):
        return [(doc, None)]
    out: list[tuple[Manifest, Platform | None]] = []
    for child in doc.manifests:
        if child.media_type in INDEX_TYPES or not store.has_blob(child.digest):
            continue
        sub = store.read_manifest(child.digest, child.media_type)
        if isinstance(sub, Manifest):
            out.append((sub, child.platform))
    return out


def image_size(store: Store, digest: Digest, media_type: str = "") -> int:
    """Bytes the image occupies in the store: its manifests, configs and (compressed) layers, each counted once."""
    seen: dict[Digest, int] = {}
    for d in store.reachable({digest}):
        with contextlib.suppress(StoreError):
            seen[d] = store.blob_size(d)
    return sum(seen.values())


def summarize(store: Store, rec: RefRecord) -> ImageSummary:
    created = ""
    labels: dict[str, str] = {}
    platforms: list[str] = []
    with contextlib.suppress(ImgciError):
        for manifest, plat in manifests_of(store, rec.digest, rec.media_type):
            cfg = store.read_config(manifest.config.digest)
            created = max(created, cfg.created)
            labels.update({str(k): str(v) for k, v in (cfg.config.get("Labels") or {}).items()})
            platforms.append(str(plat or cfg.platform))
    try:
        familiar = reference.parse(rec.name).familiar()
    except ImgciError:
        familiar = rec.name
    return ImageSummary(
        name=rec.name,
        familiar=familiar,
        digest=rec.digest,
        media_type=rec.media_type,
        size=image_size(store, rec.digest, rec.media_type),
        created=created,
        updated=rec.updated,
        platforms=tuple(platforms),
        labels=labels,
    )


def _matches(summary: ImageSummary, key: str, value: str, store: Store) -> bool:
    if key == "reference":
        return fnmatch.fnmatchcase(summary.familiar, value) or fnmatch.fnmatchcase(summary.name, value)
    if key == "digest":
        return summary.digest.value.startswith(value if value.startswith("sha256:") else "sha256:" + value)
    if key == "label":
        k, eq, v = value.partition("=")
        return k in summary.labels and (not eq or summary.labels[k] == v)
    if key in ("before", "since"):
        other = summarize(store, resolve(store, value))
        return summary.updated < other.updated if key == "before" else summary.updated > other.updated
    raise UsageError(f"invalid filter {key!r}: supported filters are reference, digest, label, before, since")


def list_images(store: Store, filters: list[str] | None = None) -> list[ImageSummary]:
    """Every ref in the store, summarised, filtered by ``key=value`` filters (all must match)."""
    parsed: list[tuple[str, str]] = []
    for f in filters or []:
        key, eq, value = f.partition("=")
        if not eq:
            raise UsageError(f"invalid filter {f!r}: expected key=value (e.g. reference='myapp*')")
        parsed.append((key.strip(), value.strip()))
    out = []
    for rec in store.list_refs():
        s = summarize(store, rec)
        if all(_matches(s, k, v, store) for k, v in parsed):
            out.append(s)
    return out


def tag(store: Store, source: str, target: str) -> tuple[RefRecord, str]:
    """Point ``target`` at what ``source`` names; returns (source record, normalised target name)."""
    rec = resolve(store, source)
    target_ref = reference.parse(target)
    if target_ref.digest is not None:
        raise UsageError(f"cannot tag with a digest: {target!r}; give a name[:tag]")
    name = str(target_ref)
    store.set_ref(name, Descriptor(rec.media_type, rec.digest, rec.size))
    return rec, name


def remove(store: Store, names: list[str]) -> tuple[list[RefRecord], int, int]:
    """Remove refs, then collect what no ref needs any more; returns (removed refs, blobs freed, bytes freed)."""
    removed = []
    for n in names:
        rec = resolve(store, n)
        removed.append(store.delete_ref(rec.name))
    blobs, freed = store.gc()
    return removed, blobs, freed


def disk_usage(store: Store) -> list[UsageRecord]:
    """Every blob in the store with its size, whether gc would free it, and what uses it."""
    describe: dict[Digest, str] = {}
    for rec in store.list_refs():
        try:
            short = reference.parse(rec.name).familiar()
        except ImgciError:
            short = rec.name
        with contextlib.suppress(ImgciError):
            _describe_tree(store, rec.digest, rec.media_type, short, describe)
    for (value,) in store._db().execute("SELECT DISTINCT digest FROM cache_blobs").fetchall():
        describe.setdefault(Digest(value), "build cache")  # kept until `prune --keep-storage/--filter/--all`
    keep = store.reachable(store.roots())
    rows = []
    for d in store.iter_blobs():
        try:
            size = store.blob_size(d)
        except StoreError:
            continue
        rows.append(UsageRecord(d, d not in keep, size, describe.get(d, "unreferenced")))
    rows.sort(key=lambda r: (not r.reclaimable, -r.size))
    return rows


def _describe_tree(store: Store, digest: Digest, media_type: str, owner: str, out: dict[Digest, str]) -> None:
    doc = store.read_manifest(digest, media_type)
    if isinstance(doc, Index):
        out.setdefault(digest, f"index of {owner}")
        for child in doc.manifests:
            if store.has_blob(child.digest):
                _describe_tree(store, child.digest, child.media_type, f"{owner} ({child.platform})", out)
        return
    out.setdefault(digest, f"manifest of {owner}")
    out.setdefault(doc.config.digest, f"config of {owner}")
    for i, layer in enumerate(doc.layers, 1):
        out.setdefault(layer.digest, f"layer {i}/{len(doc.layers)} of {owner}")


def config_of(store: Store, rec: RefRecord, platform: Platform | None = None) -> tuple[Manifest, ImageConfig]:
    """The manifest and config of ``rec`` (for an index: the entry matching ``platform``, default the host)."""
    candidates = manifests_of(store, rec.digest, rec.media_type)
    if not candidates:
        raise ImageNotFoundError(f"image {rec.name} has no manifest in the local store")
    if len(candidates) > 1 or platform is not None:
        wanted = platform or Platform.host()
        for manifest, plat in candidates:
            cfg = store.read_config(manifest.config.digest)
            if wanted.matches(plat or cfg.platform):
                return manifest, cfg
        if platform is not None:
            raise ImageNotFoundError(f"image {rec.name} has no manifest for platform {platform} in the local store")
    manifest = candidates[0][0]
    return manifest, store.read_config(manifest.config.digest)
