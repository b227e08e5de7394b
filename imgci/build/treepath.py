"""Paths inside a tree: lexical cleaning and symlink resolution confined to the tree (chroot semantics).

Contract:
- :func:`clean` makes a tree path: relative, ``/``-separated, no ``.``/empty components, ``..`` resolved lexically and
  clamped at the root (``/etc/../../x`` is ``x``), ``""`` for the root — as Go's ``path.Clean("/" + p)`` does.
- :func:`escapes` says whether a *relative* path climbs above its starting point (``../x``, ``a/../../x``).
- :func:`resolve` follows symlinks one component at a time using only the ``lstat`` it is given, the way
  containerd's ``fs.RootPath`` does inside a snapshot: an absolute target restarts at the tree's root, ``..`` stops at
  the root, so nothing ever resolves outside the tree. It resolves as far as entries exist and appends the missing
  rest lexically, returning ``(path, exists)``; a non-directory in the middle makes the path non-existent. More
  than 255 links raise :class:`BuildError`.
"""

from __future__ import annotations

from collections.abc import Callable

from imgci.build.fs import FileInfo
from imgci.errors import BuildError

MAX_LINKS = 255

Lstat = Callable[[str], FileInfo | None]


def _components(path: str) -> list[str]:
    out: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out:
                out.pop()
            continue
        out.append(part)
    return out


def clean(path: str) -> str:
    """``path`` as a clean tree path (see the module contract)."""
    return "/".join(_components(path))


def escapes(path: str) -> bool:
    """Whether relative ``path`` leads above its starting directory."""
    depth = 0
    for part in path.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def join(*parts: str) -> str:
    """Tree paths joined and cleaned."""
    return clean("/".join(p for p in parts if p))


def parent_and_name(path: str) -> tuple[str, str]:
    """``("a/b", "c")`` for ``a/b/c``; ``("", "c")`` for ``c``."""
    parent, _, name = path.rpartition("/")
    return parent, name


def resolve(lstat: Lstat, path: str, *, follow_last: bool = True) -> tuple[str, bool]:
    """``(resolved path, exists)`` for ``path`` in the tree whose entries ``lstat`` returns; see the contract."""
    todo = list(reversed(_components(path)))
    done: list[str] = []
    links = 0
    while todo:
        comp = todo.pop()
        if comp in ("", "."):
            continue
        if comp == "..":
            if done:
                done.pop()
            continue
        candidate = "/".join([*done, comp])
        info = lstat(candidate)
        if info is None:
            rest = [comp, *reversed(todo)]
            return clean("/".join([*done, *rest])), False
        if info.type == "symlink" and (todo or follow_last):
            links += 1
            if links > MAX_LINKS:
                raise BuildError(f"{path!r}: too many levels of symbolic links")
            if info.linkname.startswith("/"):
                done.clear()
            todo.extend(reversed(info.linkname.split("/")))
            continue
        if todo and info.type != "dir":
            return clean("/".join([*done, comp, *reversed(todo)])), False
        done.append(comp)
    return "/".join(done), True
