"""ADD of local archives: recognise a tar (any compression, judged by content) and plan its extraction.

Contract:
- :func:`is_archive` is BuildKit's ``isArchivePath``: a regular file whose content, after decompression of any
  supported kind (gzip, zstd, bzip2, xz, none), starts with a valid tar header. The name never matters.
- :func:`extract` reads the archive once with the strict :class:`TarReader` and places its entries under
  ``dest_dir`` through an :class:`ExtractTarget` (the copy planner), as BuildKit's ``applyRootArchive`` does: names
  are cleaned (leading ``/`` dropped, ``a/../b`` is ``b``) and one that climbs out of ``dest_dir`` is an error;
  parent components follow symlinks inside the destination tree (a directory entry's own name too); an existing
  non-directory, or a directory replaced by a non-directory, is replaced; missing parents are created 0755 root
  ownership; modes, mtimes and the archive's uid/gid are kept unless ``owner`` (``--chown``) overrides the ids.
  Hardlink targets are taken relative to ``dest_dir`` and must exist. Regular file content is written to new
  files in ``scratch`` named by sequence number, so no name from the archive ever reaches the host file system.
  Corrupt or truncated archives raise :class:`CorruptArchiveError`.
"""

from __future__ import annotations

import posixpath
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from imgci.build import treepath
from imgci.build.fs import EntryType, FileInfo, LayerEntry, SourceFS
from imgci.compression import open_decompressed
from imgci.errors import ArchiveError, BuildError, CorruptArchiveError
from imgci.tarstream import BLK, CHR, DIR, FIFO, LNK, SYM, TarReader

_CHUNK = 1 << 20
_TYPES: dict[bytes, EntryType] = {DIR: "dir", SYM: "symlink", LNK: "hardlink", CHR: "char", BLK: "block", FIFO: "fifo"}
_MAX_TIME = 2**33  # BuildKit bounds times it cannot represent to the epoch
_MAX_DEV = 8**7  # device numbers a ustar header holds (PAX has no record for them)


class ExtractTarget(Protocol):
    """What :func:`extract` needs from the planner: the destination tree as planned so far, and changes to it."""

    def lookup(self, path: str) -> FileInfo | None: ...

    def resolve_parents(self, path: str, *, follow_last: bool) -> str: ...

    def ensure_dir(self, path: str, *, owner: tuple[int, int], mode: int) -> None: ...

    def put(self, entry: LayerEntry) -> None: ...


def is_archive(fs: SourceFS, path: str) -> bool:
    """Whether the regular file ``path`` of ``fs`` is a (possibly compressed) tar archive."""
    info = fs.lstat(path)
    if info is None or info.type != "file":
        return False
    try:
        with fs.open(path) as raw, open_decompressed(raw) as stream:
            return next(iter(TarReader(stream)), None) is not None
    except (ArchiveError, OSError, EOFError):
        return False


def _clean_name(name: str, archive: str) -> str:
    if "\x00" in name:
        raise BuildError(f"archive {archive!r}: entry name contains a NUL byte")
    cleaned = posixpath.normpath(name.lstrip("/")) if name.lstrip("/") else "."
    if cleaned == ".":
        return ""
    if cleaned == ".." or cleaned.startswith("../"):
        raise BuildError(f"archive {archive!r}: path {name!r} is outside extraction root")
    return cleaned


def extract(
    fs: SourceFS,
    path: str,
    dest_dir: str,
    target: ExtractTarget,
    *,
    scratch: Path,
    owner: tuple[int, int] | None,
) -> None:
    """Plan the extraction of archive ``path`` of ``fs`` into directory ``dest_dir``; see the module contract."""
    shown = path or "/"
    counter = 0
    try:
        with fs.open(path) as raw, open_decompressed(raw) as stream:
            reader = TarReader(stream)
            for member in reader:
                name = _clean_name(member.name, shown)
                if not name:
                    continue
                if not member.is_file and member.type not in _TYPES:
                    raise BuildError(f"archive {shown!r}: unsupported entry {member.name!r} of type {member.type!r}")
                kind: EntryType = "file" if member.is_file else _TYPES[member.type]
                uid, gid = owner if owner is not None else (member.uid, member.gid)
                # Base-256 header fields hold values no layer header can: device numbers >= 8**7 made the layer
                # writer raise ValueError (a traceback; Go's writer fails on them too), and a negative id became a
                # PAX record imgci's own reader refuses when the layer is applied. Refuse them here, naming the entry.
                if (
                    min(uid, gid, member.devmajor, member.devminor) < 0
                    or max(member.devmajor, member.devminor) >= _MAX_DEV
                ):
                    raise BuildError(f"archive {shown!r}: entry {member.name!r} has ids or device numbers out of range")
                where = target.resolve_parents(treepath.join(dest_dir, name), follow_last=kind == "dir")
                target.ensure_dir(treepath.parent_and_name(where)[0], owner=(0, 0), mode=0o755)
                info = FileInfo(
                    path=where,
                    type=kind,
                    mode=member.mode & 0o7777,
                    uid=uid,
                    gid=gid,
                    mtime=member.mtime if 0 <= member.mtime < _MAX_TIME else 0.0,
                    linkname=member.linkname if kind == "symlink" else "",
                    devmajor=member.devmajor,
                    devminor=member.devminor,
                )
                if kind == "hardlink":
                    link = _clean_name(member.linkname, shown)
                    linked = target.resolve_parents(treepath.join(dest_dir, link), follow_last=False) if link else ""
                    found = target.lookup(linked) if linked else None
                    if found is None or found.type == "dir":
                        raise BuildError(f"archive {shown!r}: hardlink {member.name!r} to missing {member.linkname!r}")
                    target.put(LayerEntry(replace(info, linkname=linked, mode=found.mode)))
                elif kind == "file":
                    counter += 1
                    host = scratch / f"unpacked-{counter:08d}"
                    while host.exists():
                        counter += 1
                        host = scratch / f"unpacked-{counter:08d}"
                    size = 0
                    with open(host, "xb") as out:
                        while chunk := reader.read(_CHUNK):
                            size += len(chunk)
                            out.write(chunk)
                    target.put(LayerEntry(replace(info, size=size), host_path=host))
                else:
                    target.put(LayerEntry(info))
    except CorruptArchiveError as e:
        raise CorruptArchiveError(f"archive {shown!r}: {e}") from None
