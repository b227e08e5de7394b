"""MemFS: a small in-memory SourceFS for tests (a dict of FileInfo + bytes).

Parents are created on demand (0755 directories); symlinks resolve inside the tree with chroot semantics, exactly as
a real SourceFS must. ``opened`` counts ``open()`` calls per path, to assert what a consumer read.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import IO

from imgci.build import treepath
from imgci.build.fs import EntryType, FileInfo

MTIME = 1_700_000_000.0


class MemFS:
    """An in-memory tree; see the module docstring."""

    def __init__(self, description: str = "memfs") -> None:
        self.description = description
        self.infos: dict[str, FileInfo] = {"": FileInfo(path="", type="dir", mode=0o755, mtime=MTIME)}
        self.data: dict[str, bytes] = {}
        self.opened: Counter[str] = Counter()

    # -- building ----------------------------------------------------------------------------------------------
    def _parents(self, path: str) -> None:
        parent = treepath.parent_and_name(path)[0]
        if parent and parent not in self.infos:
            self.add_dir(parent)

    def _add(self, path: str, kind: EntryType, mode: int, **kw: object) -> MemFS:
        path = treepath.clean(path)
        self._parents(path)
        kw.setdefault("mtime", MTIME)
        self.infos[path] = FileInfo(path=path, type=kind, mode=mode, **kw)  # type: ignore[arg-type]
        return self

    def add_dir(self, path: str, mode: int = 0o755, **kw: object) -> MemFS:
        return self._add(path, "dir", mode, **kw)

    def add_file(self, path: str, data: bytes | str = b"", mode: int = 0o644, **kw: object) -> MemFS:
        raw = data.encode() if isinstance(data, str) else data
        self._add(path, "file", mode, size=len(raw), **kw)
        self.data[treepath.clean(path)] = raw
        return self

    def add_symlink(self, path: str, target: str, **kw: object) -> MemFS:
        return self._add(path, "symlink", 0o777, linkname=target, **kw)

    def add_hardlink(self, path: str, target: str, **kw: object) -> MemFS:
        self.data[treepath.clean(path)] = self.data[treepath.clean(target)]
        return self._add(path, "hardlink", self.infos[treepath.clean(target)].mode, linkname=target, **kw)

    # -- SourceFS ----------------------------------------------------------------------------------------------
    def describe(self) -> str:
        return self.description

    def lstat(self, path: str) -> FileInfo | None:
        path = treepath.clean(path)
        parent, name = treepath.parent_and_name(path)
        if path and parent:
            real_parent, ok = treepath.resolve(self._raw, parent)
            if not ok:
                return None
            info = self.infos.get(f"{real_parent}/{name}" if real_parent else name)
        else:
            info = self.infos.get(path)
        return None if info is None else FileInfo(**{**info.__dict__, "path": path})

    def _raw(self, path: str) -> FileInfo | None:
        return self.infos.get(path)

    def resolve(self, path: str) -> str | None:
        real, ok = treepath.resolve(self._raw, path)
        return real if ok else None

    def listdir(self, path: str) -> list[str]:
        real = self.resolve(path)
        prefix = f"{real}/" if real else ""
        return sorted(
            p[len(prefix) :] for p in self.infos if p and p.startswith(prefix) and "/" not in p[len(prefix) :]
        )

    def open(self, path: str) -> IO[bytes]:
        real = self.resolve(path)
        if real is None or real not in self.data:
            raise FileNotFoundError(path)
        self.opened[real] += 1
        return io.BytesIO(self.data[real])
