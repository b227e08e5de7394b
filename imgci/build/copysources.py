"""The sources of one COPY/ADD, expanded into the top-level items the copy planner copies.

Contract of :func:`expand_sources`:
- A string source is a path in ``src_fs``: cleaned (``/`` and ``./`` prefixes are the tree's root), refused when a
  relative path climbs above the root. Its components up to the first one with a wildcard are resolved
  (symlinks followed inside the tree); the rest is matched with Go's ``filepath.Match`` against paths below that
  directory, walked in name order without following symlinks, a matching directory ending the descent (fsutil's
  ``ResolveWildcards``). Each match, or the plain path, is then followed if it is a symlink.
- A plain path that does not exist, or a wildcard whose directory does not exist, raises :class:`BuildError`
  naming the source (with a hint when ``.dockerignore`` hides it); a wildcard that matches nothing yields nothing.
- With ``--parents`` a source ``a/./b/c`` copies directory ``a`` (or the root without ``/./``) with ``b/c`` as an
  include pattern; when neither part has wildcards that path must exist.
- ``--exclude`` drops wildcard matches whose path relative to the wildcard's directory it excludes.
- An :class:`Inline` (heredoc) becomes a :class:`MemoryFile` tree holding one 0644 file.

:func:`digest_items` is the source side of a COPY's cache key (BuildKit's contenthash): ``sha256:<hex>`` over the
items in order — name, unpack flag, include pattern — and every entry a copy of them would read (relative path,
type, mode, uid/gid, link target, device numbers, content digest; --exclude and --parents applied), never mtimes
and never anything about the destination. File contents come from the tree's own ``digest_of`` when it has one
(the build context's stat cache), else they are read and hashed.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from imgci.build import treepath
from imgci.build.dockerignore import BadPatternError, Matcher, go_match, has_wildcards
from imgci.build.fs import FileInfo, SourceFS
from imgci.errors import BuildError

if TYPE_CHECKING:
    from imgci.build.copyplan import CopyOptions, Source


@dataclass(frozen=True)
class Item:
    """One top-level thing to copy: ``real`` is its resolved path in ``fs``, ``info`` its (followed) entry."""

    fs: SourceFS
    real: str
    info: FileInfo
    name: str  # the name it gets inside a destination directory
    unpack: bool = False
    include: Matcher | None = None  # --parents: only what matches is copied


class MemoryFile:
    """A SourceFS holding a single regular file at ``name`` (heredoc sources)."""

    def __init__(self, name: str, data: bytes, *, mtime: float, mode: int = 0o644) -> None:
        self.name = name
        self.data = data
        self.info = FileInfo(path=name, type="file", mode=mode, size=len(data), mtime=mtime)

    def describe(self) -> str:
        return f"inline document {self.name}"

    def lstat(self, path: str) -> FileInfo | None:
        path = treepath.clean(path)
        if not path:
            return FileInfo(path="", type="dir", mode=0o755, mtime=self.info.mtime)
        return self.info if path == self.name else None

    def resolve(self, path: str) -> str | None:
        path = treepath.clean(path)
        return path if self.lstat(path) is not None else None

    def listdir(self, path: str) -> list[str]:
        return [self.name] if not treepath.clean(path) else []

    def open(self, path: str) -> IO[bytes]:
        if treepath.clean(path) != self.name:
            raise BuildError(f"{self.describe()}: no file {path!r}")
        return io.BytesIO(self.data)


def _not_found(fs: SourceFS, source: str, instruction: str) -> BuildError:
    message = f'{instruction} failed: "{source}": not found in {fs.describe()}'
    hidden = getattr(fs, "is_ignored", None)
    path = treepath.clean(source)
    if callable(hidden) and any(hidden("/".join(path.split("/")[: i + 1])) for i in range(path.count("/") + 1)):
        return BuildError(message, hint=f"{source} is excluded by .dockerignore")
    return BuildError(message)


def _follow(fs: SourceFS, path: str) -> tuple[str, FileInfo] | None:
    real = fs.resolve(path)
    info = fs.lstat(real) if real is not None else None
    return (real, info) if real is not None and info is not None else None


def _wildcard_matches(fs: SourceFS, base: str, pattern: str) -> list[str]:
    """Paths below directory ``base`` (relative to it) matching ``pattern``, in walk order."""
    depth = pattern.count("/") + 1 + pattern.count("[")
    out: list[str] = []
    stack = [("", 0)]
    while stack:
        rel, level = stack.pop()
        names = fs.listdir(treepath.join(base, rel))
        descend = []
        for name in names:
            child = f"{rel}/{name}" if rel else name
            info = fs.lstat(treepath.join(base, child))
            if info is None:
                continue
            try:
                matched = go_match(pattern, child)
            except BadPatternError:
                raise BuildError(f"invalid wildcard {pattern!r}: syntax error in pattern") from None
            if matched:
                out.append(child)
            elif info.type == "dir" and level + 1 < depth:
                descend.append((child, level + 1))
        stack.extend(reversed(descend))
    return out


def _local(
    fs: SourceFS, source: str, unpack: bool, excludes: Matcher | None, instruction: str, parents: bool
) -> list[Item]:
    if not source.startswith("/") and treepath.escapes(source):
        raise BuildError(f'{instruction} failed: "{source}": forbidden path outside the {fs.describe()}')
    if parents:
        return _parents(fs, source, excludes, instruction)
    path = treepath.clean(source)
    parts = path.split("/") if path else []
    first = next((i for i, part in enumerate(parts) if has_wildcards(part)), None)
    if first is None:
        found = _follow(fs, path)
        if found is None:
            raise _not_found(fs, source, instruction)
        name = parts[-1] if parts else "/"
        return [Item(fs, found[0], found[1], name, unpack)]
    base_found = _follow(fs, "/".join(parts[:first]))
    if base_found is None or base_found[1].type != "dir":
        raise _not_found(fs, source, instruction)
    base = base_found[0]
    items = []
    for rel in _wildcard_matches(fs, base, "/".join(parts[first:])):
        if excludes is not None and excludes.matches(rel):
            continue
        found = _follow(fs, treepath.join(base, rel))
        if found is not None:  # a dangling symlink matched by a wildcard copies nothing
            items.append(Item(fs, found[0], found[1], rel.rsplit("/", 1)[-1], unpack))
    return items


def _parents(fs: SourceFS, source: str, excludes: Matcher | None, instruction: str) -> list[Item]:
    pivot, sep, pattern = source.partition("/./")
    if not sep:
        pivot, pattern = "/", source
    pattern = treepath.clean(pattern)
    pivots = _local(fs, pivot, False, None, instruction, False) if treepath.clean(pivot) else None
    if pivots is None:
        root = fs.lstat("")
        assert root is not None
        pivots = [Item(fs, "", root, "/")]
    literal = not has_wildcards(pivot) and not has_wildcards(pattern)
    if literal and (not pivots or _follow(fs, treepath.join(pivots[0].real, pattern)) is None):
        raise _not_found(fs, source, instruction)
    include = Matcher([pattern], source="--parents") if pattern else None
    return [Item(p.fs, p.real, p.info, p.name, False, include if p.info.type == "dir" else None) for p in pivots]


def expand_sources(
    sources: Sequence[Source], src_fs: SourceFS | None, options: CopyOptions, excludes: Matcher | None, now: float
) -> list[Item]:
    """The top-level items of ``sources``, in order; see the module contract."""
    from imgci.build.copyplan import FromFS, Inline

    instruction = options.instruction
    items: list[Item] = []
    for source in sources:
        if isinstance(source, Inline):
            mtime = options.timestamp if options.timestamp is not None else now
            memory = MemoryFile(source.name, source.data, mtime=mtime)
            items.append(Item(memory, source.name, memory.info, source.name))
        elif isinstance(source, FromFS):
            items.extend(_local(source.fs, source.path, source.unpack, excludes, instruction, options.parents))
        else:
            if src_fs is None:
                raise BuildError(f"{instruction}: no source tree to read {source!r} from")
            items.extend(_local(src_fs, source, options.unpack, excludes, instruction, options.parents))
    return items


def _contents(fs: SourceFS, reals: list[str]) -> dict[str, str]:
    """``real -> sha256:<hex>`` of regular files, through the tree's own (stat-cached) ``content_digests`` if any."""
    bulk = getattr(fs, "content_digests", None)
    if callable(bulk):
        return dict(bulk(reals))
    if isinstance(fs, MemoryFile):
        return {real: "sha256:" + hashlib.sha256(fs.data).hexdigest() for real in reals}
    return {real: _content(fs, real) for real in reals}


