"""A directory that paths are resolved in but never out of (openat-style, one component at a time).

Contract of :class:`RootDir`:
- Every lookup starts from a directory fd of the root and goes one component at a time with ``lstat`` and
  ``O_NOFOLLOW|O_DIRECTORY`` opens; callers then act with ``*at`` calls relative to the returned fd, so no
  path string is ever resolved by the kernel from outside the root.
- :meth:`walk` follows symlinks only when asked, and then *inside the root only*: an absolute target restarts
  at the root (as in a chroot), and a ``..`` that would climb above the root raises UnsafeArchiveError instead
  of being clamped. Loops (more than 40 links) and paths deeper than ``MAX_DEPTH`` raise too.
- :meth:`remove` deletes a file, a symlink (the link itself) or a whole tree, never following a symlink.
- Without CAP_DAC_OVERRIDE (euid != 0), a directory owned by us that lacks owner rwx is made rwx before it is
  traversed or emptied, and its mode is remembered in ``relaxed`` so that the caller can restore it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from imgci.errors import ArchiveError, UnsafeArchiveError
from imgci.tarstream import MAX_DEPTH

_MAX_SYMLINKS = 40
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
    """``lstat`` of ``name`` in ``dir_fd``, or None if it does not exist."""
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def relpath(parts: list[str]) -> str:
    """The root-relative path of resolved components (``""`` is the root)."""
    return "/".join(parts)


class RootDir:
    """An open root directory; see the module contract. ``on_mkdir`` hears of directories :meth:`walk` made."""

    def __init__(self, path: Path, on_mkdir: Callable[[str], None] | None = None) -> None:
        self.fixperms = os.geteuid() != 0
        self.relaxed: dict[str, int] = {}
        self._on_mkdir = on_mkdir
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ArchiveError(f"cannot extract into {path}: {e.strerror or e}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open_dir(self, parent_fd: int, name: str, st: os.stat_result, path: str) -> int:
        """Open the directory ``name`` (``st`` is its lstat) for traversal and changes."""
        if self.fixperms and st.st_mode & 0o700 != 0o700 and st.st_uid == os.geteuid():
            os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=parent_fd)  # lstat said: a real directory
            self.relaxed.setdefault(path, stat.S_IMODE(st.st_mode))
        return os.open(name, O_DIR, dir_fd=parent_fd)

    def walk(self, parts: list[str], *, create: bool, follow: bool, entry: str) -> tuple[int, list[str]] | None:
        """Open the directory ``parts``; returns (fd, resolved components), or None if missing and not ``create``.

        ``create`` makes missing directories (0755); ``follow`` follows symlinks within the root, else a symlink
        on the way raises UnsafeArchiveError. ``entry`` names the archive entry in errors. The caller closes fd.
        """
        stack: list[int] = []
        names: list[str] = []
        todo = list(reversed(parts))
        links = 0
        try:
            while todo:
                comp = todo.pop()
                if comp in ("", "."):
                    continue
                cur = stack[-1] if stack else self.fd
                if comp == "..":  # only ever from a symlink's target: archive names cannot hold ".."
                    if not names:
                        raise UnsafeArchiveError(f"{entry!r}: path leads outside the root through a symlink")
                    os.close(stack.pop())
                    names.pop()
                    continue
                st = lstat_at(comp, cur)
                if st is None:
                    if not create:
                        return None
                    os.mkdir(comp, 0o755, dir_fd=cur)
                    os.chmod(comp, 0o755, dir_fd=cur)  # whatever the umask: implicit parents are 0755, as in docker
                    if self._on_mkdir is not None:
                        self._on_mkdir(relpath([*names, comp]))
                    st = os.lstat(comp, dir_fd=cur)
                if stat.S_ISLNK(st.st_mode):
                    where = relpath([*names, comp])
                    if not follow:
                        raise UnsafeArchiveError(f"{entry!r}: path goes through symlink {where!r}")
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise UnsafeArchiveError(f"{entry!r}: too many levels of symlinks at {where!r}")
                    link = os.readlink(comp, dir_fd=cur)
                    if link.startswith("/"):
                        while stack:
                            os.close(stack.pop())
                        names.clear()
                    todo.extend(reversed(link.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise ArchiveError(f"{entry!r}: {relpath([*names, comp])!r} is not a directory")
                if len(names) >= MAX_DEPTH:
                    raise UnsafeArchiveError(f"{entry!r}: resolves deeper than {MAX_DEPTH} directories")
                stack.append(self.open_dir(cur, comp, st, relpath([*names, comp])))
                names.append(comp)
            fd = stack.pop() if stack else os.dup(self.fd)
            return fd, names
        finally:
            for fd in stack:
                os.close(fd)

    def remove(self, parent_fd: int, name: str, st: os.stat_result) -> None:
        """Delete ``name`` in ``parent_fd`` (``st`` is its lstat): a non-directory, or a directory tree."""
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent_fd)
            return
        if self.fixperms:
            with contextlib.suppress(PermissionError):
                os.chmod(name, 0o700, dir_fd=parent_fd)  # lstat said: a real directory
        fd = os.open(name, O_DIR, dir_fd=parent_fd)
        try:
            with os.scandir(fd) as it:
                children = [(c.name, c.is_dir(follow_symlinks=False)) for c in it]
            for child, is_dir in children:
                if is_dir:
                    self.remove(fd, child, os.lstat(child, dir_fd=fd))
                else:
                    os.unlink(child, dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent_fd)

    def clear(self, parent_fd: int, name: str, *, keep_dir: bool) -> os.stat_result | None:
        """Remove whatever is at ``name`` (a directory survives if ``keep_dir``); returns the kept dir's lstat."""
        st = lstat_at(name, parent_fd)
        if st is None:
            return None
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return st
        self.remove(parent_fd, name, st)
        return None
