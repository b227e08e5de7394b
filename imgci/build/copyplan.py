"""COPY/ADD semantics: which layer entries a COPY or ADD produces, given its sources and the destination tree.

:func:`plan_copy` answers with BuildKit's rules (dockerfile2llb + the file op + fsutil's copier), read off their
sources. It plans, it does not write: the result is a list of :class:`LayerEntry` (sorted by path components,
parents first) that the layer writer turns into a tar. Rules:

- **Destination**: a relative ``dest`` is relative to ``workdir``; ``dest`` ending in ``/`` (or ``.``) is a directory.
  Missing parents (and a ``/``-ending dest) are created 0755 (``--chmod`` applied on top, as BuildKit >= 0.21),
  owned by ``--chown`` or root, with mtime ``timestamp`` or now. ``dest`` is resolved through symlinks of the
  destination tree like a chroot (``COPY x /usr/local/bin/`` writes through a ``bin -> /opt/bin`` link), entries
  below it are not. Existing parents are included with their metadata from ``dest_fs``. With ``link``
  (``--link``) ``dest_fs`` is not consulted at all: the copy lands on an empty tree.
- **Sources** (strings, resolved in ``src_fs``): absolute paths are inside the source tree, a relative path that
  climbs above it is an error. The named path itself is followed if it is a symlink; below it nothing is followed
  (symlinks are copied as symlinks). A directory copies its *contents*. Wildcards (Go ``filepath.Match`` per
  component) expand in walk order; a wildcard matching nothing copies nothing (BuildKit allows empty wildcards),
  a missing plain path or wildcard directory is an error naming it. A single file goes to ``dest``, or into it
  when ``dest`` is an existing directory. Several items into a ``dest`` that is not a directory are an error
  (the Dockerfile reference's rule; BuildKit would silently keep the last one), except that a directory item
  first makes ``dest`` a directory, as it does in BuildKit.
- **Metadata**: ownership is ``chown`` when given, else the source's (context files are root-owned; ``--from``
  keeps the stage's owners); modes are the source's unless ``chmod`` (symlinks never); mtimes are the source's
  unless ``timestamp`` (SOURCE_DATE_EPOCH, BuildKit's ``WithCreatedTime``). Hardlinks within one copy stay
  hardlinks when the source knows inodes (``inode_key``). A directory copied over an existing one merges into it:
  the top directory keeps its metadata (its mtime becomes the source's), nested ones take the source's. A file
  over a directory, or a directory over a non-directory, is an error.
- **--exclude** patterns (.dockerignore syntax) match paths relative to each copied directory, and a wildcard's
  matches relative to the wildcard's directory. **--parents** keeps source paths below the context root, or below
  a ``/./`` pivot, copying what the rest of the path (a pattern, ``**`` allowed) matches.
- **ADD**: a source with ``unpack`` that is a tar archive (any compression, judged by content) is extracted into
  ``dest`` (see :mod:`imgci.build.archiveplan`); downloads and git checkouts come in as :class:`FromFS` sources.
  Heredocs (:class:`Inline`) are 0644 files named after the heredoc, root-owned, mtime now.
- Entries named ``.wh.*`` cannot be represented in a layer and are refused.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from imgci.build import treepath
from imgci.build.copyperms import Chmod, created_dir_mode, parse_chmod
from imgci.build.copysources import Item, MemoryFile, digest_items, expand_sources
from imgci.build.dockerignore import Matcher
from imgci.build.fs import FileInfo, LayerEntry, SourceFS
from imgci.errors import BuildError


@dataclass(frozen=True)
class Inline:
    """A heredoc source (``COPY <<EOF /dest``): a file ``name`` with ``data``."""

    name: str
    data: bytes


@dataclass(frozen=True)
class FromFS:
    """Source ``path`` (wildcards allowed) in a specific tree, e.g. a download or a git checkout."""

    fs: SourceFS
    path: str
    unpack: bool = False


Source = str | Inline | FromFS


@dataclass(frozen=True)
class CopyOptions:
    """The flags of one COPY/ADD. ``chown`` is numeric: resolve names first with ``copyperms.resolve_chown``."""

    chown: tuple[int, int] | None = None
    chmod: str | None = None
    excludes: tuple[str, ...] = ()
    parents: bool = False
    link: bool = False
    unpack: bool = False  # ADD: extract archives among the string sources
    timestamp: float | None = None
    now: float | None = None
    instruction: str = "COPY"


def _archiveplan() -> Any:
    """:mod:`imgci.build.archiveplan`, imported by the first ADD of an archive (with the decompressors it needs)."""
    from imgci.build import archiveplan

    return archiveplan


@runtime_checkable
class InodeAware(Protocol):
    """A SourceFS that can tell hardlinked files apart (``DirectoryFS`` can)."""

    def inode_key(self, path: str) -> tuple[int, int] | None: ...


@dataclass
class _Pending:
    """A directory whose creation waits for something inside it to be included (excludes, --parents)."""

    info: FileInfo
    target: str
    done: bool = False


@dataclass
class _Planner:
    dest_fs: SourceFS | None
    options: CopyOptions
    scratch: Path | None
    now: float
    chmod: Chmod | None = None
    excludes: Matcher | None = None
    entries: dict[str, LayerEntry] = field(default_factory=dict)
    links: dict[tuple[int, int, int], str] = field(default_factory=dict)  # (fs, dev, inode) -> first target
    copied: dict[tuple[int, str], str] = field(default_factory=dict)  # (fs, source path) -> target, for hardlinks

    # -- the destination tree as planned so far --------------------------------------------------------------
    def lookup(self, path: str) -> FileInfo | None:
        entry = self.entries.get(path)
        if entry is not None:
            return entry.info
        parts = path.split("/")
        for i in range(1, len(parts)):
            above = self.entries.get("/".join(parts[:i]))
            if above is not None and above.info.type != "dir":
                return None
        if self.dest_fs is None or not path:
            return FileInfo(path="", type="dir", mode=0o755) if not path else None
        return self.dest_fs.lstat(path)

    def resolve_parents(self, path: str, *, follow_last: bool) -> str:
        return treepath.resolve(self.lookup, path, follow_last=follow_last)[0]

    def ensure_dir(self, path: str, *, owner: tuple[int, int] | None = None, mode: int | None = None) -> None:
        """MkdirAll: create the missing directories of resolved ``path``."""
        parts = path.split("/") if path else []
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            info = self.lookup(sub)
            if info is None:
                uid, gid = owner or self.options.chown or (0, 0)
                created = FileInfo(
                    path=sub,
                    type="dir",
                    mode=created_dir_mode(self.chmod) if mode is None else mode,
                    uid=uid,
                    gid=gid,
                    mtime=self.options.timestamp if self.options.timestamp is not None else self.now,
                )
                self.entries[sub] = LayerEntry(created)
            elif info.type != "dir":
                raise BuildError(f"cannot create directory /{sub}: /{sub} exists and is not a directory")

    def put(self, entry: LayerEntry) -> None:
        path = entry.info.path
        if treepath.parent_and_name(path)[1].startswith(".wh."):
            raise BuildError(f"/{path}: names starting with .wh. cannot be stored in an image layer")
        old = self.entries.get(path)
        if old is not None and old.info.type == "dir" and entry.info.type != "dir":
            prefix = path + "/"  # a planned directory replaced by a non-directory (ADD of archives) loses its contents
            for below in [p for p in self.entries if p.startswith(prefix)]:
                del self.entries[below]
        self.entries[path] = entry

    # -- metadata ----------------------------------------------------------------------------------------------
    def _meta(self, src: FileInfo, target: str) -> FileInfo:
        uid, gid = self.options.chown if self.options.chown is not None else (src.uid, src.gid)
        mode = src.mode
        if self.chmod is not None and src.type != "symlink":
            mode = self.chmod.apply(mode, src.type == "dir")
        mtime = self.options.timestamp if self.options.timestamp is not None else src.mtime
        s = src  # all fields by position: twice as fast as dataclasses.replace, once per copied file
        return FileInfo(target, s.type, mode, uid, gid, s.size, mtime, s.linkname, s.devmajor, s.devminor, s.xattrs)

    # -- copying one node --------------------------------------------------------------------------------------
    def _flush(self, pending: list[_Pending]) -> None:
        for dirp in pending:
            if not dirp.done:
                self._put_dir(dirp.info, dirp.target)
                dirp.done = True

    def _put_dir(self, src: FileInfo, target: str) -> None:
        existing = self.lookup(target)
        if existing is not None and existing.type != "dir":
            raise BuildError(f"cannot copy to non-directory: /{target}")
        self.put(LayerEntry(self._meta(src, target)))

    def copy_node(self, fs: SourceFS, src: FileInfo, real: str, target: str, pending: list[_Pending]) -> None:
        """Copy entry ``src`` (at real path ``real`` of ``fs``) to ``target``, below the top of the copy."""
        self._flush(pending)
        existing = self.lookup(target)
        if src.type == "dir":
            self._put_dir(src, target)
            return
        if existing is not None and existing.type == "dir":
            raise BuildError(f"cannot replace to directory /{target} with file")
        meta = self._meta(src, target)
        if src.type == "file":
            inode_key = getattr(fs, "inode_key", None)  # InodeAware (a Protocol isinstance costs ~10 µs a file)
            key = inode_key(real) if inode_key is not None else None
            first = self.links.get((id(fs), *key)) if key is not None else None
            if first is not None and first in self.entries:
                self.put(LayerEntry(replace(meta, type="hardlink", linkname=first, size=0)))
                return
            if key is not None:
                self.links[(id(fs), *key)] = target
            self.copied[(id(fs), real)] = target
            if isinstance(fs, MemoryFile):
                self.put(LayerEntry(meta, data=fs.data))
            else:
                self.put(LayerEntry(meta, source_fs=fs, source_path=real))
        elif src.type == "hardlink":  # a tree that reports hardlinks (an image): keep the link if its target came too
            linked = self.copied.get((id(fs), treepath.clean(src.linkname)))
            if linked is not None and linked in self.entries and self.entries[linked].info.type == "file":
                self.put(LayerEntry(replace(meta, linkname=linked, size=0)))
            else:
                self.copied[(id(fs), real)] = target
                self.put(LayerEntry(replace(meta, type="file", linkname=""), source_fs=fs, source_path=real))
        else:
            self.put(LayerEntry(meta))

    def copy_tree(self, item: Item, top: str, include: Matcher | None) -> None:
        """Copy the contents of directory ``item`` into ``top`` (which exists), honouring include/exclude."""
        stack: list[tuple[str, str, list[_Pending]]] = [(item.real, "", [])]
        while stack:
            real_dir, rel_dir, pending = stack.pop()
            children = []
            for name in item.fs.listdir(real_dir):
                real = f"{real_dir}/{name}" if real_dir else name
                info = item.fs.lstat(real)
                if info is not None:
                    children.append((name, real, info))
            subdirs = []
            for name, real, info in children:
                rel = f"{rel_dir}/{name}" if rel_dir else name
                target = treepath.join(top, rel)
                excluded = self.excludes is not None and self.excludes.matches(rel)
                included = not excluded and (include is None or include.matches(rel))
                if info.type == "dir":
                    if excluded and self.excludes is not None and self.excludes.can_skip_dir(rel):
                        continue
                    if include is not None and not included and not include.may_include_below(rel):
                        continue
                    node = _Pending(info, target)
                    if included:
                        self.copy_node(item.fs, info, real, target, pending)
                        node.done = True
                    subdirs.append((real, rel, [*pending, node]))
                elif included:
                    self.copy_node(item.fs, info, real, target, pending)
            stack.extend(reversed(subdirs))

    # -- one top-level item ------------------------------------------------------------------------------------
    def copy_item(self, item: Item, dest: str, dest_is_dir: bool, many: bool) -> None:
        info = item.info
        if item.unpack and info.type == "file" and _archiveplan().is_archive(item.fs, item.real):
            if self.scratch is None:
                raise BuildError("ADD of an archive needs a scratch directory to unpack into")
            where = self.resolve_parents(dest, follow_last=True)
            self.ensure_dir(where)
            _archiveplan().extract(item.fs, item.real, where, self, scratch=self.scratch, owner=self.options.chown)
            return
        target = self.resolve_parents(dest, follow_last=True)
        existing = self.lookup(target)
        if info.type == "dir":
            if existing is not None and existing.type != "dir":
                raise BuildError(f"cannot copy to non-directory: /{target}")
            if target:
                if existing is None:
                    self.ensure_dir(target)
                    existing = self.lookup(target)
                assert existing is not None
                mtime = self.options.timestamp if self.options.timestamp is not None else info.mtime
                self.put(LayerEntry(replace(existing, path=target, mtime=mtime)))
            self.copy_tree(item, target, item.include)
            return
        if existing is not None and existing.type == "dir":
            target = treepath.join(target, item.name)
        elif many and not dest_is_dir:
            instruction = self.options.instruction
            raise BuildError(
                f"When using {instruction} with more than one source file, the destination must be a directory"
                " and end with a /"
            )
        self.ensure_dir(treepath.parent_and_name(target)[0])
        self.copy_node(item.fs, info, item.real, target, [])

    # -- the layer ---------------------------------------------------------------------------------------------
    def result(self) -> list[LayerEntry]:
        out = dict(self.entries)
        for path in list(out):
            parts = path.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent in out:
                    continue
                info = self.dest_fs.lstat(parent) if self.dest_fs is not None else None
                if info is None or info.type != "dir":
                    info = FileInfo(path=parent, type="dir", mode=0o755, mtime=self.now)
                out[parent] = LayerEntry(replace(info, path=parent))
        return [out[p] for p in sorted(out, key=lambda p: p.split("/"))]


def normalize_dest(dest: str, workdir: str) -> tuple[str, bool]:
    """``(tree path, is a directory by syntax)`` of a COPY destination, as dockerfile2llb computes it."""
    if dest in ("", "."):
        dest = "./"
    is_dir = dest.endswith("/") or dest.endswith("/.")
    full = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
    return treepath.clean(full), is_dir


def plan_copy(
    sources: Sequence[Source],
    dest: str,
    *,
    src_fs: SourceFS | None = None,
    dest_fs: SourceFS | None,
    workdir: str = "/",
    options: CopyOptions | None = None,
    scratch: Path | None = None,
) -> list[LayerEntry]:
    """The layer entries of ``COPY/ADD sources dest``; see the module contract.

    String sources are read from ``src_fs`` (the build context, a stage's UnionView, ...); :class:`FromFS` and
    :class:`Inline` sources bring their own. ``scratch`` is a directory for unpacked archive contents (ADD).
    """
    options = options or CopyOptions()
    planner = _Planner(
        dest_fs=None if options.link else dest_fs,
        options=options,
        scratch=scratch,
        now=options.now if options.now is not None else time.time(),
        chmod=parse_chmod(options.chmod) if options.chmod is not None else None,
        excludes=Matcher(options.excludes, source="--exclude") or None if options.excludes else None,
    )
    target, dest_is_dir = normalize_dest(dest, workdir)
    items = expand_sources(sources, src_fs, options, planner.excludes, planner.now)
    if not items:
        return []
    if dest_is_dir:
        planner.ensure_dir(planner.resolve_parents(target, follow_last=True))
    else:
        parent = treepath.parent_and_name(target)[0]
        planner.ensure_dir(planner.resolve_parents(parent, follow_last=True))
    many = len(items) > 1
    for item in items:
        planner.copy_item(item, target, dest_is_dir, many)
    return planner.result()


def source_digest(
    sources: Sequence[Source],
    *,
    src_fs: SourceFS | None = None,
    options: CopyOptions | None = None,
    files: dict[str, str] | None = None,
) -> str:
    """The source side of a COPY/ADD cache key: ``sha256:<hex>`` of everything the copy reads (see
    ``copysources.digest_items``), independent of the destination. Missing sources raise as in :func:`plan_copy`.
    Flags (``--chown``, ``--chmod``, dest...) are not covered: they belong to the instruction text in the key.
    ``files`` receives a short digest per entry read (see ``digest_items``)."""
    options = options or CopyOptions()
    excludes = Matcher(options.excludes, source="--exclude") or None if options.excludes else None
    now = options.now if options.now is not None else 0.0  # heredoc mtimes are not part of the digest
    return digest_items(expand_sources(sources, src_fs, options, excludes, now), excludes, files)
