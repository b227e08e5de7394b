"""What a RUN step changed, as layer entries in OCI form (run in the sandbox child, as root in its namespaces).

Contract:
- :func:`scan` / :func:`diff_native` compare a rootfs before and after a RUN by ``lstat`` (type, mode, owner, size,
  mtime, inode, link count, link target); an entry whose ctime moved but whose metadata did not (``chown`` or
  ``chmod`` to the same values) is unchanged when its content's CRC-32 is the one recorded while the rootfs was
  materialised, as BuildKit's differ sees it.
- :func:`diff_upper` reads an overlay upper directory against its lowers: whiteouts, and a directory hiding its lower
  contents (opaque) as the directory plus a whiteout per lower entry; entries only copied up (same metadata and
  content as below, one link) are left out.
- Both return every parent directory of a change (as containerd's change writer includes them) and keep hardlinks
  among the changed files as hardlinks, so both snapshotters give the same layer.
"""

from __future__ import annotations

import os
import stat
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from imgci.build.fs import EntryType, FileInfo, LayerEntry
from imgci.build.sandbox.snapshots import is_whiteout, lstat_or_none, opaque_xattr

_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


@dataclass(frozen=True, slots=True)
class Meta:
    mode: int  # full st_mode
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    rdev: int
    nlink: int
    link: str = ""  # a symlink's target


def _meta(st: os.stat_result, path: str | Path | None = None) -> Meta:
    link = os.readlink(path) if path is not None and stat.S_ISLNK(st.st_mode) else ""
    return Meta(
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
        st.st_rdev,
        st.st_nlink,
        link,
    )


def _walk(root: Path) -> Iterable[tuple[str, os.stat_result]]:
    """Every entry below ``root`` as (relative path, lstat); never follows symlinks or leaves the file system."""
    stack = [""]
    root_dev = os.lstat(root).st_dev
    while stack:
        rel = stack.pop()
        try:
            it = os.scandir(f"{root}/{rel}" if rel else root)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                path = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                yield path, st
                if stat.S_ISDIR(st.st_mode) and st.st_dev == root_dev:
                    stack.append(path)


def scan(root: Path) -> dict[str, Meta]:
    return {path: _meta(st, f"{root}/{path}") for path, st in _walk(root)}


def _same(a: Meta, b: Meta, full: str, crc: int | None) -> bool:
    """Whether entry ``full`` (now ``b``) is unchanged since ``a``; ``crc``: its content's CRC-32 back then."""
    if (a.mode, a.uid, a.gid, a.mtime_ns) != (b.mode, b.uid, b.gid, b.mtime_ns):
        return False
    if stat.S_ISDIR(a.mode):
        return True  # a directory's children are compared on their own; its ctime moves with them
    if (a.size, a.ino, a.rdev, a.nlink, a.link) != (b.size, b.ino, b.rdev, b.nlink, b.link):
        return False
    if a.ctime_ns == b.ctime_ns:
        return True
    # The inode changed but its metadata is as before: chown/chmod to the same values (unchanged, as BuildKit's
    # differ sees it), or content rewritten with the old size and mtime restored. The content tells them apart.
    if stat.S_ISREG(a.mode) and crc is not None:
        return _crc_of(full) == crc
    return not stat.S_ISREG(a.mode)


def _crc_of(path: str | Path) -> int | None:
    crc = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
    except OSError:
        return None
    return crc


def _type(st: os.stat_result | Meta) -> EntryType:
    mode = st.st_mode if isinstance(st, os.stat_result) else st.mode
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode):
        return "char"
    if stat.S_ISBLK(mode):
        return "block"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "file"


def _xattrs(path: str | Path) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in names:
        if name.startswith(_OVERLAY_XATTR_PREFIXES):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(sorted(out))


def _entry(root: Path, path: str, st: os.stat_result, *, opaque: bool = False) -> LayerEntry:
    full = f"{root}/{path}"  # strings, not Paths: a Path join costs more than the lstat (~2,000 of them a RUN)
    kind = _type(st)
    info = FileInfo(
        path=path,
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind == "file" else 0,
        mtime=st.st_mtime_ns / 1e9,
        linkname=os.readlink(full) if kind == "symlink" else "",
        devmajor=os.major(st.st_rdev) if kind in ("char", "block") else 0,
        devminor=os.minor(st.st_rdev) if kind in ("char", "block") else 0,
        xattrs=_xattrs(full),
    )
    return LayerEntry(info, host_path=full if kind == "file" else None, opaque=opaque)


def _finish(root: Path, changed: dict[str, LayerEntry], stats: dict[str, os.stat_result]) -> list[LayerEntry]:
    """Add the parent directories of every change and turn shared inodes into hardlinks."""
    for path in list(changed):
        parent = path.rpartition("/")[0]
        while parent and parent not in changed:
            st = stats.get(parent) or os.lstat(root / parent)
            changed[parent] = _entry(root, parent, st)
            parent = parent.rpartition("/")[0]
    first: dict[tuple[int, int], str] = {}
    for path in sorted(changed, key=lambda p: p.split("/")):
        entry = changed[path]
        if entry.info.type != "file" or entry.whiteout:
            continue
        link_st = stats.get(path)
        if link_st is None or link_st.st_nlink < 2:
            continue
        key = (link_st.st_dev, link_st.st_ino)
        if key in first:
            info = entry.info
            changed[path] = LayerEntry(
                FileInfo(path, "hardlink", info.mode, info.uid, info.gid, 0, info.mtime, first[key])
            )
        else:
            first[key] = path
    return list(changed.values())


