"""UnionView: a stack of unpacked layers seen as one read-only tree (a SourceFS), with OCI union semantics.

Contract of :class:`MergedTree` (built once per chain of diff_ids, then answered from memory):
- Layers apply bottom to top, each in two steps. First its deletions, against the layers below only: ``.wh.NAME``
  hides NAME (and everything under it); an opaque marker hides everything lower layers have under that directory.
  Then its entries, in archive order: an entry replaces what is at its path, except that a directory over a
  directory merges (the upper's metadata wins, contents combine); a non-directory over a directory hides the whole
  lower directory.
- As docker applies a layer onto the merged tree: a parent directory the layer does not list itself follows a
  symlink of a lower layer (``lib -> usr/lib`` below, ``lib/x.so`` in the layer lands in ``usr/lib/x.so``), and is
  created 0755 root-owned where nothing exists (or where a lower non-directory is in the way). A directory the layer
  lists replaces a lower symlink. A hardlink takes the node of its target (looked up without following symlinks) at
  that moment: it reads as that file.
- Metadata comes from the layers' indexes (``imgci.build.layerstore``), never from the disk.

Contract of :class:`UnionView` (a SourceFS): ``lstat`` does not follow the last component (parents are resolved
inside the view); ``resolve`` follows every symlink inside the view (absolute targets from the view's root, ``..``
stops at the root, more than 40 links raise BuildError); ``listdir`` is merged and sorted, whiteout and opaque
markers never appear; ``open`` reads a regular file (a hardlink reads as its target).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from imgci.build.fs import FileInfo, SourceFS
from imgci.build.layerindex import Record
from imgci.errors import BuildError
from imgci.oci import Digest

if TYPE_CHECKING:
    from imgci.build.layerindex import LayerIndex
    from imgci.build.layerstore import LayerStore

# (record, layer position in the chain or -1, path in that layer's directory)
Node = tuple[Record, int, str]
IMPLICIT_DIR: Record = ("dir", 0o755, 0, 0, 0, 0, "", 0, 0, ())
_MAX_LINKS = 40


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _split(path: str) -> tuple[str, str]:
    head, _, base = path.rpartition("/")
    return head, base


def _clean(path: str) -> str:
    return "/".join(p for p in path.split("/") if p not in ("", "."))


class MergedTree:
    """The merged nodes of a layer stack; see the module contract."""

    def __init__(self, nodes: dict[str, Node], children: dict[str, set[str]]) -> None:
        self.nodes = nodes
        self.children = children
        self._sorted: dict[str, list[str]] = {}

    @classmethod
    def empty(cls) -> MergedTree:
        return cls({"": (IMPLICIT_DIR, -1, "")}, {"": set()})

    def copy(self) -> MergedTree:
        return MergedTree(dict(self.nodes), {k: set(v) for k, v in self.children.items()})

    # -- building ------------------------------------------------------------------------------------------------
    def _set(self, path: str, node: Node) -> None:
        old = self.nodes.get(path)
        if old is not None and (old[0][0] != "dir" or node[0][0] != "dir"):
            self._remove(path)
        self.nodes[path] = node
        if path:
            self.children[_split(path)[0]].add(_split(path)[1])
        if node[0][0] == "dir":
            self.children.setdefault(path, set())

    def _remove(self, path: str) -> None:
        if path not in self.nodes or not path:
            return
        head, base = _split(path)
        self.children[head].discard(base)
        stack = [path]
        while stack:
            p = stack.pop()
            del self.nodes[p]
            stack.extend(_join(p, c) for c in self.children.pop(p, ()))

    def walk(self, parts: list[str], start: str = "", *, create: bool = False, follow_last: bool = True) -> str | None:
        """Resolve ``parts`` from directory ``start`` following symlinks inside the tree (``..`` stops at the
        root). Missing components: None, or (``create``) implicit directories, which also replace non-directories
        in the way (the result is then a directory). Without ``follow_last`` a final symlink is returned as is."""
        resolved = start.split("/") if start else []
        todo = list(reversed(parts))
        links = 0
        while todo:
            comp = todo.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                if resolved:
                    resolved.pop()
                continue
            path = "/".join([*resolved, comp])
            node = self.nodes.get(path)
            if node is not None and node[0][0] == "symlink" and (todo or follow_last):
                links += 1
                if links > _MAX_LINKS:
                    raise BuildError(f"too many levels of symbolic links resolving {'/'.join(parts)!r}")
                target = node[0][6]
                if target.startswith("/"):
                    resolved = []
                todo.extend(reversed(target.split("/")))
                continue
            if node is None or ((todo or create) and node[0][0] != "dir"):
                if not create:
                    return None
                self._set(path, (IMPLICIT_DIR, -1, ""))
            resolved.append(comp)
        return "/".join(resolved)

    def add_layer(self, index: LayerIndex, pos: int) -> None:
        """Apply one layer (at ``pos`` in the chain) on top of this tree; see the module contract."""
        entries = index.entries

        def vmap(key: str, cache: dict[str, str | None], create: bool) -> str | None:
            """Where the layer's directory ``key`` is in the merged tree. Deleting (not ``create``), a directory the
            layer lists is taken as listed; adding, only once its entry was applied (it is then in ``cache``):
            until then, as when docker applies the archive in order, the path resolves through the tree."""
            if key in cache:
                return cache[key]
            head, base = _split(key)
            parent = vmap(head, cache, create) if head else ""
            result: str | None = None
            if parent is not None:
                rec = entries.get(key)
                if not create and rec is not None and rec[0] == "dir":
                    result = _join(parent, base)  # listed: it replaces (never follows) a lower symlink
                    if result not in self.nodes:
                        result = None
                else:
                    result = self.walk([base], parent, create=create)
            cache[key] = result
            return result

        lower: dict[str, str | None] = {"": ""}
        for victim in index.whiteouts:
            head, base = _split(victim)
            parent = vmap(head, lower, False)
            if parent is not None:
                self._remove(_join(parent, base))
        for key in index.opaque:
            path = vmap(key, lower, False)
            if path is not None and self.nodes[path][0][0] == "dir":
                for child in list(self.children.get(path, ())):
                    self._remove(_join(path, child))
        upper: dict[str, str | None] = {"": ""}
        for key, rec in entries.items():
            if not key:
                self.nodes[""] = (rec, pos, "")
                continue
            head, base = _split(key)
            parent = vmap(head, upper, True)
            assert parent is not None
            path = _join(parent, base)
            node: Node = (rec, pos, key)
            if rec[0] == "hardlink":
                target = self.nodes.get(_clean(rec[6]))
                node = target if target is not None and target[0][0] != "dir" else (_dangling(rec), -1, key)
            self._set(path, node)
            if rec[0] == "dir":
                upper[key] = path  # the layer's later entries below ``key`` land here
            else:
                upper.pop(key, None)
        self._sorted.clear()

    # -- reading -------------------------------------------------------------------------------------------------
    def find(self, path: str) -> tuple[str, Node] | None:
        """The node at ``path`` (parents resolved, last component not followed) and its real path."""
        path = _clean(path)
        node = self.nodes.get(path)
        if node is not None:
            return path, node
        head, base = _split(path)
        if base in ("", ".."):
            real = self.walk(path.split("/"))
            return (real, self.nodes[real]) if real is not None else None
        parent = self.walk(head.split("/")) if head else ""
        if parent is None or self.nodes[parent][0][0] != "dir":
            return None
        real = _join(parent, base)
        node = self.nodes.get(real)
        return (real, node) if node is not None else None

    def listdir(self, path: str) -> list[str] | None:
        names = self._sorted.get(path)
        if names is None:
            kids = self.children.get(path)
            if kids is None:
                return None
            names = self._sorted[path] = sorted(kids)
        return names


def _dangling(rec: Record) -> Record:
    """A hardlink whose target is not in the tree: a regular file without content."""
    return ("file", rec[1], rec[2], rec[3], 0, rec[5], "", 0, 0, rec[9])


class UnionView:
    """A read-only SourceFS over unpacked layers ``diff_ids`` (bottom first); see the module contract."""

    def __init__(self, layer_store: LayerStore, diff_ids: list[Digest], description: str) -> None:
        self._layers = layer_store
        self.diff_ids = list(diff_ids)
        self._description = description
        self.tree = layer_store.tree(self.diff_ids)

    def describe(self) -> str:
        return self._description

    def lstat(self, path: str) -> FileInfo | None:
        found = self.tree.find(path)
        if found is None:
            return None
        rec = found[1][0]
        return FileInfo(_clean(path), rec[0], *rec[1:9], xattrs=rec[9])  # type: ignore[arg-type]

    def resolve(self, path: str) -> str | None:
        return self.tree.walk(_clean(path).split("/"))

    def listdir(self, path: str) -> list[str]:
        found = self.tree.find(path)
        if found is None:
            raise BuildError(f"{self._description}: no such directory {path!r}")
        names = self.tree.listdir(found[0])
        if names is None:
            raise BuildError(f"{self._description}: {path!r} is not a directory")
        return names

    def host_path(self, path: str) -> Path | None:
        """The file on disk holding regular file ``path``'s content (None if it is not a regular file)."""
        found = self.tree.find(path)
        if found is None or found[1][0][0] != "file" or found[1][1] < 0:
            return None
        _, pos, key = found[1]
        return self._layers.layer_root(self.diff_ids[pos]) / key

    def open(self, path: str) -> IO[bytes]:
        found = self.tree.find(path)
        if found is None or found[1][0][0] != "file":
            raise BuildError(f"{self._description}: {path!r} is not a regular file")
        host = self.host_path(path)
        if host is None:
            raise BuildError(f"{self._description}: {path!r} is a hardlink to a file that is not in the image")
        try:
            fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise BuildError(f"{self._description}: cannot read {path!r}: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BuildError(f"{self._description}: {path!r} is damaged in the layer store", hint="run `imgci prune`")
        return os.fdopen(fd, "rb")


# -- users and groups ---------------------------------------------------------------------------------------------
def _read_db(view: SourceFS, path: str, what: str) -> list[list[str]]:
    real = view.resolve(path)
    info = view.lstat(real) if real is not None else None
    if real is None or info is None or info.type != "file":
        raise BuildError(f"cannot look up {what}: {view.describe()} has no /{path}")
    with view.open(real) as f:
        text = f.read(16 << 20).decode("utf-8", "replace")
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def lookup_user(view: SourceFS, user: str | int, *, numeric_gid: Literal["uid", "passwd"] = "uid") -> tuple[int, int]:
    """(uid, gid) of ``user`` (a name or a number) in the view's own /etc/passwd (never the host's).

    A name must be listed (BuildError otherwise). A number needs no passwd: its gid is the uid (``numeric_gid=
    "uid"``, as BuildKit's ``COPY --chown=1000``) or the passwd entry's primary group, else 0 (``"passwd"``, as
    ``USER 1000`` runs).
    """
    text = str(user)
    if text.isdigit():
        uid = int(text)
        if numeric_gid == "uid":
            return uid, uid
        try:
            rows = _read_db(view, "etc/passwd", f"user {text}")
        except BuildError:
            return uid, 0
        for row in rows:
            if len(row) >= 4 and row[2] == text and row[3].isdigit():
                return uid, int(row[3])
        return uid, 0
    for row in _read_db(view, "etc/passwd", f"user {text!r}"):
        if len(row) >= 4 and row[0] == text:
            if not (row[2].isdigit() and row[3].isdigit()):
                raise BuildError(f"user {text!r} has a malformed entry in /etc/passwd of {view.describe()}")
            return int(row[2]), int(row[3])
    raise BuildError(f"unknown user {text!r}: not in /etc/passwd of {view.describe()}")


def lookup_group(view: SourceFS, group: str | int) -> int:
    """The gid of ``group`` (a name or a number) in the view's own /etc/group (never the host's)."""
    text = str(group)
    if text.isdigit():
        return int(text)
    for row in _read_db(view, "etc/group", f"group {text!r}"):
        if len(row) >= 3 and row[0] == text:
            if not row[2].isdigit():
                raise BuildError(f"group {text!r} has a malformed entry in /etc/group of {view.describe()}")
            return int(row[2])
    raise BuildError(f"unknown group {text!r}: not in /etc/group of {view.describe()}")
