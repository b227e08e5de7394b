"""RUN without mount permission (``chroot`` isolation as root in a container without CAP_SYS_ADMIN).

Contract: :class:`Placements` stands in for the mounts the sandbox cannot make, on S's side, before the command's
process starts: device nodes in ``/dev`` (``mknod``, where CAP_MKNOD allows), ``/etc/hosts`` and
``/etc/resolv.conf`` when the image has none, secret files, heredoc scripts, cache mounts (the cache directory is
*renamed* into place and back), bind mounts (a copy), tmpfs (an empty directory). :meth:`Placements.undo` removes
exactly what was placed — a file only if it is still the same inode — before the layer is computed, so none of it
reaches the layer. /proc stays empty (a warning says so).

S is not confined to the root as the command is: every placement is resolved inside the root (a symlink in the
image is followed there, never out of it; a mount point that is itself a symlink is refused, as with mounts), and
:meth:`Placements.undo` reaches what it placed through directory descriptors opened without following symlinks,
since the command may have swapped a symlink to a host path in for a parent (BuildKit CVE-2024-23652).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from imgci.build.sandbox.rootfs import open_dir_nofollow
from imgci.build.sandbox.spec import ChildSpec

_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


class Placements:
    def __init__(self, rootfs: Any, warnings: list[str]) -> None:
        self.rootfs = rootfs  # child.Rootfs: stub() and path
        self.root: Path = rootfs.path
        self.warnings = warnings
        self.placed: list[tuple[str, str, int, str]] = []  # (rel path, kind, inode, restore-to)

    def _record(self, rel: str, kind: str, restore: str = "") -> None:
        st = os.lstat(self.root / rel)
        self.placed.append((rel, kind, st.st_ino, restore))

    def _free(self, rel: str) -> bool:
        return not os.path.lexists(self.root / rel)

    def _dir(self, path: str) -> str:
        """Directory ``path`` made to exist (a stub) and resolved inside the root, a symlink at its end followed
        there too (``stub`` resolves all but the last component, hence the ``.``); its root-relative path."""
        rel = self.rootfs.stub(path.rstrip("/") + "/.", True)
        return rel.removesuffix(".").rstrip("/")

    def _real_dir(self, rel: str, target: str) -> Path:
        """``rel`` (a stub's path) as a real directory: a mount point that is a symlink is refused, as mounts do,
        since this process would otherwise follow it out of the root (it is not chrooted)."""
        path = self.root / rel
        if os.path.islink(path) or not path.is_dir():
            raise OSError(f"mount point {target} is a symbolic link or not a directory in the image")
        return path

    def file(self, target: str, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
        parent = target.rpartition("/")[0] or "/"
        prel = self._dir(parent) if parent != "/" else ""
        rel = f"{prel}/{target.rpartition('/')[2]}".lstrip("/")
        if not self._free(rel) or os.path.islink(self.root / prel if prel else self.root):
            return  # the image has its own: leave it
        fd = os.open(self.root / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            with contextlib.suppress(OSError):
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        self._record(rel, "file")

    def devices(self) -> None:
        prel = self.rootfs.stub("/dev", True, keep=True)
        if os.path.islink(self.root / prel):  # a symlink to a host path: never create devices through it
            self.warnings.append("/dev is a symbolic link in the image: no devices are created in it")
            return
        for name in _DEVICES:
            rel = f"{prel}/{name}"
            host = Path("/dev") / name
            if not self._free(rel) or not host.exists():
                continue
            try:
                os.mknod(self.root / rel, stat.S_IFCHR | 0o666, os.stat(host).st_rdev)
                os.chmod(self.root / rel, 0o666)
            except OSError as e:
                self.warnings.append(f"cannot create /dev/{name} in the chroot ({e.strerror}): add CAP_MKNOD")
                continue
            self._record(rel, "file")
        for name, mode in (("shm", 0o1777), ("pts", 0o755)):
            rel = f"{prel}/{name}"
            if self._free(rel):
                os.mkdir(self.root / rel)
                os.chmod(self.root / rel, mode)
                self._record(rel, "tree")
        for name, link in (
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ):
            rel = f"{prel}/{name}"
            if self._free(rel):
                os.symlink(link, self.root / rel)
                self._record(rel, "file")

    def tree(self, target: str, source: Path | None) -> None:
        """An empty directory at ``target`` (tmpfs), or a copy of ``source`` (bind)."""
        rel = self.rootfs.stub(target, True)
        path = self._real_dir(rel, target)
        if any(path.iterdir()):
            raise OSError(f"{target} is not empty in the image: without mount permission it cannot be mounted over")
        if source is not None:
            shutil.copytree(source, path, symlinks=True, dirs_exist_ok=True)
        self.placed.append((rel, "contents", 0, ""))

    def moved(self, target: str, source: Path) -> None:
        """Cache mount: ``source`` renamed to ``target`` for the step, and back afterwards."""
        rel = self.rootfs.stub(target, True)
        path = self._real_dir(rel, target)
        if any(path.iterdir()):
            raise OSError(f"{target} is not empty in the image: without mount permission it cannot be a cache mount")
        os.rmdir(path)
        os.rename(source, path)
        self.placed.append((rel, "moved", os.lstat(path).st_ino, str(source)))
        os.mkdir(source)  # keep the slot taken; replaced on the way back

    def undo(self) -> None:
        from imgci.rootdir import RootDir

        remover = RootDir(self.root)
        try:
            for rel, kind, ino, restore in reversed(self.placed):
                parent, _, name = rel.rpartition("/")
                fd = open_dir_nofollow(self.root, parent)  # never through a symlink the step put on the way
                if fd is None:
                    continue
                try:
                    self._undo_one(remover, fd, name, kind, ino, restore)
                except OSError as e:
                    self.warnings.append(f"could not clean up {rel} after the step: {e}")
                finally:
                    os.close(fd)
        finally:
            remover.close()
        self.placed.clear()

    @staticmethod
    def _undo_one(remover: Any, fd: int, name: str, kind: str, ino: int, restore: str) -> None:
        try:
            st = os.lstat(name, dir_fd=fd)
        except FileNotFoundError:
            return
        if kind == "file" and st.st_ino == ino:
            os.unlink(name, dir_fd=fd)
        elif kind == "tree" and stat.S_ISDIR(st.st_mode) and st.st_ino == ino:
            remover.remove(fd, name, st)
        elif kind == "contents" and stat.S_ISDIR(st.st_mode):
            dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            try:
                for child in sorted(os.listdir(dfd)):
                    remover.remove(dfd, child, os.lstat(child, dir_fd=dfd))
            finally:
                os.close(dfd)
        elif kind == "moved" and stat.S_ISDIR(st.st_mode) and st.st_ino == ino:
            os.rmdir(restore)
            os.rename(name, restore, src_dir_fd=fd)
            os.mkdir(name, dir_fd=fd)


def place_all(spec: ChildSpec, rootfs: Any, warnings: list[str]) -> Placements:
    """Stand in for every mount of ``spec`` (see the module contract)."""
    assert spec.process is not None
    p = Placements(rootfs, warnings)
    rootfs.stub("/proc", True, keep=True)
    rootfs.stub("/sys", True, keep=True)
    warnings.append("no mount permission: RUN gets an empty /proc (grant CAP_SYS_ADMIN for a real one)")
    p.devices()
    p.file("/etc/hosts", spec.hosts.encode(), 0o644)
    p.file("/etc/resolv.conf", spec.resolv.encode(), 0o644)
    for path, hexdata, mode in spec.process.files:
        p.file(path, bytes.fromhex(hexdata), mode)
    for m in spec.mounts:
        if m.kind == "secret" and m.target:
            p.file(m.target, bytes.fromhex(m.data), m.mode, m.uid, m.gid)
        elif m.kind == "tmpfs":
            p.tree(m.target, None)
        elif m.kind == "cache":
            p.moved(m.target, Path(m.source))
        elif m.kind == "bind":
            source = Path(m.source) / m.subpath if m.subpath else Path(m.source)
            p.tree(m.target, source)
        elif m.kind == "ssh":
            raise OSError("RUN --mount=type=ssh needs mount permission (grant CAP_SYS_ADMIN)")
    return p
