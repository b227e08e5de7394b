"""The local build cache: cache records in the state store's SQLite index, their layers in its blobs.

Contract:
- :meth:`LocalCache.lookup` returns the record of a key only when every layer blob it needs is in the store (a
  record whose blob was removed is a miss, never an error), and marks it used.
- :meth:`LocalCache.put` stores a record and the digests it references (``cache_blobs``), which the store's gc
  keeps as roots until the record goes.
- :meth:`LocalCache.siblings` lists records under the same parent (newest first), for explaining a miss.
- :meth:`LocalCache.prune` removes records older than ``until`` seconds and then, least recently used first,
  records until their layers fit in ``keep_storage`` bytes; the blobs are freed by the next gc.
"""

from __future__ import annotations

import time
from typing import Any

from imgci.cache.records import CacheRecord
from imgci.errors import StoreError
from imgci.store import Store


class LocalCache:
    def __init__(self, store: Store) -> None:
        self.store = store

    def lookup(self, key: str) -> CacheRecord | None:
        row = self.store._db().execute("SELECT record FROM cache_entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            record = CacheRecord.loads(row[0])
        except (ValueError, KeyError, TypeError):
            return None
        # Claim (present *and* leased), not just look: a gc of `imgci prune --all` between a look and the claim
        # would take a blob this build is about to use (the record is dropped first, so nothing else keeps it).
        if not self.store.claim_all([d.digest for d, _ in record.layers]):
            return None
        try:
            with self.store.transaction() as db:
                db.execute("UPDATE cache_entries SET last_used = ? WHERE key = ?", (time.time(), key))
        except StoreError:
            pass  # bookkeeping only
        return record

    def put(self, record: CacheRecord) -> None:
        now = time.time()
        with self.store.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO cache_entries VALUES (?, ?, ?, ?, ?, ?)",
                (record.key, record.parent, record.dumps(), record.size, record.created or now, now),
            )
            db.execute("DELETE FROM cache_blobs WHERE key = ?", (record.key,))
            for d, _ in record.layers:
                db.execute("INSERT OR IGNORE INTO cache_blobs VALUES (?, ?)", (record.key, d.digest.value))

    def siblings(self, parent: str, limit: int = 20) -> list[CacheRecord]:
        rows = (
            self.store._db()
            .execute(
                "SELECT record FROM cache_entries WHERE parent = ? ORDER BY last_used DESC LIMIT ?", (parent, limit)
            )
            .fetchall()
        )
        out = []
        for (text,) in rows:
            try:
                out.append(CacheRecord.loads(text))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def records(self) -> list[dict[str, Any]]:
        rows = self.store._db().execute("SELECT key, size, created, last_used FROM cache_entries").fetchall()
        return [{"key": k, "size": s, "created": c, "last_used": u} for k, s, c, u in rows]

    def prune(self, *, until: float | None = None, keep_storage: int | None = None, everything: bool = False) -> int:
        """Remove records (see the module contract); returns how many."""
        now = time.time()
        rows = self.store._db().execute("SELECT key, size, last_used FROM cache_entries ORDER BY last_used").fetchall()
        doomed: list[str] = []
        kept: list[tuple[str, int]] = []
        for key, size, last_used in rows:
            if everything or (until is not None and now - last_used > until):
                doomed.append(key)
            else:
                kept.append((key, size))
        if keep_storage is not None:
            total = sum(size for _, size in kept)
            for key, size in kept:  # least recently used first
                if total <= keep_storage:
                    break
                doomed.append(key)
                total -= size
        if doomed:
            with self.store.transaction() as db:
                for key in doomed:
                    db.execute("DELETE FROM cache_entries WHERE key = ?", (key,))
                    db.execute("DELETE FROM cache_blobs WHERE key = ?", (key,))
        return len(doomed)
