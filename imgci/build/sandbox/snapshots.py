"""Snapshots for RUN, on the child's side of the sandbox (inside its namespaces, as root there).

Contract:
- :func:`ensure_snapshot` gives the overlay lower directory of one layer: ``SNAPSHOTS/<hex of diff_id>``, the layer
  alone extracted from its blob with real ownership and overlayfs' own whiteouts (``.wh.NAME`` → a 0:0 character
  device, ``.wh..wh..opq`` → the ``<prefix>.overlay.opaque=y`` xattr). It appears by ``rename`` only once complete
  and digest-verified (blob digest and diff_id), so concurrent builds share it and a killed one leaves only a
  ``.tmp-*`` directory. A hardlink to a file of a lower layer becomes a copy (overlay lowers cannot share inodes).
- :func:`materialise` applies every layer of a chain onto one directory (the ``native`` snapshotter's rootfs), with
  the hardened applier of :mod:`imgci.layerfs`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import zlib
from pathlib import Path
from typing import Any

from imgci.build.sandbox.spec import LayerRef
from imgci.errors import CorruptArchiveError
from imgci.layerfs import ApplyStats, _Applier, consume_verified_layer, whiteout_victim
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
        victim = whiteout_victim(e, parts[-1])
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
    """The regular file the merged lowers have at ``path`` (whiteouts and opaque directories honoured)."""
    from imgci.build.sandbox.diff import LowerView

    found = LowerView(lowers).lstat(path)
    return Path(found[1]) if found is not None and stat.S_ISREG(found[0].st_mode) else None


def lstat_or_none(path: str | Path) -> os.stat_result | None:
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
    with open(layer.blob, "rb") as raw:
        consume_verified_layer(
            raw, Digest(layer.digest), Digest(layer.diff_id), applier.apply, expected_by="its diff_id is"
        )


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
    stats: ApplyStats | None = None
    try:
        if not (layer.unpacked and not unprivileged and _link_tree(Path(layer.unpacked), tmp)):
            applier = OverlayLayerApplier(tmp, flavor, lowers, unprivileged)
            try:
                _apply_blob(applier, layer)
                applier.finish()
            finally:
                applier.close()
            stats = applier.stats
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            remove_tree(tmp)  # another build made it meanwhile
    except BaseException:
        remove_tree(tmp)
        raise
    return final, stats


def _link_tree(src: Path, dst: Path) -> bool:
    """Recreate the unpacked layer ``src`` in the empty directory ``dst``: directories, symlinks and FIFOs with
    their owner, mode, times and xattrs, regular files as hard links (same inode: same content and metadata; the
    snapshot is an overlay lower layer, never written). False, with ``dst`` emptied, when something cannot be
    reproduced this way — the caller then extracts the blob."""
    dirs: list[tuple[str, str]] = [(str(src), str(dst))]

    def unreadable(e: OSError) -> None:
        raise e  # os.walk would skip a directory it cannot list: the snapshot would silently lack it

    try:
        if not src.is_dir():
            raise FileNotFoundError(f"no unpacked layer at {src}")
        for dirpath, dirnames, filenames in os.walk(src, onerror=unreadable):
            rel = os.path.relpath(dirpath, src)
            target_dir = str(dst) if rel == "." else os.path.join(dst, rel)
            for name in [*dirnames, *filenames]:
                s_path, d_path = os.path.join(dirpath, name), os.path.join(target_dir, name)
                st = os.lstat(s_path)
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(d_path, 0o700)
                    dirs.append((s_path, d_path))
                elif stat.S_ISREG(st.st_mode):
                    os.link(s_path, d_path, follow_symlinks=False)
                elif stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(s_path), d_path)
                    _copy_meta(s_path, d_path, st)
                elif stat.S_ISFIFO(st.st_mode):
                    os.mkfifo(d_path, 0o600)
                    _copy_meta(s_path, d_path, st)
                else:
                    raise OSError(f"cannot link {s_path}")
        for s_path, d_path in reversed(dirs):  # children first: creating entries changes a directory's mtime
            _copy_meta(s_path, d_path, os.lstat(s_path))
    except OSError:
        for child in list(dst.iterdir()):
            if child.is_dir() and not child.is_symlink():
                remove_tree(child)
            else:
                child.unlink()
        return False
    return True


def _copy_meta(src: str, dst: str, st: os.stat_result) -> None:
    link = stat.S_ISLNK(st.st_mode)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not link:
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


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
