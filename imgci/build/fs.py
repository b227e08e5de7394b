"""The file-system currency of the build engine: read-only source trees and layer entries.

Contract:
- A :class:`SourceFS` is a read-only tree addressed by clean, relative POSIX paths ("" is its root). It never
  follows a symlink out of itself: ``resolve`` walks components inside the tree, so an absolute symlink target
  means the tree's own root (a build context is confined the same way, like a chroot). Implementations: the build
  context (``imgci.build.context``), an image/stage root file system (``imgci.build.layerstore.UnionView``).
- A :class:`FileInfo` carries the metadata a layer needs, independent of who owns the files on the host disk (an
  unprivileged build cannot chown, so ownership travels as data, never through the host file system).
- A :class:`LayerEntry` is one entry of a layer to write: metadata plus where its content comes from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Protocol

EntryType = Literal["file", "dir", "symlink", "hardlink", "char", "block", "fifo"]


@dataclass(frozen=True)
class FileInfo:
    """Metadata of one entry in a SourceFS or layer. ``path`` is relative, without leading ``/`` or ``./``."""

    path: str
    type: EntryType
    mode: int  # permission bits incl. setuid/setgid/sticky (no file-type bits)
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: float = 0.0
    linkname: str = ""  # symlink target, or hardlink target path (relative to the root)
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


class SourceFS(Protocol):
    """A read-only tree COPY/ADD can read from (build context, another stage, an image)."""

    def describe(self) -> str:
        """For messages: ``build context``, ``stage "builder"``, ``image docker.io/library/alpine:3``."""
        ...

    def lstat(self, path: str) -> FileInfo | None:
        """The entry at ``path`` itself (a symlink is not followed), or None if it does not exist (or is hidden)."""
        ...

    def resolve(self, path: str) -> str | None:
        """``path`` with every symlink followed inside the tree (absolute targets = the tree's root; ``..``
        stops at the root), or None if a component does not exist. Loops raise UnsafeArchiveError-free
        ``ImgciError``."""
        ...

    def listdir(self, path: str) -> list[str]:
        """Names in directory ``path`` (which must not be a symlink), sorted; hidden/ignored entries left out."""
        ...

    def open(self, path: str) -> IO[bytes]:
        """The content of regular file ``path``."""
        ...


@dataclass(frozen=True)
class LayerEntry:
    """One entry of a layer being written. Exactly one content source for regular files:
    ``source_fs`` + ``source_path`` (read at write time), ``host_path`` (a file on disk), or ``data``."""

    info: FileInfo
    source_fs: SourceFS | None = None
    source_path: str = ""
    host_path: str | Path | None = None
    data: bytes | None = None
    whiteout: bool = False  # info.path is deleted (written as .wh.NAME)
    opaque: bool = False  # info.path (a dir) hides everything below it in lower layers (.wh..wh..opq)

    def open(self) -> IO[bytes]:
        import io

        if self.data is not None:
            return io.BytesIO(self.data)
        if self.host_path is not None:
            return open(self.host_path, "rb")
        if self.source_fs is not None:
            return self.source_fs.open(self.source_path or self.info.path)
        return io.BytesIO(b"")


def walk(fs: SourceFS, top: str = "") -> Iterator[FileInfo]:
    """Every entry below ``top`` (not ``top`` itself), parents before children, names sorted; symlinks not
    followed."""
    stack = [top]
    while stack:
        d = stack.pop()
        names = fs.listdir(d)
        children = []
        for name in names:
            p = f"{d}/{name}" if d else name
            info = fs.lstat(p)
            if info is None:
                continue
            children.append(info)
        for info in children:
            yield info
        stack.extend(reversed([c.path for c in children if c.type == "dir"]))
