"""The metadata index of one unpacked layer: what its tar said about every entry, kept apart from the disk.

Contract:
- A :class:`LayerIndex` is keyed by where each entry ended up in the layer directory (``""`` is the root) and keeps
  archive order. A record is ``(type, mode, uid, gid, size, mtime, linkname, devmajor, devminor, xattrs)`` exactly
  as the tar stored them (hardlink targets normalised to clean relative paths). ``whiteouts`` are paths the layer
  deletes below, ``opaque`` directories whose lower contents it hides. Directories created on disk only as parents
  (implicit) have no record.
- :class:`LayerIndexBuilder` turns the reports of :func:`imgci.layerfs.extract_layer_dir` into an index, replaying
  the layer's own replacements (a non-directory that replaces a directory drops everything recorded below it).
- ``dump``/``load`` use compact JSON (lone surrogates of non-UTF-8 names survive; xattr values are hex).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgci.build.fs import EntryType
from imgci.errors import StoreError
from imgci.tarstream import BLK, CHR, DIR, FIFO, LNK, SYM, TarEntry, safe_parts

# (type, mode, uid, gid, size, mtime, linkname, devmajor, devminor, xattrs)
Record = tuple[str, int, int, int, int, float, str, int, int, tuple[tuple[str, bytes], ...]]
_INDEX_VERSION = 1
_TYPES: dict[bytes, EntryType] = {DIR: "dir", SYM: "symlink", LNK: "hardlink", CHR: "char", BLK: "block", FIFO: "fifo"}


@dataclass
class LayerIndex:
    """One layer's metadata; see the module contract."""

    entries: dict[str, Record]
    whiteouts: list[str]
    opaque: list[str]
    size: int = 0  # bytes of file data on disk

    @classmethod
    def load(cls, path: Path) -> LayerIndex:
        try:
            doc = json.loads(path.read_bytes())
            if doc.get("v") != _INDEX_VERSION:
                raise ValueError(f"index version {doc.get('v')!r}")
            entries = {e[0]: _record_from_json(e) for e in doc["entries"]}
            return cls(entries, list(doc["whiteouts"]), list(doc["opaque"]), int(doc["size"]))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise StoreError(f"unpacked layer index {path} is unusable: {e}", hint="run `imgci prune`") from None

    def dump(self) -> bytes:
        rows = [[k, *r[:9], [[x, v.hex()] for x, v in r[9]]] if r[9] else [k, *r[:9]] for k, r in self.entries.items()]
        doc = {
            "v": _INDEX_VERSION,
            "size": self.size,
            "entries": rows,
            "whiteouts": self.whiteouts,
            "opaque": self.opaque,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def save(self, path: Path) -> None:
        """Write :meth:`dump` to the new file ``path`` and sync it (it must be on disk before its layer dir is
        renamed into place)."""
        with open(path, "xb") as f:
            f.write(self.dump())
            f.flush()
            os.fsync(f.fileno())


def _record_from_json(e: list[Any]) -> Record:
    xattrs = tuple((k, bytes.fromhex(v)) for k, v in e[10]) if len(e) > 10 else ()
    return (e[1], e[2], e[3], e[4], e[5], e[6], e[7], e[8], e[9], xattrs)


class LayerIndexBuilder:
    """Collects extract_layer_dir's reports into a LayerIndex, replaying the layer's own replacements."""

    def __init__(self) -> None:
        self.index = LayerIndex({}, [], [])
        self._parents: set[str] = set()  # every directory something was recorded below (listed or implicit)

    def _below(self, key: str) -> None:
        while key:
            key = key.rpartition("/")[0]
            if key in self._parents:
                return
            self._parents.add(key)

    def record(self, kind: str, key: str, e: TarEntry) -> None:
        idx = self.index
        if kind == "whiteout":
            idx.whiteouts.append(key)
            self._below(key)
            return
        if kind == "opaque":
            idx.opaque.append(key)
            self._below(key + "/")
            return
        type_: EntryType = _TYPES.get(e.type, "file")
        if type_ != "dir" and key in self._parents:
            self._drop_below(key)  # a non-directory replaced a directory (listed or implicit) and all in it
        link = "/".join(safe_parts(e.linkname)) if type_ == "hardlink" else e.linkname
        idx.entries.pop(key, None)  # a replaced entry moves to where it was last written
        idx.entries[key] = (
            type_,
            e.mode,
            e.uid,
            e.gid,
            e.size if type_ == "file" else 0,
            int(e.mtime) if e.mtime == int(e.mtime) else e.mtime,
            link if type_ in ("symlink", "hardlink") else "",
            e.devmajor if type_ in ("char", "block") else 0,
            e.devminor if type_ in ("char", "block") else 0,
            tuple(sorted(e.xattrs.items())),
        )
        self._below(key)

    def _drop_below(self, key: str) -> None:
        idx, prefix = self.index, key + "/"
        for k in [k for k in idx.entries if k.startswith(prefix)]:
            del idx.entries[k]
        idx.whiteouts = [w for w in idx.whiteouts if not w.startswith(prefix)]
        idx.opaque = [o for o in idx.opaque if o != key and not o.startswith(prefix)]
        self._parents = {p for p in self._parents if p != key and not p.startswith(prefix)}

    def finish(self) -> LayerIndex:
        self.index.size = sum(r[4] for r in self.index.entries.values() if r[0] == "file")
        return self.index
