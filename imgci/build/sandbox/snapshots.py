"""Snapshots for RUN, on the child's side of the sandbox (inside its namespaces, as root there).

Contract:
- :func:`ensure_snapshot` gives the overlay lower directory of one layer: ``SNAPSHOTS/<hex of diff_id>``, the layer
  alone extracted from its blob with real ownership and overlayfs' own whiteouts (``.wh.NAME`` → a 0:0 character
  device, ``.wh..wh..opq`` → the ``<prefix>.overlay.opaque=y`` xattr). It appears by ``rename`` only once complete
  and digest-verified (blob digest and diff_id), so concurrent builds share it and a killed one leaves only a
  ``.tmp-*`` directory. A hardlink to a file of a lower layer becomes a copy (overlay lowers cannot share inodes).
- :func:`materialise` applies every layer of a chain onto one directory (the ``native`` snapshotter's rootfs), with
  the hardened applier of :mod:`imgci.layerfs`.
- :func:`scan` / :func:`diff_native` compare a rootfs before and after a RUN by ``lstat`` (type, mode, owner,
  size, mtime, inode, and ctime for non-directories, which catches content rewritten with the same size and
  mtime); :func:`diff_upper` reads an overlay upper directory (its whiteouts and opaque markers) against its lowers.
  Both return the layer's entries in OCI form, with every parent directory of a changed entry (as containerd's
  change writer includes them) and hardlinks among the changed files kept as hardlinks.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgci.build.fs import EntryType, FileInfo, LayerEntry
from imgci.build.sandbox.spec import LayerRef
from imgci.compression import HashingReader, open_decompressed
from imgci.errors import CorruptArchiveError, DigestMismatchError
from imgci.layerfs import OPAQUE_WHITEOUT, WHITEOUT_PREFIX, ApplyStats, _Applier
from imgci.oci import Digest
from imgci.rootdir import relpath
from imgci.tarstream import TarEntry, safe_parts

_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


def opaque_xattr(flavor: str) -> str:
    return f"{'user' if flavor == 'user' else 'trusted'}.overlay.opaque"


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# -- layers into directories ----------------------------------------------------------------------------------
class OverlayLayerApplier(_Applier):
    """Extracts one layer alone as an overlayfs lower directory (see the module contract)."""

    def __init__(self, target: Path, flavor: str, lowers: list[Path], unprivileged: bool) -> None:
        super().__init__(target, unprivileged)
        self.flavor = flavor
        self.lowers = lowers  # the layers below, top first, for hardlinks to their files
        self.whited: set[str] = set()

    def _whiteout(self, e: TarEntry, parts: list[str]) -> None:
        base = parts[-1]
        victim = "" if base == OPAQUE_WHITEOUT else base[len(WHITEOUT_PREFIX) :]
        if base != OPAQUE_WHITEOUT and victim in ("", ".", ".."):
            from imgci.errors import UnsafeArchiveError

            raise UnsafeArchiveError(f"{e.name!r}: whiteout of {victim or 'the root'!r} is not allowed")
        opened = self.root.walk(parts[:-1], create=True, follow=True, entry=e.name)
        assert opened is not None
        fd, names = opened
        try:
            if not victim:
                os.setxattr(fd, opaque_xattr(self.flavor), b"y")
            else:
                self.root.clear(fd, victim, keep_dir=False)
                os.mknod(victim, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=fd)
                self.whited.add(relpath([*names, victim]))
        finally:
            os.close(fd)
        self.stats.whiteouts += 1

    def _dir(self, e: TarEntry, pfd: int, base: str, key: str) -> None:
        super()._dir(e, pfd, base, key)
        if key in self.whited:  # deleted, then re-created by the same layer: nothing below may show through
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pfd)
            try:
                os.setxattr(fd, opaque_xattr(self.flavor), b"y")
            finally:
                os.close(fd)

    def _hardlink(self, e: TarEntry, pfd: int, base: str) -> None:
        try:
            super()._hardlink(e, pfd, base)
        except CorruptArchiveError:
            source = _find_in_lowers(self.lowers, "/".join(safe_parts(e.linkname)))
            if source is None:
                raise
            self.root.clear(pfd, base, keep_dir=False)
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                with open(source, "rb") as src:
                    _copy_fd(src.fileno(), fd)
                st = os.lstat(source)
                os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(fd)
            self.stats.files += 1


def _find_in_lowers(lowers: list[Path], path: str) -> Path | None:
    """A regular file at ``path`` in the first lower that has it, walking without following symlinks."""
    for lower in lowers:
        parts = path.split("/")
        cur = lower
        ok = True
        for comp in parts[:-1]:
            st = _lstat(cur / comp)
            if st is None or not stat.S_ISDIR(st.st_mode):
                ok = False
                break
            cur = cur / comp
        if not ok:
            continue
        st = _lstat(cur / parts[-1])
        if st is not None and stat.S_ISREG(st.st_mode):
            return cur / parts[-1]
    return None


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _copy_fd(src: int, dst: int) -> None:
    while True:
        try:
            n = os.copy_file_range(src, dst, 1 << 30)
        except OSError:
            n = -1
        if n == 0:
            return
        if n < 0:
            break
    while chunk := os.read(src, 1 << 20):
        os.write(dst, chunk)


def _apply_blob(applier: _Applier, layer: LayerRef) -> None:
    digest, diff_id = Digest(layer.digest), Digest(layer.diff_id)
    with open(layer.blob, "rb") as raw:
        packed = HashingReader(raw, digest.algorithm)
        unpacked = HashingReader(open_decompressed(packed), diff_id.algorithm)
        applier.apply(unpacked)
        unpacked.drain()
        packed.drain()
    if packed.digest != digest:
        raise DigestMismatchError(f"layer blob {digest} hashes to {packed.digest}", expected=digest.value)
    if unpacked.digest != diff_id:
        raise DigestMismatchError(f"layer {digest.short} unpacks to {unpacked.digest}, not {diff_id}")


def ensure_snapshot(
    snapshots: Path, layer: LayerRef, lowers: list[Path], *, flavor: str, unprivileged: bool = False
) -> tuple[Path, ApplyStats | None]:
    """The overlay lower directory of ``layer`` (made from its blob if missing); ``lowers`` are the layers below
    it, top first. Returns the stats of the extraction, or None if the snapshot already existed."""
    final = snapshots / Digest(layer.diff_id).hex
    if final.is_dir():
        return final, None
    snapshots.mkdir(parents=True, exist_ok=True)
    tmp = snapshots / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        applier = OverlayLayerApplier(tmp, flavor, lowers, unprivileged)
        try:
            _apply_blob(applier, layer)
            applier.finish()
        finally:
            applier.close()
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            remove_tree(tmp)  # another build made it meanwhile
    except BaseException:
        remove_tree(tmp)
        raise
    return final, applier.stats


class _CrcReader:
    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.crc = 0

    def read(self, n: int = -1, /) -> bytes:
        data: bytes = self.reader.read(n)
        self.crc = zlib.crc32(data, self.crc)
        return data


class _ChecksummingApplier(_Applier):
    """Applies layers and remembers a CRC-32 of every regular file's content, by path."""

    def __init__(self, target: Path, unprivileged: bool) -> None:
        super().__init__(target, unprivileged)
        self.crcs: dict[str, int] = {}
        self._crc: int | None = None

    def _file(self, e: TarEntry, reader: Any, pfd: int, base: str) -> None:
        wrapped = _CrcReader(reader)
        super()._file(e, wrapped, pfd, base)  # type: ignore[arg-type]  # read() is all _file uses
        self._crc = wrapped.crc

    def _added(self, key: str, e: TarEntry) -> None:
        super()._added(key, e)
        if self._crc is not None and e.is_file:
            self.crcs[key] = self._crc
        else:
            self.crcs.pop(key, None)
        self._crc = None