def _content(fs: SourceFS, real: str) -> str:
    h = hashlib.sha256()
    with fs.open(real) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _tree(item: Item, excludes: Matcher | None) -> Iterator[tuple[str, FileInfo, str]]:
    """``(relative path, info, real path)`` of what a copy of directory ``item`` reads, in walk order."""
    include = item.include
    stack = [(item.real, "")]
    while stack:
        real_dir, rel_dir = stack.pop()
        subdirs = []
        for name in item.fs.listdir(real_dir):
            real = f"{real_dir}/{name}" if real_dir else name
            info = item.fs.lstat(real)
            if info is None:
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            excluded = excludes is not None and excludes.matches(rel)
            included = not excluded and (include is None or include.matches(rel))
            if included:
                yield rel, info, real
            if info.type == "dir":
                if excluded and excludes is not None and excludes.can_skip_dir(rel):
                    continue
                if include is not None and not included and not include.may_include_below(rel):
                    continue
                subdirs.append((real, rel))
        stack.extend(reversed(subdirs))


def digest_items(items: Sequence[Item], excludes: Matcher | None, files: dict[str, str] | None = None) -> str:
    """The content digest of ``items`` for a cache key; see the module contract. ``files`` (when given) receives a
    short digest of every entry read, by path, to explain a later change."""
    h = hashlib.sha256()

    def record(*fields: object) -> None:
        h.update("\0".join(str(f) for f in fields).encode("utf-8", "surrogateescape") + b"\n")

    for index, item in enumerate(items):
        include = ",".join(p.text for p in item.include.patterns) if item.include is not None else ""
        record("I", index, item.name, int(item.unpack), include)
        read = [("", item.info, item.real)]
        if item.info.type == "dir":
            read.extend(_tree(item, excludes))
        contents = _contents(item.fs, [real for _, info, real in read if info.type in ("file", "hardlink")])
        for rel, info, real in read:
            token = contents.get(real, "") if info.type in ("file", "hardlink") else info.linkname
            dev = f"{info.devmajor},{info.devminor}" if info.type in ("char", "block") else ""
            record("E", rel, info.type, f"{info.mode:o}", info.uid, info.gid, dev, token)
            if files is not None:
                entry = f"{info.type}\0{info.mode:o}\0{info.uid}\0{info.gid}\0{dev}\0{token}"
                name = f"{item.name.rstrip('/')}/{rel}" if rel else item.name
                files[name] = hashlib.sha256(entry.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return "sha256:" + h.hexdigest()
