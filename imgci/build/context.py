"""Host directories as SourceFS trees: the build context (with .dockerignore) and other unpacked sources.

Contract of :class:`DirectoryFS`:
- Confinement: every path is a tree path (see :mod:`imgci.build.treepath`); symlinks are resolved inside the tree
  like a chroot (a link to ``/etc/passwd`` means ``<root>/etc/passwd``, ``..`` stops at the root), and every host
  access walks from a directory fd of the root one component at a time with ``O_NOFOLLOW``, so the kernel never
  follows a symlink for us and nothing outside the root is ever read, even if the tree changes meanwhile.
- ``lstat(path)`` resolves the parent directories and stats the last component itself; ``resolve``/``listdir``/
  ``open`` follow every component. Ignored entries (``ignore`` matcher) are invisible everywhere: ``lstat`` and
  ``resolve`` say they do not exist, ``listdir`` leaves them out. An excluded directory stays visible, holding only
  its re-included entries, when an exception pattern re-includes something below it (as BuildKit transfers it).
  Sockets are invisible (a layer cannot hold them).
- :class:`FileInfo` comes from ``lstat``: permission bits, size, mtime. Ownership is ``owner`` for every entry
  (``(0, 0)`` by default: BuildKit resets the uid/gid of transferred context files, so ``COPY`` from the context
  makes root-owned files unless ``--chown``); ``owner=None`` reports the host's ids. ``git_modes`` normalises modes
  as a git checkout would have them (0644/0755 files, 0755 dirs), ``fixed_mtime`` replaces every mtime.

:class:`BuildContext` is a DirectoryFS for ``docker build <root>``: it loads ``<Dockerfile>.dockerignore`` when that
file exists next to the Dockerfile, else ``<root>/.dockerignore``, and computes content digests for cache keys
(:meth:`BuildContext.digest_of`, see :mod:`imgci.build.contexthash`).
"""

from __future__ import annotations

import collections
import errno
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Self

from imgci.build import treepath
from imgci.build.contexthash import ContentHasher
from imgci.build.dockerignore import Matcher, parse_dockerignore
from imgci.build.fs import EntryType, FileInfo
from imgci.errors import BuildError

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)  # traversal needs search permission only, like the kernel's lookup
_O_WALK = _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
_TYPES: dict[int, EntryType] = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
}
_MAX_IGNOREFILE = 4 << 20
_DIR_FDS = 128
_LISTINGS = 256  # directories whose entries' lstat results are kept from their listing
_LISTED_ENTRIES = 65536  # at most this many entries in them together (a bound on memory, ~10 MB)