def _whiteout(path: str) -> LayerEntry:
    return LayerEntry(FileInfo(path, "file", 0), whiteout=True)


def diff_native(root: Path, before: dict[str, Meta], crcs: dict[str, int] | None = None) -> list[LayerEntry]:
    """The changes of ``root`` since ``before`` (a :func:`scan` of it; ``crcs`` from :func:`materialise`)."""
    crcs = crcs or {}
    changed: dict[str, LayerEntry] = {}
    stats: dict[str, os.stat_result] = {}
    seen: set[str] = set()
    for path, st in _walk(root):
        stats[path] = st
        seen.add(path)
        old = before.get(path)
        full = f"{root}/{path}"
        if old is None or not _same(old, _meta(st, full), full, crcs.get(path)):
            changed[path] = _entry(root, path, st)
    for path in before:
        if path in seen:
            continue
        parent = path.rpartition("/")[0]
        if parent and (parent not in seen or not stat.S_ISDIR(stats[parent].st_mode)):
            continue  # the parent went too (its own whiteout or replacement covers this)
        changed[path] = _whiteout(path)
    return _finish(root, changed, stats)


def diff_upper(upper: Path, lowers: list[Path], flavor: str) -> list[LayerEntry]:
    """The layer an overlay upper directory holds; ``lowers`` top first.

    As the native differ (and BuildKit's) writes it: an entry that was only copied up (same metadata and content as
    below) is left out, and a directory that hides its lower contents (overlay's opaque directory) is written as the
    directory plus a whiteout for each lower entry it no longer has — no opaque marker.
    """
    changed: dict[str, LayerEntry] = {}
    stats: dict[str, os.stat_result] = {}
    key = opaque_xattr(flavor)
    hiding: set[str] = set()  # directories whose lower contents are hidden (opaque, or re-created inside one)
    view = LowerView(lowers)
    for path, st in _walk(upper):
        stats[path] = st
        parent = path.rpartition("/")[0]
        if is_whiteout(st):
            changed[path] = _whiteout(path)
            continue
        found = view.lstat(path)
        lower, source = found if found is not None else (None, None)
        full = f"{upper}/{path}"
        if stat.S_ISDIR(st.st_mode) and (
            _xattr_is(full, key) or (parent in hiding and lower is not None and stat.S_ISDIR(lower.st_mode))
        ):
            hiding.add(path)
            changed[path] = _entry(upper, path, st)
            present = set(os.listdir(full))
            for name in view.children(path):
                if name not in present:
                    child = f"{path}/{name}"
                    changed[child] = _whiteout(child)
            continue
        if parent not in hiding and lower is not None and _same_meta(full, st, lower, source):
            continue  # only copied up: on the way to a change below it, opened for writing, a removed mount stub
        changed[path] = _entry(upper, path, st)
    return _finish(upper, changed, stats)


def _xattr_is(path: str, key: str) -> bool:
    try:
        return os.getxattr(path, key, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _same_meta(full: str, st: os.stat_result, lower: os.stat_result, source: str | None) -> bool:
    """Whether an upper entry equals the lower one: type, mode, owner, mtime, size, xattrs, link target, content."""
    if (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) != (
        lower.st_mode,
        lower.st_uid,
        lower.st_gid,
        lower.st_mtime_ns,
    ):
        return False
    if not stat.S_ISDIR(st.st_mode) and (st.st_size, st.st_rdev, st.st_nlink) != (lower.st_size, lower.st_rdev, 1):
        return False  # (a copied-up file has one link; more means the RUN linked it)
    if source is None or _xattrs(full) != _xattrs(source):
        return False
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(full) == os.readlink(source)
    if stat.S_ISREG(st.st_mode):
        return _same_content(full, source)
    return True


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


class LowerView:
    """The merged lower directories of an overlay, looked up one directory at a time (cached). Host paths are
    strings here (a Path join per lookup cost more than the lookup)."""

    def __init__(self, lowers: list[Path]) -> None:
        self._dirs: dict[str, list[str]] = {"": [str(d) for d in lowers]}

    def dirs(self, path: str) -> list[str]:
        """The lower directories that make up merged directory ``path``, top first (empty: not a lower dir)."""
        cached = self._dirs.get(path)
        if cached is not None:
            return cached
        parent, _, name = path.rpartition("/")
        out: list[str] = []
        for d in self.dirs(parent):
            below = f"{d}/{name}"
            st = lstat_or_none(below)
            if st is None:
                if _is_opaque(d):
                    break
                continue
            if not stat.S_ISDIR(st.st_mode):  # a whiteout or a file hides everything below
                break
            out.append(below)
            if _is_opaque(below):
                break
        self._dirs[path] = out
        return out

    def lstat(self, path: str) -> tuple[os.stat_result, str] | None:
        """What the merged lowers have at ``path`` and where, or None."""
        parent, _, name = path.rpartition("/")
        for d in self.dirs(parent):
            below = f"{d}/{name}"
            st = lstat_or_none(below)
            if st is not None:
                return None if is_whiteout(st) else (st, below)
            if _is_opaque(d):
                return None
        return None

    def children(self, path: str) -> set[str]:
        names: set[str] = set()
        hidden: set[str] = set()
        for d in self.dirs(path):
            with os.scandir(d) as it:
                for entry in it:
                    if entry.name in names or entry.name in hidden:
                        continue
                    if is_whiteout(entry.stat(follow_symlinks=False)):
                        hidden.add(entry.name)
                    else:
                        names.add(entry.name)
        return names


def _is_opaque(path: str | Path) -> bool:
    for key in ("user.overlay.opaque", "trusted.overlay.opaque"):
        try:
            if os.getxattr(path, key, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False
