"""Applying layer tars onto a root filesystem directory — safely, with OCI whiteout semantics.

Contract of :func:`apply_layer`:
- Entries are applied in archive order; nothing is ever created, modified, chmod'ed, chown'ed or deleted outside
  ``target``. Paths are resolved by :class:`imgci.rootdir.RootDir` (component by component from a directory fd,
  ``O_NOFOLLOW`` opens, ``*at`` calls); the last component of an entry is never followed.
- Names: a leading ``/`` or ``./`` is stripped (absolute names are confined to the root, as docker does); a
  ``..`` component, a NUL, or more than ``MAX_DEPTH`` components raise :class:`UnsafeArchiveError`.
- Parent directories that are symlinks are followed *inside the root only* (an absolute target is taken
  relative to the root, as in a chroot), so ``lib -> usr/lib`` then ``lib/x.so`` writes ``usr/lib/x.so``. A
  symlink that would lead above the root raises UnsafeArchiveError (docker also refuses breakouts).
- An existing entry in the way is replaced (a directory only by a non-directory); a symlink in the way is
  removed, never written, chmod'ed or deleted through. Symlinks are created exactly as stored.
- Hardlink targets must already exist inside the root, are resolved without following any symlink, may not be
  directories; a hardlink to a symlink links the symlink itself (``linkat`` without ``AT_SYMLINK_FOLLOW``).
- Whiteouts: ``.wh.NAME`` deletes NAME (the link itself if it is a symlink) when it came from a lower layer;
  ``.wh..wh..opq`` deletes everything in its directory that this same layer did not add. A whiteout of ``.``,
  ``..`` or the root raises UnsafeArchiveError; whiteout files themselves are never created.
- Devices are created only when privileged; when unprivileged (default: euid != 0) they are skipped with a
  warning in :class:`ApplyStats`. Ownership is applied only when privileged; failures become warnings, as do
  xattrs that cannot be set (overlayfs' own ``trusted.overlay.*``/``user.overlay.*`` xattrs are never set).
- Directory modes and mtimes are applied last (deepest first); when not root, directories stay owner-writable
  until then so that restrictive modes from the archive cannot block extraction.
- Malformed or truncated archives raise :class:`CorruptArchiveError` (see ``tarstream``). After an error the
  target is partially written; callers discard it.

:func:`extract_layer_dir` extracts one layer on its own for the layer store (``imgci.build.layerstore``) under
the same rules, but keeps whiteouts as data and reports every entry's metadata to a callback.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imgci.errors import (
    ArchiveError,
    CorruptArchiveError,
    DigestMismatchError,
    StorageFullError,
    UnsafeArchiveError,
)
from imgci.oci import Digest, ImageConfig, Manifest
from imgci.rootdir import RootDir, lstat_at, relpath
from imgci.tarstream import BLK, CHR, FIFO, LNK, SYM, TarEntry, TarReader, safe_parts

if TYPE_CHECKING:  # (at run time: imported where used; the sandbox's fork server imports this module)
    from imgci.compression import Readable
    from imgci.store import Store

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
_MAX_WARNINGS = 100
_CHUNK = 1 << 20
_O_NEWFILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SKIPPED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


@dataclass
class ApplyStats:
    """What applying one or more layers did."""

    entries: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    fifos: int = 0
    whiteouts: int = 0
    bytes: int = 0
    skipped: int = 0
    chown_failures: int = 0
    xattr_failures: int = 0
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        if len(self.warnings) < _MAX_WARNINGS:
            self.warnings.append(message)
        elif len(self.warnings) == _MAX_WARNINGS:
            self.warnings.append("(further warnings not recorded)")


def whiteout_victim(e: TarEntry, base: str) -> str:
    """The name a whiteout entry (last component ``base``) deletes, ``""`` for an opaque marker; UnsafeArchiveError
    for a whiteout of ``.``, ``..`` or the root."""
    victim = "" if base == OPAQUE_WHITEOUT else base[len(WHITEOUT_PREFIX) :]
    if base != OPAQUE_WHITEOUT and victim in ("", ".", ".."):
        raise UnsafeArchiveError(f"{e.name!r}: whiteout of {victim or 'the root'!r} is not allowed")
    return victim


class _Applier:
    """Applies layers to one root; shared across the layers of an image so directory metadata is set once."""

    def __init__(self, target: Path, unprivileged: bool | None) -> None:
        self.privileged = (os.geteuid() == 0) if unprivileged is None else not unprivileged
        self.stats = ApplyStats()
        self.dir_meta: dict[str, tuple[int, float]] = {}  # directory -> (mode, mtime), applied by finish()
        self.added: set[str] = set()  # what the current layer created (an opaque whiteout keeps those)
        self._warned: set[str] = set()
        self.root = RootDir(target, on_mkdir=self.added_path)
        # The directory the last regular file went into (archive path parts, fd, resolved names), reached without
        # following a symlink: the next file of the same directory goes there without walking to it again. Only
        # regular files use and keep it; any other entry (which may replace or remove directories) drops it first.
        self._parent: tuple[tuple[str, ...], int, list[str]] | None = None

    def added_path(self, path: str) -> None:
        self.added.add(path)

    def _drop_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def close(self) -> None:
        self._drop_parent()
        self.root.close()

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self.stats.warn(message)

    # -- metadata -------------------------------------------------------------------------------------------
    def _chown(self, e: TarEntry, *, fd: int | None = None, name: str = "", dir_fd: int | None = None) -> None:
        if not self.privileged:
            return
        try:
            if fd is not None:
                os.fchown(fd, e.uid, e.gid)
            else:
                os.chown(name, e.uid, e.gid, dir_fd=dir_fd, follow_symlinks=False)
        except (OSError, OverflowError) as err:  # OverflowError: an id outside uid_t (the tar allows int64)
            self.stats.chown_failures += 1
            reason = getattr(err, "strerror", None) or err
            self._warn_once("chown", f"cannot set ownership ({reason}), first on {e.name!r}")

    def _xattrs(self, e: TarEntry, fd: int) -> None:
        for key, value in e.xattrs.items():
            if key.startswith(_SKIPPED_XATTR_PREFIXES):
                self.stats.xattr_failures += 1
                self._warn_once("xattr-overlay", f"ignored overlayfs xattr {key!r} on {e.name!r}")
                continue
            try:
                os.setxattr(fd, key, value)
            except OSError as err:
                self.stats.xattr_failures += 1
                self._warn_once(f"xattr:{key}", f"cannot set xattr {key!r} ({err.strerror}), first on {e.name!r}")

    # -- entries --------------------------------------------------------------------------------------------
    def apply(self, stream: Readable) -> None:
        self.added = set()
        reader = TarReader(stream)
        for entry in reader:
            self.stats.entries += 1
            try:
                self._entry(entry, reader)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StorageFullError(f"no space left while extracting {entry.name!r}") from None
                raise ArchiveError(f"cannot extract {entry.name!r}: {e.strerror or e}") from None
            except OverflowError as e:  # an int64 device number or time the OS cannot hold (makedev, utime)
                raise ArchiveError(f"cannot extract {entry.name!r}: {e}") from None
        self._drop_parent()
        reader.drain()

    def _entry(self, e: TarEntry, reader: TarReader) -> None:
        parts = safe_parts(e.name)
        if not parts:
            if not e.is_dir:
                raise UnsafeArchiveError(f"{e.name!r}: a non-directory entry cannot replace the root")
            self.dir_meta[""] = (e.mode, e.mtime)
            self._added("", e)
            return
        base = parts[-1]
        where = tuple(parts[:-1])
        cached = self._parent
        if e.is_file and cached is not None and cached[0] == where and not base.startswith(WHITEOUT_PREFIX):
            _, pfd, pnames = cached  # kept open for the next file
            owned = False
        else:
            self._drop_parent()
            if base.startswith(WHITEOUT_PREFIX):
                self._whiteout(e, parts)
                return
            opened = self.root.walk(parts[:-1], create=True, follow=True, entry=e.name)
            assert opened is not None
            pfd, pnames = opened
            # Kept only when no symlink was followed to it: then a file entry of that directory can only change
            # what is inside it, never a directory or link on the way there.
            owned = not (e.is_file and pnames == list(where))
            if not owned:
                self._parent = (where, pfd, pnames)
        key = relpath([*pnames, base])
        try:
            if e.is_file:
                self._file(e, reader, pfd, base)
            elif e.is_dir:
                self._dir(e, pfd, base, key)
            elif e.type == SYM:
                self._symlink(e, pfd, base)
            elif e.type == LNK:
                self._hardlink(e, pfd, base)
            elif e.type in (CHR, BLK, FIFO):
                if not self._special(e, pfd, base):
                    return
            else:
                self.stats.skipped += 1
                self.stats.warn(f"skipped {e.name!r}: unsupported tar entry type {e.type!r}")
                return
            self._added(key, e)
        finally:
            if owned:
                os.close(pfd)

    def _added(self, key: str, e: TarEntry) -> None:
        """``e`` now exists at root-relative ``key`` (hook for :class:`LayerDirApplier`)."""
        self.added.add(key)

    def _disk_mode(self, mode: int, is_dir: bool) -> int:
        """The mode to give an entry on disk (hook for :class:`LayerDirApplier`)."""
        return mode

    def _file(self, e: TarEntry, reader: TarReader, pfd: int, base: str) -> None:
        self.root.clear(pfd, base, keep_dir=False)
        fd = os.open(base, _O_NEWFILE, 0o600, dir_fd=pfd)
        try:
            while chunk := reader.read(_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                self.stats.bytes += len(chunk)
            self._chown(e, fd=fd)
            os.fchmod(fd, self._disk_mode(e.mode, False))
            self._xattrs(e, fd)
            os.utime(fd, (e.mtime, e.mtime))
        finally:
            os.close(fd)
        self.stats.files += 1

    def _dir(self, e: TarEntry, pfd: int, base: str, key: str) -> None:
        st = self.root.clear(pfd, base, keep_dir=True)
        if st is None:
            os.mkdir(base, 0o700, dir_fd=pfd)
            st = os.lstat(base, dir_fd=pfd)
        fd = self.root.open_dir(pfd, base, st, key)
        try:
            self._chown(e, fd=fd)
            self._xattrs(e, fd)
        finally:
            os.close(fd)
        self.dir_meta[key] = (e.mode, e.mtime)
        self.stats.dirs += 1

    def _symlink(self, e: TarEntry, pfd: int, base: str) -> None:
        if not e.linkname or "\x00" in e.linkname:
            raise CorruptArchiveError(f"{e.name!r}: symlink with an empty or NUL-containing target")
        self.root.clear(pfd, base, keep_dir=False)
        os.symlink(e.linkname, base, dir_fd=pfd)
        self._chown(e, name=base, dir_fd=pfd)
        os.utime(base, (e.mtime, e.mtime), dir_fd=pfd, follow_symlinks=False)
        self.stats.symlinks += 1

    def _hardlink(self, e: TarEntry, pfd: int, base: str) -> None:
        tparts = safe_parts(e.linkname, what=f"hardlink {e.name!r} target")
        if not tparts:
            raise UnsafeArchiveError(f"{e.name!r}: hardlink to the root directory")
        opened = self.root.walk(tparts[:-1], create=False, follow=False, entry=e.name)
        if opened is None:
            raise CorruptArchiveError(f"{e.name!r}: hardlink target {e.linkname!r} does not exist")
        tfd, _ = opened
        try:
            tst = lstat_at(tparts[-1], tfd)
            if tst is None:
                raise CorruptArchiveError(f"{e.name!r}: hardlink target {e.linkname!r} does not exist")
            if stat.S_ISDIR(tst.st_mode):
                raise UnsafeArchiveError(f"{e.name!r}: hardlink to directory {e.linkname!r}")
            existing = lstat_at(base, pfd)
            if existing is not None and (existing.st_dev, existing.st_ino) == (tst.st_dev, tst.st_ino):
                return
            self.root.clear(pfd, base, keep_dir=False)
            os.link(tparts[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)
        self.stats.hardlinks += 1

    def _special(self, e: TarEntry, pfd: int, base: str) -> bool:
        if e.type == FIFO:
            self.root.clear(pfd, base, keep_dir=False)
            os.mkfifo(base, 0o600, dir_fd=pfd)
            self.stats.fifos += 1
        else:
            if not self.privileged:
                self.stats.skipped += 1
                self.stats.warn(f"skipped device node {e.name!r} (unprivileged)")
                return False
            self.root.clear(pfd, base, keep_dir=False)
            kind = stat.S_IFCHR if e.type == CHR else stat.S_IFBLK
            try:
                os.mknod(base, kind | 0o600, os.makedev(e.devmajor, e.devminor), dir_fd=pfd)
            except PermissionError:
                self.stats.skipped += 1
                self.stats.warn(f"skipped device node {e.name!r} (mknod not permitted)")
                return False
            self.stats.devices += 1
        self._chown(e, name=base, dir_fd=pfd)
        os.chmod(base, self._disk_mode(e.mode, False), dir_fd=pfd)  # just created by us: a device or fifo
        os.utime(base, (e.mtime, e.mtime), dir_fd=pfd, follow_symlinks=False)
        return True

    def _whiteout(self, e: TarEntry, parts: list[str]) -> None:
        base = parts[-1]
        victim = whiteout_victim(e, base)
        self.stats.whiteouts += 1
        opened = self.root.walk(parts[:-1], create=False, follow=True, entry=e.name)
        if opened is None:
            return  # nothing below to hide
        fd, names = opened
        try:
            if base == OPAQUE_WHITEOUT:
                self._opaque(fd, names)
            elif relpath([*names, victim]) not in self.added:  # whiteouts only hide lower layers
                st = lstat_at(victim, fd)
                if st is not None:
                    self.root.remove(fd, victim, st)
        finally:
            os.close(fd)

    def _opaque(self, fd: int, names: list[str]) -> None:
        with os.scandir(fd) as it:
            children = [(c.name, c.is_dir(follow_symlinks=False)) for c in it]
        for child, is_dir in children:
            key = relpath([*names, child])
            st = os.lstat(child, dir_fd=fd)
            if key not in self.added:
                self.root.remove(fd, child, st)
            elif is_dir:
                cfd = self.root.open_dir(fd, child, st, key)
                try:
                    self._opaque(cfd, [*names, child])
                finally:
                    os.close(cfd)

    # -- final directory metadata ---------------------------------------------------------------------------
    def finish(self) -> None:
        """Set directory modes and mtimes (deepest first) and restore modes relaxed for traversal."""
        done: set[str] = set()
        while pending := (set(self.dir_meta) | set(self.root.relaxed)) - done:
            for key in sorted(pending, key=lambda k: k.count("/") + 1 if k else 0, reverse=True):
                done.add(key)
                try:
                    opened = self.root.walk(key.split("/") if key else [], create=False, follow=False, entry=key)
                except (ArchiveError, OSError):
                    continue  # replaced by a non-directory or a symlink since: nothing to set
                if opened is None:
                    continue
                fd, _ = opened
                try:
                    meta = self.dir_meta.get(key)
                    if meta is not None:
                        os.fchmod(fd, self._disk_mode(meta[0], True))
                        os.utime(fd, (meta[1], meta[1]))
                    else:
                        os.fchmod(fd, self._disk_mode(self.root.relaxed[key], True))
                finally:
                    os.close(fd)


def apply_layer(stream: Readable, target: Path, *, unprivileged: bool | None = None) -> ApplyStats:
    """Apply one uncompressed layer tar ``stream`` onto the directory ``target``; see the module contract."""
    applier = _Applier(Path(target), unprivileged)
    try:
        applier.apply(stream)
        applier.finish()
    finally:
        applier.close()
    return applier.stats


class LayerDirApplier(_Applier):
    """Extracts one layer *alone*, keeping its whiteouts as data; see :func:`extract_layer_dir`."""

    def __init__(self, target: Path, unprivileged: bool | None, record: LayerRecorder) -> None:
        super().__init__(target, unprivileged)
        self._record = record

    def _added(self, key: str, e: TarEntry) -> None:
        super()._added(key, e)
        self._record("entry", key, e)

    def _disk_mode(self, mode: int, is_dir: bool) -> int:
        # Unprivileged, the files are ours whatever the tar says; the owner must still read them and remove them.
        return mode if self.privileged else mode | (0o700 if is_dir else 0o400)

    def _whiteout(self, e: TarEntry, parts: list[str]) -> None:
        base = parts[-1]
        victim = whiteout_victim(e, base)
        opened = self.root.walk(parts[:-1], create=True, follow=True, entry=e.name)
        assert opened is not None
        fd, names = opened
        try:
            self.root.clear(fd, base, keep_dir=False)
            os.close(os.open(base, _O_NEWFILE, 0o600, dir_fd=fd))  # the marker itself, as data
        finally:
            os.close(fd)
        self.stats.whiteouts += 1
        self._record("opaque" if not victim else "whiteout", relpath([*names, victim] if victim else names), e)

    def _special(self, e: TarEntry, pfd: int, base: str) -> bool:
        if e.type == FIFO:
            return super()._special(e, pfd, base)
        self.root.clear(pfd, base, keep_dir=False)  # device nodes are metadata only, never created
        self.stats.devices += 1
        return True

    def _hardlink(self, e: TarEntry, pfd: int, base: str) -> None:
        try:
            super()._hardlink(e, pfd, base)
        except CorruptArchiveError:
            # The target is in a lower layer: the link exists in the index only.
            self.root.clear(pfd, base, keep_dir=False)
            self.stats.hardlinks += 1


LayerRecorder = Callable[[str, str, TarEntry], None]


def extract_layer_dir(
    stream: Readable, target: Path, record: LayerRecorder, *, unprivileged: bool | None = None
) -> ApplyStats:
    """Extract one uncompressed layer tar into ``target`` on its own (no lower layers), keeping whiteouts as data.

    Same safety rules as :func:`apply_layer`, except: whiteout and opaque markers are created as empty files
    (0600) and never applied; device nodes are never created (metadata only); a hardlink whose target is not in
    this layer is not created; unprivileged, files get owner read and directories owner rwx on disk. Every entry
    is reported as ``record(kind, key, entry)`` in archive order: kind ``entry`` with the root-relative path where
    it now is (``""`` for the root), ``whiteout`` with the path it deletes below, ``opaque`` with the directory
    whose lower contents it hides.
    """
    applier = LayerDirApplier(Path(target), unprivileged, record)
    try:
        applier.apply(stream)
        applier.finish()
    finally:
        applier.close()
    return applier.stats


def consume_verified_layer(
    raw: Readable,
    digest: Digest,
    diff_id: Digest,
    consume: Callable[[Readable], object],
    *,
    expected_by: str = "the image config says",
) -> None:
    """Feed the decompressed stream of layer blob ``raw`` to ``consume``, then check the blob's digest and the
    stream's (``diff_id``); DigestMismatchError on a difference (after ``consume`` ran: discard what it made)."""
    from imgci.compression import HashingReader, open_decompressed

    packed = HashingReader(raw, digest.algorithm)
    unpacked = HashingReader(open_decompressed(packed), diff_id.algorithm)
    consume(unpacked)
    unpacked.drain()
    packed.drain()
    if packed.digest != digest:
        raise DigestMismatchError(
            f"layer blob {digest} in the store hashes to {packed.digest}",
            expected=digest.value,
            actual=packed.digest.value,
            hint="run `imgci fsck`",
        )
    if unpacked.digest != diff_id:
        raise DigestMismatchError(
            f"layer {digest.short}: uncompressed content hashes to {unpacked.digest}, but {expected_by} {diff_id}",
            expected=diff_id.value,
            actual=unpacked.digest.value,
        )


