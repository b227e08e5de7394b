"""Pull images from a registry into the Store, and push images from the Store to a registry.

Contract (pull):
- The reference resolves to a manifest, or to an index from which the requested platform is selected
  (attestation entries are never chosen). Config and layers download in parallel (bounded), blobs the store already
  has are claimed instead of downloaded, and every blob is verified (size and digest) before it becomes visible.
- Documents are written after the blobs they point to: layers and config, then the manifest, then the index (kept
  so a digest-pinned index reference stays resolvable), then the ref — ``registry/repo:tag``, or
  ``registry/repo@digest`` for a digest reference — pointing at the selected platform manifest. A failure leaves no
  ref and no unverified blob.

Contract (push):
- The local ref may name a manifest, or an index whose child manifests are all in the store. When the destination
  tag already names the same manifest digest, nothing else is done (one HEAD). Otherwise each blob is checked
  with HEAD; a missing one is mounted from another repository of the same registry when one is known to hold it
  (``mount_from`` hints, plus local images pulled from that registry), else uploaded; blobs go in parallel.
  Manifests go last: an index's children by digest, then the top document by tag (or by digest).
  A blob whose source repository is known is mounted without asking first (the destination is asked if the
  mount is declined). Blobs can also go ahead of the push (:class:`PrePush`: ``build --push`` sends each layer
  as the build makes it); the push then waits for those and does not ask for them again.

Progress goes to an optional callback as :class:`TransferEvent` objects (possibly from worker threads); this
module never prints.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from imgci import reference as reference_mod
from imgci.errors import (
    BlobNotFoundError,
    DigestMismatchError,
    ImgciError,
    InvalidDigestError,
    PlatformError,
    RegistryError,
    RegistryProtocolError,
    StoreCorruptError,
)
from imgci.oci import INDEX_TYPES, Descriptor, Digest, ImageConfig, Index, Manifest, Platform, parse_manifest_or_index
from imgci.reference import Reference
from imgci.store import Store

if TYPE_CHECKING:
    from imgci.registry.client import FetchedManifest, RegistryClient

ClientFactory = Callable[[str], "RegistryClient"]
T = TypeVar("T")
DEFAULT_WORKERS = 4
_PROGRESS_INTERVAL = 0.2  # seconds between progress events for one blob


@dataclass(frozen=True)
class TransferEvent:
    """One progress event. ``key`` identifies the line it updates (a blob's short digest, or the image);
    ``done`` says whether that line is final; ``message`` is a human rendering of the rest."""

    action: str  # resolving resolved exists downloading downloaded uploading uploaded mounted manifest warning done
    key: str
    message: str
    done: bool = True
    digest: str = ""
    current: int = 0
    total: int = 0


ProgressFn = Callable[[TransferEvent], None]


@dataclass(frozen=True)
class PullResult:
    """``digest`` is what the reference resolved to (the index for a multi-platform image); ``manifest`` is the
    platform manifest the new ref ``name`` points at."""

    name: str
    reference: Reference
    digest: Digest
    media_type: str
    manifest: Descriptor
    platform: Platform | None
    size: int
    downloaded_bytes: int
    downloaded_blobs: int
    skipped_blobs: int


@dataclass(frozen=True)
class PushResult:
    reference: Reference
    digest: Digest
    media_type: str
    uploaded_bytes: int
    uploaded_blobs: int
    skipped_blobs: int
    mounted_blobs: int


class _Reporter:
    """Throttled, thread-safe event emission."""

    def __init__(self, progress: ProgressFn | None) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}

    def __call__(self, action: str, key: str, message: str, **kw: object) -> None:
        if self._progress is not None:
            self._progress(TransferEvent(action, key, message, **kw))  # type: ignore[arg-type]

    def bytes_fn(self, action: str, verb: str, desc: Descriptor) -> Callable[[int], None]:
        key = desc.digest.short
        total = desc.size

        def report(current: int) -> None:
            if self._progress is None:
                return
            now = time.monotonic()
            with self._lock:
                if now - self._last.get(key, 0.0) < _PROGRESS_INTERVAL:
                    return
                self._last[key] = now
            pct = f"{100 * current // total}%" if total else ""
            self(
                action,
                key,
                f"{key}: {verb} {pct}".rstrip(),
                done=False,
                digest=desc.digest.value,
                current=current,
                total=total,
            )

        return report


def _parallel(items: Iterable[T], fn: Callable[[T], None], workers: int) -> None:
    """Run ``fn`` on every item with at most ``workers`` threads; the first failure cancels what has not started
    and is raised once the running ones have finished."""
    todo = list(items)
    if not todo:
        return
    if workers <= 1 or len(todo) == 1:
        for item in todo:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(todo)), thread_name_prefix="imgci-transfer") as pool:
        # each task runs in a copy of the caller's context: a retry listener (imgci.registry.retry.listen) follows
        futures: list[Future[None]] = [pool.submit(contextvars.copy_context().run, fn, item) for item in todo]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C: start nothing new; running transfers end with their current request
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        failed = next((f for f in futures if f.done() and not f.cancelled() and f.exception() is not None), None)
        if failed is not None:
            for f in futures:
                f.cancel()
            wait(futures)
            exc = failed.exception()
            assert exc is not None
            raise exc
    for f in futures:
        f.result()


def _unique(descs: Iterable[Descriptor]) -> list[Descriptor]:
    seen: dict[Digest, Descriptor] = {}
    for d in descs:
        seen.setdefault(d.digest, d)
    return list(seen.values())


# -- pull --------------------------------------------------------------------------------------------------------
def pull_image(
    store: Store,
    ref: Reference,
    *,
    platform: Platform | None = None,
    client_factory: ClientFactory,
    progress: ProgressFn | None = None,
    max_workers: int = DEFAULT_WORKERS,
) -> PullResult:
    """Pull ``ref`` (for ``platform``, default the host's) into ``store`` and name it; see the module contract."""
    wanted = platform or Platform.host()
    report = _Reporter(progress)
    client = client_factory(ref.registry)
    name = str(ref.with_digest(ref.digest)) if ref.digest is not None else str(ref.with_tag(ref.tag or "latest"))
    report("resolving", name, f"{ref.familiar()}: resolving", done=False)
    top = client.get_manifest(ref)
    index_raw: bytes | None = None
    chosen_platform: Platform | None = None
    if top.media_type in INDEX_TYPES:
        index = _parse_remote(Index.parse, top, ref)
        chosen = index.select(wanted)
        chosen_platform = chosen.platform
        fetched = client.get_manifest(ref.with_digest(chosen.digest))
        if len(fetched.raw) != chosen.size:
            raise DigestMismatchError(
                f"manifest {chosen.digest} of {ref} is {len(fetched.raw)} bytes, the index says {chosen.size}",
                expected=str(chosen.size),
                actual=str(len(fetched.raw)),
            )
        manifest = _parse_remote(Manifest.parse, fetched, ref)
        manifest_desc = Descriptor(manifest.media_type, chosen.digest, chosen.size, chosen.platform)
        index_raw = top.raw
    else:
        manifest = _parse_remote(Manifest.parse, top, ref)
        manifest_desc = Descriptor(manifest.media_type, top.digest, len(top.raw))
    report("resolved", name, f"{ref.familiar()}: resolved to {top.digest}", digest=top.digest.value)

    blobs = _unique([manifest.config, *manifest.layers])
    counts = {"bytes": 0, "blobs": 0, "skipped": 0}
    lock = threading.Lock()

    def fetch(desc: Descriptor) -> None:
        key = desc.digest.short
        if store.claim(desc.digest):
            if store.blob_size(desc.digest) != desc.size:
                raise StoreCorruptError(f"blob {desc.digest} in the store is not {desc.size} bytes; run `imgci fsck`")
            with lock:
                counts["skipped"] += 1
            report("exists", key, f"{key}: already exists", digest=desc.digest.value, total=desc.size)
            return
        on_bytes = report.bytes_fn("downloading", "downloading", desc)
        on_bytes(0)
        with store.blob_writer(desc.digest, desc.size) as writer:
            client.fetch_blob(ref.repository, desc, writer, progress=on_bytes)
            try:
                writer.commit()
            except DigestMismatchError as e:
                # the store's message knows the bytes, not where they came from: name the registry and repository
                raise DigestMismatchError(
                    f"fetch blob {ref.registry}/{ref.repository}@{desc.digest}: {e.message}",
                    expected=e.expected,
                    actual=e.actual,
                ) from None
        with lock:
            counts["bytes"] += desc.size
            counts["blobs"] += 1
        report("downloaded", key, f"{key}: pull complete", digest=desc.digest.value, current=desc.size, total=desc.size)

    if chosen_platform is None and platform is not None:
        # An explicit --platform on a single-platform image: check the config before downloading layers.
        fetch(manifest.config)
        _check_platform(store, manifest, wanted, chosen_platform, report, name, strict=True)
        blobs = [b for b in blobs if b.digest != manifest.config.digest]
    _parallel(blobs, fetch, max_workers)
    _check_platform(store, manifest, wanted, chosen_platform, report, name)
    store.write_blob(manifest.raw, manifest_desc.digest)
    if index_raw is not None:
        store.write_blob(index_raw, top.digest)
    store.set_ref(name, manifest_desc)
    size = manifest_desc.size + sum(d.size for d in blobs)
    report("done", name, f"{ref.familiar()}: pulled {top.digest}", digest=top.digest.value)
    return PullResult(
        name=name,
        reference=ref,
        digest=top.digest,
        media_type=top.media_type,
        manifest=manifest_desc,
        platform=chosen_platform,
        size=size,
        downloaded_bytes=counts["bytes"],
        downloaded_blobs=counts["blobs"],
        skipped_blobs=counts["skipped"],
    )


def _parse_remote(parse: Callable[[bytes, str], T], fetched: FetchedManifest, ref: Reference) -> T:
    """Parse a document the registry sent. A malformed one (e.g. a descriptor whose digest is ``sha256:../x``,
    which Digest refuses before any path or URL is built from it) is a RegistryProtocolError naming the registry,
    the repository and the document's digest: the bare parse error does not say where the document came from."""
    try:
        return parse(fetched.raw, fetched.media_type)
    except (InvalidDigestError, RegistryProtocolError) as e:
        raise RegistryProtocolError(
            f"pull manifest {ref.registry}/{ref.repository}@{fetched.digest}: {e.message}",
            registry=ref.registry,
            repository=ref.repository,
            digest=fetched.digest.value,
        ) from None


def _check_platform(
    store: Store,
    manifest: Manifest,
    wanted: Platform,
    chosen: Platform | None,
    report: _Reporter,
    key: str,
    *,
    strict: bool = False,
) -> None:
    """A single-platform image for another platform is refused when the platform was asked for explicitly
    (``strict``, as docker does for ``--platform``), else kept with a warning."""
    if chosen is not None:
        return
    try:
        actual = ImageConfig.parse(store.read_blob(manifest.config.digest)).platform
    except (ImgciError, ValueError):
        return
    if actual.architecture and not wanted.matches(actual):
        if strict:
            raise PlatformError(
                f"image {key} is for platform {actual}, not the requested {wanted}",
                hint=f"pull without --platform, or with --platform {actual}",
            )
        report("warning", key, f"warning: the image's platform ({actual}) does not match {wanted}")


# -- push --------------------------------------------------------------------------------------------------------
@dataclass
class _PushCounts:
    uploaded_bytes: int = 0
    uploaded: int = 0
    skipped: int = 0
    mounted: int = 0


def _local_documents(
    store: Store, digest: Digest, media_type: str
) -> tuple[bytes, str, list[tuple[Descriptor, bytes]]]:
    """(top raw, top media type, [(child descriptor, child raw)]) for a manifest or an index in the store."""
    raw = store.read_blob(digest)
    doc = parse_manifest_or_index(raw, media_type)
    if isinstance(doc, Manifest):
        return raw, doc.media_type, []
    children: list[tuple[Descriptor, bytes]] = []
    for child in doc.manifests:
        if child.media_type in INDEX_TYPES:
            raise BlobNotFoundError(f"index {digest} nests index {child.digest}; pushing nested indexes is unsupported")
        try:
            children.append((child, store.read_blob(child.digest)))
        except BlobNotFoundError:
            where = f" ({child.platform})" if child.platform else ""
            raise BlobNotFoundError(
                f"manifest {child.digest}{where} of index {digest} is not in the local store",
                hint="an image pulled for one platform can only be pushed as that platform's manifest",
            ) from None
    return raw, doc.media_type, children


def _mount_sources(store: Store, registry: str, repository: str, hints: Iterable[str]) -> dict[Digest, list[str]]:
    """Repositories of ``registry`` (other than ``repository``) known to hold each blob: local refs pulled from
    there, then the hints (whose blobs are unknown, so they are tried for every blob)."""
    known: dict[Digest, list[str]] = {}
    prefix = registry + "/"
    for rec in store.list_refs():
        if not rec.name.startswith(prefix):
            continue
        with contextlib.suppress(ImgciError, ValueError):
            repo = reference_mod.parse(rec.name).repository
            if repo == repository:
                continue
            for d in store.reachable({rec.digest}):
                repos = known.setdefault(d, [])
                if repo not in repos:
                    repos.append(repo)
    wildcard: list[str] = []
    for hint in hints:
        with contextlib.suppress(ImgciError):
            parsed = reference_mod.parse(hint, default_tag=None)
            if parsed.registry == registry and parsed.repository != repository and parsed.repository not in wildcard:
                wildcard.append(parsed.repository)
    if wildcard:
        known[_ANY] = wildcard
    return known


_ANY = Digest("sha256:" + "0" * 64)  # key for "try for every blob" in the mount-source map

# One upload of a blob to a registry at a time in this process: pushes running in parallel (a build.yaml matrix
# whose images share a base layer) wait for the first upload, then find the blob there (same repository) or mount
# it (another repository named in their mount hints) instead of uploading it again.
_UPLOADS_LOCK = threading.Lock()
_UPLOADS: dict[tuple[str, str], threading.Lock] = {}


def _upload_lock(registry: str, digest: Digest) -> threading.Lock:
    with _UPLOADS_LOCK:
        return _UPLOADS.setdefault((registry, digest.value), threading.Lock())


class _BlobPusher:
    """Puts blobs of the local store into one repository: each is found there (HEAD), mounted from another
    repository of the registry known to hold it, or uploaded; counted in ``counts``. Thread-safe."""

    def __init__(
        self,
        store: Store,
        client: RegistryClient,
        registry: str,
        repository: str,
        mount_from: Iterable[str],
        report: _Reporter,
    ) -> None:
        self.store, self.client, self.registry, self.repo, self.report = store, client, registry, repository, report
        self.sources = _mount_sources(store, registry, repository, mount_from)
        self.counts = _PushCounts()
        self._lock = threading.Lock()

    def push(self, desc: Descriptor) -> None:
        with _upload_lock(self.registry, desc.digest):
            # Put there by this client already (another image of a matrix bound for the same repository): not
            # again. Mounting a blob the repository holds rewrites its link, and docker-registry's storage does
            # that in place: a manifest PUT that reads it meanwhile fails with MANIFEST_BLOB_UNKNOWN.
            if self.client.placed(self.repo, desc.digest):
                self._count_present(desc)
                return
            self._push_once(desc)
            self.client.note_placed(self.repo, desc.digest)

    def _exists(self, desc: Descriptor) -> bool:
        if self.client.blob_exists(self.repo, desc.digest, push=True) is None:
            return False
        self._count_present(desc)
        return True

    def _count_present(self, desc: Descriptor) -> None:
        with self._lock:
            self.counts.skipped += 1
        key = desc.digest.short
        self.report("exists", key, f"{key}: layer already exists", digest=desc.digest.value, total=desc.size)

    def _push_once(self, desc: Descriptor) -> None:
        key = desc.digest.short
        # A repository known to hold the blob: mounting it at once is one request where asking first whether the
        # destination has it is two (a registry mounts a blob the destination already holds just the same).
        known = self.sources.get(desc.digest, [])
        if not known and self._exists(desc):
            return
        location: str | None = None
        for source in [*known, *self.sources.get(_ANY, [])]:
            try:
                mounted = self.client.mount_blob(self.repo, desc.digest, source)
            except RegistryError as e:
                if e.temporary:
                    raise
                continue  # e.g. no pull access to the source repository: upload instead, as docker does
            if mounted.mounted:
                with self._lock:
                    self.counts.mounted += 1
                self.report("mounted", key, f"{key}: mounted from {source}", digest=desc.digest.value, total=desc.size)
                return
            location = mounted.location or location
        if known and self._exists(desc):
            return  # not mounted, but there already (the upload the registry opened for it expires unused)
        on_bytes = self.report.bytes_fn("uploading", "pushing", desc)
        on_bytes(0)
        self.client.upload_blob(
            self.repo, desc, lambda: self.store.open_blob(desc.digest), progress=on_bytes, location=location
        )
        with self._lock:
            self.counts.uploaded += 1
            self.counts.uploaded_bytes += desc.size
        self.report("uploaded", key, f"{key}: pushed", digest=desc.digest.value, current=desc.size, total=desc.size)


class PrePush:
    """The blobs of an image bound for ``dest_ref`` pushed ahead of its manifest, each as soon as it is known:
    ``build --push`` hands over each layer of the image once the build has it, while later steps still run.
    :func:`push_image` with ``prepush=`` waits for them, raises their first error, and does not ask for them
    again. Blobs go ``max_workers`` at a time, in the order they came."""

    def __init__(
        self,
        store: Store,
        dest_ref: Reference,
        *,
        client_factory: ClientFactory,
        mount_from: Iterable[str] = (),
        max_workers: int = DEFAULT_WORKERS,
    ) -> None:
        self.dest_ref = dest_ref
        client = client_factory(dest_ref.registry)
        self.pusher = _BlobPusher(store, client, dest_ref.registry, dest_ref.repository, mount_from, _Reporter(None))
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="imgci-prepush")
        self._futures: dict[Digest, Future[None]] = {}

    def add(self, desc: Descriptor) -> None:
        if desc.digest not in self._futures:
            ctx = contextvars.copy_context()
            self._futures[desc.digest] = self._pool.submit(ctx.run, self.pusher.push, desc)

    def wait(self) -> None:
        """Until every blob added is in the repository (``pusher.counts`` says how they got there); the first
        failure is raised."""
        self._pool.shutdown(wait=True)
        for future in self._futures.values():
            future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def push_image(
    store: Store,
    local_name: str,
    dest_ref: Reference,
    *,
    client_factory: ClientFactory,
    progress: ProgressFn | None = None,
    mount_from: Iterable[str] = (),
    max_workers: int = DEFAULT_WORKERS,
    prepush: PrePush | None = None,
) -> PushResult:
    """Push the local image ``local_name`` to ``dest_ref``; see the module contract. ``prepush``: blobs of it
    already on their way there (see :class:`PrePush`)."""
    report = _Reporter(progress)
    rec = store.get_ref(local_name)
    top_raw, top_type, children = _local_documents(store, rec.digest, rec.media_type)
    manifests = [Manifest.parse(raw, d.media_type) for d, raw in children] or [Manifest.parse(top_raw, top_type)]
    blobs = _unique(d for m in manifests for d in (m.config, *m.layers))
    for desc in blobs:
        if not store.has_blob(desc.digest):
            raise BlobNotFoundError(f"blob {desc.digest} of {local_name} is not in the local store")
    client = client_factory(dest_ref.registry)
    repo = dest_ref.repository
    if dest_ref.tag is not None and prepush is None:
        # The tag already names this very manifest (a re-push, a warm CI run): the registry accepted it only with
        # every blob present, so one HEAD replaces a HEAD per blob and the manifest PUT.
        there = client.head_manifest(dest_ref, push=True)
        if there is not None and there.digest == rec.digest:
            report(
                "done", str(dest_ref), f"{dest_ref.tag}: digest: {rec.digest} (already there)", digest=rec.digest.value
            )
            return PushResult(dest_ref, rec.digest, top_type, 0, 0, len(blobs), 0)
    if prepush is not None:
        if prepush.dest_ref.registry != dest_ref.registry or prepush.dest_ref.repository != repo:
            raise ValueError(f"blobs were pushed ahead to {prepush.dest_ref}, not to {dest_ref}")
        pusher = prepush.pusher  # its counts include the blobs it pushed
        pusher.report = report
        for desc in blobs:  # the rest (the config, the last layers) go along with those still on their way
            prepush.add(desc)
        prepush.wait()
    else:
        pusher = _BlobPusher(store, client, dest_ref.registry, repo, mount_from, report)
        _parallel(blobs, pusher.push, max_workers)
    counts = pusher.counts
    for child, raw in children:
        client.put_manifest(repo, child.digest.value, raw, child.media_type)
        report("manifest", child.digest.short, f"{child.digest.short}: pushed manifest", digest=child.digest.value)
    target = (
        dest_ref.digest.value if dest_ref.digest is not None and dest_ref.tag is None else (dest_ref.tag or "latest")
    )
    digest = client.put_manifest(repo, target, top_raw, top_type)
    if dest_ref.digest is not None and dest_ref.digest != digest:
        raise DigestMismatchError(
            f"pushed {local_name} as {digest}, but the destination names {dest_ref.digest}",
            expected=dest_ref.digest.value,
            actual=digest.value,
        )
    report("done", str(dest_ref), f"{target}: digest: {digest} size: {len(top_raw)}", digest=digest.value)
    return PushResult(
        reference=dest_ref,
        digest=digest,
        media_type=top_type,
        uploaded_bytes=counts.uploaded_bytes,
        uploaded_blobs=counts.uploaded,
        skipped_blobs=counts.skipped,
        mounted_blobs=counts.mounted,
    )
