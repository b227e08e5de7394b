"""LayerWriter: a list of LayerEntry -> one deterministic, compressed layer blob in the content store.

Contract of :func:`write_layer`:
- Identical entries (metadata and content), compression and ``source_date_epoch`` give a byte-identical blob,
  whatever order the entries come in. The blob is written straight into ``store.blob_writer()`` in one streaming
  pass that also yields its digest and diff_id (no temporary copy of the layer).
- Order: entries sorted by path component by component (parents before children, ``a`` < ``a/b`` < ``a-b``);
  within a directory its opaque marker comes first, then whiteouts, then the other children (so a whiteout always
  precedes an entry of the same name, as the OCI layer spec asks). A hardlink group's content goes to the member
  that sorts first; the others become hardlinks to it.
- Entries as BuildKit writes them (containerd ``archive.ChangeWriter``, v2): numeric uid/gid with empty
  uname/gname, permission bits without file-type bits, mtime truncated to whole seconds, no atime/ctime,
  directories named with a trailing ``/``. With ``source_date_epoch`` only mtimes *newer* than it are clamped to
  it (``WithModTimeUpperBound``); older ones are kept.
- Whiteouts (``LayerEntry.whiteout``) are written as containerd v2 writes them: ``DIR/.wh.NAME``, an empty
  regular file, mode 0, uid/gid 0, mtime 0 (1970). An opaque directory (``LayerEntry.opaque``, which must be a
  directory entry) is its directory entry followed by ``DIR/.wh..wh..opq`` as docker's overlay2 exporter writes it
  (BuildKit never writes one): an empty regular file with the directory's permission bits and uid/gid, mtime 0.
- The root directory itself is never written (as BuildKit); a path with ``..``, a duplicate path, a whiteout of
  the root, or an opaque non-directory raise ValueError (caller bugs). A file whose name starts with ``.wh.``, a
  hardlink to a directory, and a source file that cannot be read or changed size raise :class:`BuildError`.
- Missing parent directories are not synthesised (the tar's readers create them 0755); include them to control
  their metadata.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from imgci.build.fs import FileInfo, LayerEntry
from imgci.build.tarwriter import BLK, CHR, DIR, FIFO, LNK, REG, SYM, AsyncSink, BufferSink, TarRecord, TarWriter
from imgci.errors import BuildError
from imgci.oci import Descriptor, Digest

if TYPE_CHECKING:  # the sandbox child writes tars with this module and needs neither the store nor compression
    from imgci.store import Store

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_TYPEFLAGS = {"file": REG, "dir": DIR, "symlink": SYM, "hardlink": LNK, "char": CHR, "block": BLK, "fifo": FIFO}
_RANK_OPAQUE, _RANK_WHITEOUT, _RANK_ENTRY = 0, 1, 2
_O_READ = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True)
class LayerResult:
    """What :func:`write_layer` produced: the blob's descriptor (media type, digest, size) and the diff_id."""

    descriptor: Descriptor
    diff_id: Digest
    uncompressed_size: int
    entry_count: int  # tar entries, counting whiteout/opaque markers, not PAX extension headers
    source_date_epoch: int | None = None


@dataclass(slots=True)
class PlannedEntry:
    """One tar entry to write: its record, plus where a regular file's data comes from (None: no data)."""

    record: TarRecord
    source: LayerEntry | None = None