def unpack_image(store: Store, manifest: Manifest, target: Path, *, unprivileged: bool | None = None) -> ApplyStats:
    """Apply every layer of ``manifest`` in order into ``target`` (which must be empty or not exist yet).

    Each blob is decompressed (compression detected from its bytes) and both its digest and the digest of the
    decompressed stream are checked — against the descriptor and the config's ``rootfs.diff_ids`` — raising
    DigestMismatchError on a difference (after the layer was applied: discard the target on any error).
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir() or any(target.iterdir()):
            raise ArchiveError(f"cannot unpack into {target}: not an empty directory")
    else:
        target.mkdir(parents=True)
    config_bytes = store.read_blob(manifest.config.digest)
    manifest.config.digest.verify(config_bytes, what="image config")
    diff_ids = ImageConfig.parse(config_bytes).diff_ids
    if len(diff_ids) != len(manifest.layers):
        raise DigestMismatchError(
            f"image {manifest.digest.short}: {len(manifest.layers)} layers but {len(diff_ids)} diff_ids in its config",
            expected=str(len(manifest.layers)),
            actual=str(len(diff_ids)),
        )
    applier = _Applier(target, unprivileged)
    try:
        for layer, diff_id in zip(manifest.layers, diff_ids, strict=True):
            with store.open_blob(layer.digest) as raw:
                consume_verified_layer(raw, layer.digest, diff_id, applier.apply)
        applier.finish()
    finally:
        applier.close()
    return applier.stats