def materialise(
    rootfs: Path, layers: list[LayerRef], *, unprivileged: bool = False
) -> tuple[ApplyStats, dict[str, int]]:
    """Apply ``layers`` (bottom first) onto the empty directory ``rootfs``; returns the stats and a CRC-32 of every
    regular file's content by path (for :func:`diff_native`)."""
    applier = _ChecksummingApplier(rootfs, unprivileged)
    try:
        for layer in layers:
            _apply_blob(applier, layer)
        applier.finish()
    finally:
        applier.close()
    return applier.stats, applier.crcs


def remove_tree(path: Path) -> None:
    """``rm -rf`` as root in the namespace (overlay work dirs have mode 000 subdirectories)."""

    def fix(func: object, p: str, exc: object) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
        except OSError:
            pass

    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=fix)
        else:
            os.unlink(path)


# -- diffs ----------------------------------------------------------------------------------------------------
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


def _meta(st: os.stat_result, path: Path | None = None) -> Meta:
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
            it = os.scandir(root / rel if rel else root)
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
    return {path: _meta(st, root / path) for path, st in _walk(root)}


def _same(a: Meta, b: Meta, full: Path, crc: int | None) -> bool:
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


def _crc_of(path: Path) -> int | None:
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


def _xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
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
    full = root / path
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
        if old is None or not _same(old, _meta(st, root / path), root / path, crcs.get(path)):
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
    view = _LowerView(lowers)
    for path, st in _walk(upper):
        stats[path] = st
        parent = path.rpartition("/")[0]
        if is_whiteout(st):
            changed[path] = _whiteout(path)
            continue
        found = view.lstat(path)
        lower, source = found if found is not None else (None, None)
        if stat.S_ISDIR(st.st_mode) and (
            _xattr_is(upper / path, key) or (parent in hiding and lower is not None and stat.S_ISDIR(lower.st_mode))
        ):
            hiding.add(path)
            changed[path] = _entry(upper, path, st)
            present = set(os.listdir(upper / path))
            for name in view.children(path):
                if name not in present:
                    child = f"{path}/{name}"
                    changed[child] = _whiteout(child)
            continue
        if parent not in hiding and lower is not None and _same_meta(upper / path, st, lower, source):
            continue  # only copied up: on the way to a change below it, opened for writing, a removed mount stub
        changed[path] = _entry(upper, path, st)
    return _finish(upper, changed, stats)


