"""Content digests of build-context entries for cache keys, with a persistent stat cache.

Contract:
- :meth:`ContentHasher.digest_of` returns ``sha256:<hex>`` of a canonical, sorted text with one record per given
  entry: ``path NUL type NUL octal-mode NUL payload LF`` where the payload is the sha256 of a regular file's
  content, a symlink's target, ``major,minor`` of a device, empty otherwise. Mtimes and ownership are never part of
  it, so touching a file or checking it out elsewhere keeps the digest. Exactly the given entries are covered
  (a directory's record does not cover its children). A path that does not exist (or is ignored) is a BuildError.
- File contents are read in 1 MiB blocks (several files in parallel). A file's sha256 is remembered in a SQLite
  stat cache under ``cache_dir``, keyed by its host path and validated by ``(inode, size, mtime_ns, ctime_ns)``,
  so a later build re-reads only files that changed. Files modified within the last 2 seconds are not cached
  (a same-tick rewrite could keep the same stat). The cache is best effort: a broken or locked cache file only
  costs re-reading; it never fails a build. ``files_read`` counts files whose content was read (for tests/stats).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from imgci.build.fs import FileInfo
from imgci.errors import BuildError

if TYPE_CHECKING:
    from imgci.build.context import DirectoryFS

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_RACY_NS = 2_000_000_000
_CACHE_FILE = "context-stat-cache.sqlite"
StatKey = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


class StatCache:
    """``host path -> (stat key, sha256)`` persisted in SQLite; every failure degrades to a miss."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._loaded: set[str] = set()
        self._rows: dict[str, tuple[StatKey, str]] = {}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=5, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, ino INTEGER, size INTEGER,"
                " mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT)"
            )
            self._db = db
        except (sqlite3.Error, OSError) as e:
            log.warning("stat cache %s unusable, hashing without it: %s", path, e)

    def load(self, prefix: str) -> None:
        """Read every row under directory ``prefix`` once (one query instead of one per file)."""
        with self._lock:
            if self._db is None or prefix in self._loaded:
                return
            self._loaded.add(prefix)
            try:
                rows = self._db.execute(
                    "SELECT path, ino, size, mtime_ns, ctime_ns, sha256 FROM files WHERE path >= ? AND path < ?",
                    (prefix + "/", prefix + "0"),
                ).fetchall()
            except sqlite3.Error as e:
                log.warning("stat cache %s unreadable: %s", self.path, e)
                return
            for path, ino, size, mtime_ns, ctime_ns, sha in rows:
                self._rows[path] = ((ino, size, mtime_ns, ctime_ns), sha)

    def get(self, path: str, key: StatKey) -> str | None:
        with self._lock:
            row = self._rows.get(path)
        return row[1] if row is not None and row[0] == key else None

    def put_many(self, rows: list[tuple[str, StatKey, str]]) -> None:
        if not rows:
            return
        with self._lock:
            for path, key, sha in rows:
                self._rows[path] = (key, sha)
            if self._db is None:
                return
            try:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                    [(path, *key, sha) for path, key, sha in rows],
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                log.warning("stat cache %s not updated: %s", self.path, e)
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class ContentHasher:
    """Digests of entries of one DirectoryFS; see the module contract."""

    def __init__(self, fs: DirectoryFS, cache_dir: Path | None, *, workers: int = 4) -> None:
        self.fs = fs
        self.cache = StatCache(Path(cache_dir) / _CACHE_FILE) if cache_dir is not None else None
        self.workers = workers
        self.files_read = 0
        self._host_root = os.path.realpath(fs.root)
        self._lock = threading.Lock()

    def _hash_file(self, real: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_real(real) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        with self._lock:
            self.files_read += 1
        return h.hexdigest()

    def _entries(self, items: Iterable[str | FileInfo]) -> dict[str, tuple[FileInfo, str]]:
        """``path -> (info, payload)`` for ``items``; file payloads are their content sha256 (hex)."""
        if self.cache is not None:
            self.cache.load(self._host_root)
        started_ns = time.time_ns()
        records: dict[str, tuple[FileInfo, str]] = {}
        to_read: list[tuple[str, str, StatKey]] = []  # path, real, key
        for item in items:
            path = item if isinstance(item, str) else item.path
            entry = self.fs.host_entry(path)
            if entry is None:
                raise BuildError(f"{path!r}: not found in {self.fs.describe()}")
            real, st, info = entry
            if info.type == "file":
                key: StatKey = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                sha = self.cache.get(f"{self._host_root}/{real}", key) if self.cache is not None else None
                if sha is None:
                    to_read.append((info.path, real, key))
                    sha = ""
                records[info.path] = (info, sha)
            elif info.type == "symlink":
                records[info.path] = (info, info.linkname)
            elif info.type in ("char", "block"):
                records[info.path] = (info, f"{info.devmajor},{info.devminor}")
            else:
                records[info.path] = (info, "")
        if to_read:
            reals = [real for _, real, _ in to_read]
            if len(to_read) > 4 and self.workers > 1:
                with ThreadPoolExecutor(max_workers=self.workers) as pool:
                    shas = list(pool.map(self._hash_file, reals))
            else:
                shas = [self._hash_file(real) for real in reals]
            fresh = []
            for (path, real, key), sha in zip(to_read, shas, strict=True):
                records[path] = (records[path][0], sha)
                if key[2] < started_ns - _RACY_NS:
                    fresh.append((f"{self._host_root}/{real}", key, sha))
            if self.cache is not None:
                self.cache.put_many(fresh)
        return records

    def content_digests(self, paths: Iterable[str]) -> dict[str, str]:
        """``path -> sha256:<hex>`` of the content of the regular files ``paths`` (stat-cached, read in parallel)."""
        out = {}
        for path, (info, payload) in self._entries(paths).items():
            if info.type != "file":
                raise BuildError(f"{path!r} is not a regular file in {self.fs.describe()}")
            out[path] = "sha256:" + payload
        return out

    def digest_of(self, items: Iterable[str | FileInfo]) -> str:
        records = self._entries(items)
        h = hashlib.sha256()
        for path in sorted(records):
            info, payload = records[path]
            h.update(f"{path}\0{info.type}\0{info.mode:o}\0{payload}\n".encode("utf-8", "surrogateescape"))
        return "sha256:" + h.hexdigest()