class DirectoryFS:
    """A read-only, confined view of a host directory; see the module contract. ``close()`` releases the root fd."""

    def __init__(
        self,
        root: Path,
        *,
        ignore: Matcher | None = None,
        owner: tuple[int, int] | None = (0, 0),
        description: str = "",
        git_modes: bool = False,
        fixed_mtime: float | None = None,
    ) -> None:
        self.root = Path(root)
        try:
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise BuildError(f"cannot open {description or 'directory'} {self.root}: {e.strerror or e}") from None
        self.ignore = ignore if ignore else None
        self.owner = owner
        self.git_modes = git_modes
        self.fixed_mtime = fixed_mtime
        self._description = description or f"directory {self.root}"
        self._lock = threading.Lock()
        self._dirs: dict[str, str | None] = {}  # requested directory -> its resolved real path (None: missing)
        self._visible_dirs: dict[str, bool] = {}
        # O_PATH fds of directories walked to recently (real path -> fd): reading 4,000 files of 40 directories
        # then costs a dup each instead of a walk of open/close per path component.
        self._dir_fds: collections.OrderedDict[str, int] = collections.OrderedDict()
        # The lstat results of the entries of directories listed recently (real path -> name -> stat): a COPY of a
        # tree lists each directory, then lstats each entry — for its cache key, then again for its layer. The
        # listing's own stat answers those, instead of three system calls per entry each time.
        self._listed: collections.OrderedDict[str, dict[str, os.stat_result]] = collections.OrderedDict()
        self._listed_entries = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            fds, self._dir_fds = list(self._dir_fds.values()), collections.OrderedDict()
        for fd in fds:
            os.close(fd)
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- host access: real paths only (no symlink components), opened one component at a time ---------------------
    def _open_dir(self, real: str, *, readable: bool = False) -> int:
        """An fd of directory ``real``: ``O_PATH`` unless ``readable`` (for listing). A directory that cannot be
        entered or read is a BuildError; missing ones raise FileNotFoundError/NotADirectoryError."""
        if not real and not readable:
            return os.dup(self._root_fd)  # for the *at calls only: its offset, shared with the dup, is never used
        if real and not readable:
            with self._lock:
                cached = self._dir_fds.get(real)
                if cached is not None:
                    self._dir_fds.move_to_end(real)
                    return os.dup(cached)
            fd = self._walk(real, readable=False)
            with self._lock:
                if real not in self._dir_fds:
                    self._dir_fds[real] = os.dup(fd)
                    if len(self._dir_fds) > _DIR_FDS:
                        os.close(self._dir_fds.popitem(last=False)[1])
            return fd
        return self._walk(real, readable=readable)

    def _walk(self, real: str, *, readable: bool) -> int:
        comps = real.split("/") if real else []
        fd = os.open(".", _O_DIR if readable and not comps else _O_WALK, dir_fd=self._root_fd)
        try:
            for i, comp in enumerate(comps):
                flags = _O_DIR if readable and i == len(comps) - 1 else _O_WALK
                nfd = os.open(comp, flags, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except PermissionError as e:
            os.close(fd)
            raise BuildError(f"{self._description}: cannot read /{real}: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _raw_lstat(self, real: str) -> os.stat_result | None:
        parent, name = treepath.parent_and_name(real)
        with self._lock:
            listing = self._listed.get(parent)
            if listing is not None:
                return listing.get(name)  # not in its directory's listing: it did not exist then
        try:
            fd = self._open_dir(parent)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None  # the tree changed under us: a directory became a symlink
            raise
        try:
            return os.lstat(name, dir_fd=fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            os.close(fd)

    def _info(self, path: str, real: str, st: os.stat_result) -> FileInfo | None:
        kind = _TYPES.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            return None  # sockets
        mode = stat.S_IMODE(st.st_mode)
        linkname = ""
        if kind == "symlink":
            parent, name = treepath.parent_and_name(real)
            fd = self._open_dir(parent)
            try:
                linkname = os.readlink(name, dir_fd=fd)
            finally:
                os.close(fd)
        if self.git_modes:
            mode = {"dir": 0o755, "symlink": 0o777}.get(kind, 0o755 if mode & 0o111 else 0o644)
        uid, gid = self.owner if self.owner is not None else (st.st_uid, st.st_gid)
        is_dev = kind in ("char", "block")
        return FileInfo(
            path=path,
            type=kind,
            mode=mode,
            uid=uid,
            gid=gid,
            size=st.st_size if kind == "file" else 0,
            mtime=self.fixed_mtime if self.fixed_mtime is not None else st.st_mtime_ns / 1e9,
            linkname=linkname,
            devmajor=os.major(st.st_rdev) if is_dev else 0,
            devminor=os.minor(st.st_rdev) if is_dev else 0,
        )

    # -- ignore handling ---------------------------------------------------------------------------------------
    def is_ignored(self, path: str) -> bool:
        """Whether ``.dockerignore`` (the ``ignore`` matcher) excludes the real path ``path`` itself."""
        return self.ignore is not None and self.ignore.matches(treepath.clean(path))

    def _visible(self, real: str, st: os.stat_result) -> bool:
        if self.ignore is None or not self.ignore.matches(real):
            return True
        if not stat.S_ISDIR(st.st_mode) or self.ignore.can_skip_dir(real):
            return False
        with self._lock:
            cached = self._visible_dirs.get(real)
        if cached is None:
            cached = bool(self._visible_names(real))  # visible iff something inside is re-included
            with self._lock:
                self._visible_dirs[real] = cached
        return cached

    def _visible_names(self, real: str) -> list[str]:
        try:
            fd = self._open_dir(real, readable=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            if e.errno == errno.ELOOP:
                return []
            raise
        try:
            with os.scandir(fd) as it:
                entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
        finally:
            os.close(fd)
        self._remember_listing(real, dict(entries))
        names = []
        for name, st in entries:
            child = f"{real}/{name}" if real else name
            if stat.S_IFMT(st.st_mode) in _TYPES and self._visible(child, st):
                names.append(name)
        return sorted(names)

    def _remember_listing(self, real: str, stats: dict[str, os.stat_result]) -> None:
        with self._lock:
            old = self._listed.pop(real, None)
            self._listed_entries -= len(old) if old is not None else 0
            if len(stats) > _LISTED_ENTRIES:
                return
            self._listed[real] = stats
            self._listed_entries += len(stats)
            while len(self._listed) > _LISTINGS or self._listed_entries > _LISTED_ENTRIES:
                self._listed_entries -= len(self._listed.popitem(last=False)[1])

    def _lstat_real(self, real: str) -> FileInfo | None:
        st = self._raw_lstat(real)
        if st is None or not self._visible(real, st):
            return None
        return self._info(real, real, st)

    def _resolve_dir(self, path: str) -> str | None:
        """The real path of directory ``path`` (symlinks followed), or None if it is missing or not a directory."""
        with self._lock:
            if path in self._dirs:
                return self._dirs[path]
        real, exists = treepath.resolve(self._lstat_real, path)
        result = real if exists and (not real or (self._lstat_real(real) or _NOT_DIR).type == "dir") else None
        with self._lock:
            self._dirs[path] = result
        return result

    # -- SourceFS ----------------------------------------------------------------------------------------------
    def describe(self) -> str:
        return self._description

    def lstat(self, path: str) -> FileInfo | None:
        entry = self.host_entry(path)
        return entry[2] if entry is not None else None

    def resolve(self, path: str) -> str | None:
        real, exists = treepath.resolve(self._lstat_real, treepath.clean(path))
        return real if exists else None

    def listdir(self, path: str) -> list[str]:
        real = self._resolve_dir(treepath.clean(path))
        if real is None:
            raise BuildError(f"{self._description}: {path!r} is not a directory")
        return self._visible_names(real)

    def open(self, path: str) -> IO[bytes]:
        found = self._regular_file(path)
        if found is None:
            raise BuildError(f"{self._description}: {path!r} is not a regular file")
        return self.open_real(found[0])

    def _regular_file(self, path: str) -> tuple[str, os.stat_result] | None:
        """``(real path, lstat)`` of the regular file ``path`` names (symlinks followed), or None. A real path —
        what copy plans and layer entries hold — is stat'ed at once instead of resolved component by component."""
        clean = treepath.clean(path)
        st = self._raw_lstat(clean)
        if st is not None and stat.S_ISREG(st.st_mode) and self._visible(clean, st):
            return clean, st
        real = self.resolve(path)  # (a resolved path is visible: resolve checks every component)
        st = self._raw_lstat(real) if real is not None else None
        return (real, st) if real is not None and st is not None and stat.S_ISREG(st.st_mode) else None

    # -- extras ------------------------------------------------------------------------------------------------
    def host_entry(self, path: str) -> tuple[str, os.stat_result, FileInfo] | None:
        """``(real path, host lstat, FileInfo)`` of ``path`` itself (parents resolved), or None if missing/hidden."""
        path = treepath.clean(path)
        if not path:
            root = os.fstat(self._root_fd)
            info = self._info("", "", root)
            return ("", root, info) if info is not None else None
        parent, name = treepath.parent_and_name(path)
        real_parent = self._resolve_dir(parent)
        if real_parent is None:
            return None
        real = f"{real_parent}/{name}" if real_parent else name
        st = self._raw_lstat(real)
        if st is None or not self._visible(real, st):
            return None
        info = self._info(path, real, st)
        return (real, st, info) if info is not None else None

    def open_real(self, real: str) -> IO[bytes]:
        """The regular file at real path ``real`` (no symlink in it), opened without following any link."""
        parent, name = treepath.parent_and_name(real)
        fd = self._open_dir(parent)
        try:
            return os.fdopen(os.open(name, _O_FILE, dir_fd=fd), "rb")
        finally:
            os.close(fd)

    def inode_key(self, path: str) -> tuple[int, int] | None:
        """``(dev, ino)`` of a regular file with more than one link (for hardlink preservation), else None."""
        found = self._regular_file(path)
        if found is None or found[1].st_nlink < 2:
            return None
        return found[1].st_dev, found[1].st_ino


_NOT_DIR = FileInfo(path="", type="file", mode=0)


class BuildContext(DirectoryFS):
    """The build context directory; see the module contract.

    ``cache_dir`` keeps the persistent stat cache that lets :meth:`digest_of` skip re-reading unchanged files.
    """

    def __init__(self, root: Path, *, dockerfile: Path | None = None, cache_dir: Path | None = None) -> None:
        super().__init__(Path(root), description="build context")
        self.dockerignore_path: Path | None = None
        patterns = self._load_dockerignore(dockerfile)
        self.ignore = Matcher(patterns, source=self._ignore_name()) or None
        self.hasher = ContentHasher(self, cache_dir)

    def close(self) -> None:
        if self.hasher.cache is not None:
            self.hasher.cache.close()  # its write-ahead log goes into the file (imgci leaves through os._exit)
        super().close()

    def _ignore_name(self) -> str:
        return str(self.dockerignore_path) if self.dockerignore_path is not None else ".dockerignore"

    def _load_dockerignore(self, dockerfile: Path | None) -> list[str]:
        if dockerfile is not None:
            beside = Path(str(dockerfile) + ".dockerignore")
            if beside.is_file():
                self.dockerignore_path = beside
                try:
                    data = beside.read_bytes()[:_MAX_IGNOREFILE]
                except OSError as e:
                    raise BuildError(f"cannot read {beside}: {e.strerror or e}") from None
                return parse_dockerignore(data)
        real = self.resolve(".dockerignore")
        info = self.lstat(real) if real is not None else None
        if info is None or info.type != "file":
            return []  # BuildKit ignores a .dockerignore it cannot read
        self.dockerignore_path = self.root / ".dockerignore"
        with self.open(".dockerignore") as f:
            return parse_dockerignore(f.read(_MAX_IGNOREFILE))

    def digest_of(self, items: Iterable[str | FileInfo]) -> str:
        """``sha256:<hex>`` over exactly these entries: path, type, mode, content sha256 (files), link target
        (symlinks), device numbers; never mtimes or ownership. Order-independent; a missing path is an error."""
        return self.hasher.digest_of(items)

    def content_digests(self, paths: Iterable[str]) -> dict[str, str]:
        """``path -> sha256:<hex>`` of the content of regular files (stat-cached; for copy cache keys)."""
        return self.hasher.content_digests(paths)