def clean_path(path: str) -> str:
    """``path`` relative, without ``.``/empty components; ValueError on ``..`` or NUL."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts or "\x00" in path:
        raise ValueError(f"layer entry path {path!r} is not a clean relative path")
    return "/".join(parts)


def _sort_key(path: str, rank: int) -> tuple[tuple[int, str], ...]:
    parts = path.split("/")
    return (*((_RANK_ENTRY, p) for p in parts[:-1]), (rank, parts[-1]))


def _mtime(value: float, epoch: int | None) -> int:
    if epoch is not None and value > epoch:
        value = epoch
    return math.floor(value)


def _record(name: str, info: FileInfo, epoch: int | None) -> TarRecord:
    type_ = _TYPEFLAGS[info.type]
    return TarRecord(
        name=name + "/" if type_ == DIR else name,
        type=type_,
        mode=info.mode & 0o7777,
        uid=info.uid,
        gid=info.gid,
        size=info.size if type_ == REG else 0,
        mtime=_mtime(info.mtime, epoch),
        linkname=clean_path(info.linkname) if type_ == LNK else info.linkname,
        devmajor=info.devmajor if type_ in (CHR, BLK) else 0,
        devminor=info.devminor if type_ in (CHR, BLK) else 0,
        xattrs=tuple(sorted(info.xattrs)),
    )


def plan_entries(entries: Iterable[LayerEntry], source_date_epoch: int | None = None) -> list[PlannedEntry]:
    """The tar entries for ``entries``, in archive order; see the module contract."""
    keyed: dict[tuple[tuple[int, str], ...], PlannedEntry] = {}
    for entry in entries:
        path = clean_path(entry.info.path)
        if not path:
            if entry.whiteout or entry.info.type != "dir":
                raise ValueError("a layer entry for the root directory must be a plain directory")
            continue  # the root's own metadata is not part of a layer (BuildKit never writes it)
        base = path.rpartition("/")[2]
        if base.startswith(WHITEOUT_PREFIX):
            raise BuildError(f"cannot put {path!r} in a layer: names starting with {WHITEOUT_PREFIX!r} mark deletions")
        if entry.whiteout:
            head = path.rpartition("/")[0]
            name = f"{head}/{WHITEOUT_PREFIX}{base}" if head else WHITEOUT_PREFIX + base
            _insert(keyed, _sort_key(path, _RANK_WHITEOUT), PlannedEntry(TarRecord(name, REG)), path)
            continue
        link = entry.info.linkname
        if (entry.info.type == "symlink" and not link) or (entry.info.type == "hardlink" and not clean_path(link)):
            raise ValueError(f"{entry.info.type} layer entry {path!r} has no target")
        rec = _record(path, entry.info, source_date_epoch)
        _insert(keyed, _sort_key(path, _RANK_ENTRY), PlannedEntry(rec, entry if rec.type == REG else None), path)
        if entry.opaque:
            if rec.type != DIR:
                raise ValueError(f"opaque layer entry {path!r} is not a directory")
            marker = TarRecord(f"{path}/{OPAQUE_MARKER}", REG, mode=rec.mode & 0o777, uid=rec.uid, gid=rec.gid)
            _insert(keyed, _sort_key(f"{path}/{OPAQUE_MARKER}", _RANK_OPAQUE), PlannedEntry(marker), path)
    ordered = [keyed[k] for k in sorted(keyed)]
    _order_hardlinks(ordered)
    return ordered


def _insert(keyed: dict[Any, PlannedEntry], key: Any, planned: PlannedEntry, path: str) -> None:
    if key in keyed:
        raise ValueError(f"duplicate layer entry {path!r}")
    keyed[key] = planned


def _order_hardlinks(ordered: list[PlannedEntry]) -> None:
    """Give each hardlink group's content to the member that comes first; the others link to it."""
    index = {p.record.name: i for i, p in enumerate(ordered) if p.record.type != DIR}
    dirs = {p.record.name[:-1] for p in ordered if p.record.type == DIR}
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(ordered):
        if p.record.type != LNK:
            continue
        target, seen = p.record.linkname, {p.record.name}
        while (j := index.get(target)) is not None and ordered[j].record.type == LNK and target not in seen:
            seen.add(target)
            target = ordered[j].record.linkname
        if target in seen:
            raise BuildError(f"hardlink {p.record.name!r} is part of a hardlink loop")
        j = index.get(target)
        if j is None:
            if target in dirs:
                raise BuildError(f"hardlink {p.record.name!r} points to directory {target!r}")
            continue  # a target outside this layer: written as given
        groups.setdefault(j, []).append(i)
    for root, links in groups.items():
        origin = ordered[root]
        primary = min(root, *links)
        if primary != root:
            # The first member carries the content (and the inode's metadata); everything else links to it.
            moved = ordered[primary]
            ordered[primary] = PlannedEntry(replace(origin.record, name=moved.record.name), origin.source)
        name = ordered[primary].record.name
        for i in [root, *links]:
            if i != primary:
                base = ordered[primary].record
                ordered[i] = PlannedEntry(
                    replace(base, name=ordered[i].record.name, type=LNK, size=0, linkname=name, devmajor=0, devminor=0)
                )


def write_tar(planned: list[PlannedEntry], sink: BufferSink, *, threaded: bool = False) -> TarWriter:
    """Write the planned entries as one tar stream into ``sink``; returns the (closed) writer for its counts."""
    writer = TarWriter(sink, threaded=threaded)
    try:
        for p in planned:
            if p.source is None or p.record.size == 0:
                writer.add(p.record)
            else:
                _add_content(writer, p.record, p.source)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer


def _add_content(writer: TarWriter, rec: TarRecord, entry: LayerEntry) -> None:
    if entry.data is not None:
        writer.add_bytes(rec, entry.data)
        return
    host = entry.host_path
    if host is None and entry.source_fs is not None:
        # Optional SourceFS extension: ``host_path(path)`` names the file on disk, read without the file object.
        host_path = getattr(entry.source_fs, "host_path", None)
        if callable(host_path):
            host = host_path(entry.source_path or entry.info.path)
    try:
        if host is not None:
            fd = os.open(host, _O_READ)
            try:
                writer.add_fd(rec, fd)
            finally:
                os.close(fd)
        else:
            with entry.open() as f:
                writer.add_file(rec, f)
    except OSError as e:
        raise BuildError(f"cannot read {entry.source_path or entry.info.path!r} for the layer: {e.strerror or e}")


class Tee:
    """Writes everything to ``first`` and ``second`` (uncompressed tar bytes for an unpacker, say)."""

    def __init__(self, first: BufferSink, second: BufferSink) -> None:
        self._first, self._second = first, second

    def write(self, data: memoryview, /) -> int:
        self._second.write(data)
        self._first.write(data)
        return len(data)


class HashSink:
    """Only hashes what is written (sha256): the diff_id of a tar stream nobody stores."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def write(self, data: memoryview, /) -> int:
        self.hash.update(data)
        return len(data)

    @property
    def digest(self) -> Digest:
        return Digest("sha256:" + self.hash.hexdigest())


def write_layer(
    store: Store,
    entries: Iterable[LayerEntry],
    *,
    compression: str = "gzip",
    source_date_epoch: int | None = None,
    level: int | None = None,
    tee: BufferSink | None = None,
    threaded: bool = True,
) -> LayerResult:
    """Write ``entries`` as one layer blob into ``store``; see the module contract.

    ``tee`` also receives the uncompressed tar stream (e.g. to unpack the layer in the same pass); it must not
    keep the buffers it is given. ``threaded`` runs compression and the blob write in a worker thread.
    """
    planned = plan_entries(entries, source_date_epoch)
    counted: list[int] = []

    def feed(sink: BufferSink) -> None:
        counted.append(write_tar(planned, sink, threaded=threaded).entries)

    descriptor, diff_id, raw_size = _store_tar(store, feed, compression, level, tee, threaded)
    return LayerResult(descriptor, diff_id, raw_size, counted[0], source_date_epoch)


def write_layer_tar(
    store: Store,
    stream: Any,
    *,
    entry_count: int = 0,
    compression: str = "gzip",
    level: int | None = None,
    tee: BufferSink | None = None,
) -> LayerResult:
    """Store an uncompressed layer tar read from ``stream`` (``read(n)``) as a compressed blob, in one pass.

    The tar must already be in final form (see :func:`write_tar`); ``tee`` also receives it. Returns the layer's
    descriptor and diff_id (``entry_count`` is reported as given).
    """

    def feed(sink: BufferSink) -> None:
        while chunk := stream.read(1 << 20):
            sink.write(memoryview(chunk))

    descriptor, diff_id, raw_size = _store_tar(store, feed, compression, level, tee, True)
    return LayerResult(descriptor, diff_id, raw_size, entry_count)


def _store_tar(
    store: Store,
    feed: Callable[[BufferSink], None],
    compression: str,
    level: int | None,
    tee: BufferSink | None,
    threaded: bool,
) -> tuple[Descriptor, Digest, int]:
    """The blob of the tar ``feed`` writes into the sink it is given: (descriptor, diff_id, uncompressed size)."""
    from imgci.compression import CompressingWriter, layer_media_type

    media_type = layer_media_type(compression)
    with store.blob_writer() as blob:
        if compression == "none":
            # No compressor: the blob writer's own hash is both digest and diff_id (one sha256 pass, not three).
            feed(blob if tee is None else Tee(blob, tee))
            digest = blob.commit()
            diff_id, size, raw_size = digest, blob.size, blob.size
        else:
            # Two stages when threaded: compression (+ both hashes) in one worker, the blob write in another.
            out = AsyncSink(blob) if threaded else None
            compressing = CompressingWriter(blob if out is None else out, compression, level)
            try:
                feed(compressing if tee is None else Tee(compressing, tee))
                digests = compressing.finish()
            finally:
                if out is not None:
                    out.close(abort=sys.exc_info()[0] is not None)
            digest = blob.commit()
            if digest != digests.digest:  # cannot happen unless the blob writer saw other bytes
                raise BuildError(f"layer blob hashes to {digest} but {digests.digest} was compressed")
            diff_id, size, raw_size = digests.diff_id, digests.size, digests.uncompressed_size
    return Descriptor(media_type, digest, size), diff_id, raw_size