def _xattr_is(path: Path, key: str) -> bool:
    try:
        return os.getxattr(path, key, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _same_meta(full: Path, st: os.stat_result, lower: os.stat_result, source: Path | None) -> bool:
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


def _same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


class _LowerView:
    """The merged lower directories of an overlay, looked up one directory at a time (cached)."""

    def __init__(self, lowers: list[Path]) -> None:
        self._dirs: dict[str, list[Path]] = {"": list(lowers)}

    def dirs(self, path: str) -> list[Path]:
        """The lower directories that make up merged directory ``path``, top first (empty: not a lower dir)."""
        cached = self._dirs.get(path)
        if cached is not None:
            return cached
        parent, _, name = path.rpartition("/")
        out: list[Path] = []
        for d in self.dirs(parent):
            st = _lstat(d / name)
            if st is None:
                if _is_opaque(d):
                    break
                continue
            if not stat.S_ISDIR(st.st_mode):  # a whiteout or a file hides everything below
                break
            out.append(d / name)
            if _is_opaque(d / name):
                break
        self._dirs[path] = out
        return out

    def lstat(self, path: str) -> tuple[os.stat_result, Path] | None:
        """What the merged lowers have at ``path`` and where, or None."""
        parent, _, name = path.rpartition("/")
        for d in self.dirs(parent):
            st = _lstat(d / name)
            if st is not None:
                return None if is_whiteout(st) else (st, d / name)
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


def _is_opaque(path: Path) -> bool:
    for key in ("user.overlay.opaque", "trusted.overlay.opaque"):
        try:
            if os.getxattr(path, key, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False
