"""What a breakout test compares before and after: every entry of a sandbox directory except the target.

``outside_snapshot(base, target)`` maps each path below ``base`` (``target`` and what is in it excluded) to
``(mode, uid, gid, nlink, mtime_ns, sha256 of the content | symlink target | None)``: a file written, chmod'ed,
chown'ed, linked or touched through an escape changes it. Stdlib only; does not import imgci.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any


def outside_snapshot(base: Path, target: Path) -> dict[str, tuple[Any, ...]]:
    seen: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        if Path(dirpath) == target.parent and target.name in dirnames:
            dirnames.remove(target.name)
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath, name)
            st = p.lstat()
            body: Any = None
            if stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(p.read_bytes()).hexdigest()
            key = os.path.normpath(p.relative_to(base))
            seen[key] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns, body)
    return seen
