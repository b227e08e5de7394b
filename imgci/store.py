"""The content store: an OCI image layout of blobs on disk plus a SQLite index of refs and bookkeeping.

Layout of the state directory::

    STATE/
      oci-layout                {"imageLayoutVersion": "1.0.0"}
      blobs/sha256/<hex>        content-addressed blobs; a file here is always complete and verified
      ingest/<pid>-<random>     blobs being written (temp files; removed on failure, swept by gc)
      index.db (+ -wal, -shm)   SQLite, WAL mode: refs, blobs, leases, unpacked layers (and later: cache keys)
      layers/<hex>/             unpacked layers, one directory per diff_id (see imgci.build.layerstore)
      gc.lock                   flock held exclusively by gc, shared by writers holding a lease

Contract:
- A blob becomes visible only after its bytes were hashed while written, matched the expected digest and size,
  were fsync'ed, and renamed into place (then the directory is fsync'ed). A killed process leaves at most a
  temp file in ``ingest/``.
- Refs are only set to manifests whose blobs are all present (callers write leaves first); ``fsck`` checks it.
- Two processes may share a state directory: SQLite serialises index writes, and a blob written by a live
  process is protected from a concurrent ``gc`` by that process's lease until the process ends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from imgci.errors import (
    BlobNotFoundError,
    DigestMismatchError,
    ImageNotFoundError,
    ImgciError,
    StorageFullError,
    StoreCorruptError,
    StoreError,
)
from imgci.oci import INDEX_TYPES, MANIFEST_TYPES, Descriptor, Digest, ImageConfig, Index, Manifest

_SCHEMA_VERSION = 3  # 2: unpacked_layers, 3: cache_entries + cache_blobs
_SCHEMA = """
CREATE TABLE IF NOT EXISTS refs (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    started REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS lease_blobs (
    lease_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (lease_id, digest)
);
CREATE TABLE IF NOT EXISTS unpacked_layers (
    diff_id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    entries INTEGER NOT NULL,
    unpacked REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cache_entries (
    key TEXT PRIMARY KEY,
    parent TEXT NOT NULL,
    record TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cache_entries_parent ON cache_entries (parent);
CREATE TABLE IF NOT EXISTS cache_blobs (
    key TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (key, digest)
);
"""
_STALE_INGEST_SECONDS = 3600.0


def default_root() -> Path:
    env = os.environ.get("IMGCI_STATE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "imgci"


def fsync_dir(path: Path) -> None:
    """Make a rename or create in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _translate_oserror(e: OSError, what: str, root: Path) -> StoreError:
    # The state directory is named: in CI it is often not where the user thinks (IMGCI_STATE, a cache volume).
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(
            f"no space left in the state directory {root} while writing {what}",
            hint="free disk space, run `imgci prune`, or point --state at a bigger disk",
        )
    return StoreError(f"cannot write {what} in the state directory {root}: {e.strerror or e}")


@dataclass(frozen=True)
class RefRecord:
    """One named image in the store."""

    name: str
    digest: Digest
    media_type: str
    size: int
    created: float
    updated: float


class BlobWriter:
    """Streams one blob into the store; hashes as it writes; ``commit`` verifies, fsyncs and renames.

    Use as a context manager: leaving the block without ``commit`` (or with an exception) removes the temp file.
    """

    def __init__(self, store: Store, expected: Digest | None, expected_size: int | None) -> None:
        self._store = store
        self.expected = expected
        self.expected_size = expected_size
        algorithm = expected.algorithm if expected is not None else "sha256"
        self._hash = hashlib.new(algorithm)
        self.size = 0
        self.digest: Digest | None = None
        self._tmp = store.ingest_dir / f"{os.getpid()}-{secrets.token_hex(8)}"
        try:
            store.ingest_dir.mkdir(parents=True, exist_ok=True)
            self._file: IO[bytes] | None = open(self._tmp, "xb")  # noqa: SIM115 - closed in commit/abort
        except OSError as e:  # a full disk can refuse even the empty temp file
            raise _translate_oserror(e, "a blob", store.root) from None

    def write(self, data: bytes | memoryview) -> int:
        assert self._file is not None, "write after commit/abort"
        try:
            n = self._file.write(data)
        except OSError as e:
            self.abort()
            raise _translate_oserror(e, "a blob", self._store.root) from None
        self._hash.update(data)
        self.size += len(data)
        if self.expected_size is not None and self.size > self.expected_size:
            self.abort()
            raise DigestMismatchError(
                f"blob {self.expected} is larger than its declared size {self.expected_size}",
                expected=str(self.expected_size),
                actual=f">{self.expected_size}",
            )
        return n

    def commit(self) -> Digest:
        assert self._file is not None, "commit after commit/abort"
        actual = Digest(f"{self._hash.name}:{self._hash.hexdigest()}")
        try:
            if self.expected is not None and actual != self.expected:
                raise DigestMismatchError(
                    f"blob digest mismatch: expected {self.expected}, got {actual}",
                    expected=self.expected.value,
                    actual=actual.value,
                )
            if self.expected_size is not None and self.size != self.expected_size:
                raise DigestMismatchError(
                    f"blob {actual} size mismatch: expected {self.expected_size} bytes, got {self.size}",
                    expected=str(self.expected_size),
                    actual=str(self.size),
                )
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None
                final = self._store.blob_path(actual)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(self._tmp, 0o644)
                with self._store.writer_lock():
                    os.replace(self._tmp, final)
                    fsync_dir(final.parent)
                    self._store._record_blob(actual, self.size)
            except OSError as e:
                raise _translate_oserror(e, f"blob {actual}", self._store.root) from None
        except BaseException:
            self.abort()
            raise
        self.digest = actual
        return actual

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self.abort()


# Registries refuse manifests and indexes over 4 MiB (distribution's default limit); what gc walks may also have
# come from an archive, hence the margin. A bigger blob is a layer.
_MAX_DOCUMENT = 64 << 20


def _close_connections(conns: list[sqlite3.Connection]) -> None:
    for conn in conns:
        with contextlib.suppress(sqlite3.Error):
            conn.close()
    conns.clear()


class Store:
    """The state directory. Thread-safe: each thread gets its own SQLite connection."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.blobs_dir = self.root / "blobs"
        self.ingest_dir = self.root / "ingest"
        self._local = threading.local()
        # Every connection this store opened (one per thread), closed when the store goes away or the process
        # exits: closing checkpoints the write-ahead log into index.db and removes it. ``imgci`` leaves through
        # os._exit after the exit handlers (imgci.cli.run), without the interpreter's teardown that used to close
        # them; threads' own connections are closed there too (hence check_same_thread=False: a connection is
        # still only used by the thread that opened it).
        self._conns: list[sqlite3.Connection] = []
        weakref.finalize(self, _close_connections, self._conns)
        self._lease_id: str | None = None
        self._lease_lock = threading.Lock()
        try:
            (self.blobs_dir / "sha256").mkdir(parents=True, exist_ok=True)
            self.ingest_dir.mkdir(exist_ok=True)
            layout = self.root / "oci-layout"
            if not layout.exists():
                layout.write_text('{"imageLayoutVersion": "1.0.0"}')
        except OSError as e:
            raise StoreError(f"cannot use state directory {self.root}: {e.strerror or e}") from None
        self._db()  # create the schema now so errors surface early

    # -- SQLite ---------------------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    self.root / "index.db", timeout=60.0, isolation_level=None, check_same_thread=False
                )
                self._conns.append(conn)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=60000")
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version < _SCHEMA_VERSION:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executescript(_SCHEMA)  # executescript commits
                    conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
                elif version > _SCHEMA_VERSION:
                    raise StoreError(
                        f"state directory {self.root} was written by a newer imgci (schema {version})",
                        hint="upgrade imgci or use another --state directory",
                    )
            except sqlite3.DatabaseError as e:
                full = self._full_error(e, "opening the state index")
                if full is not None:
                    raise full from None
                raise StoreCorruptError(f"state index {self.root / 'index.db'} is unusable: {e}") from None
            self._local.conn = conn
        return conn

    def _full_error(self, e: sqlite3.Error, doing: str) -> StorageFullError | None:
        """``e`` as a StorageFullError if the disk is full, else None. SQLite says SQLITE_FULL, or only "disk I/O
        error" when it cannot grow its shared-memory file (opening a WAL index needs 32 KiB): that one used to be
        reported as a corrupt store, on a disk that was merely full."""
        name = getattr(e, "sqlite_errorname", "")
        if name != "SQLITE_FULL" and "full" not in str(e).lower():
            try:
                st = os.statvfs(self.root)
            except OSError:
                return None
            if not (name.startswith("SQLITE_IOERR") and st.f_bavail * st.f_frsize < (1 << 20)):
                return None
        return StorageFullError(
            f"no space left in the state directory {self.root} while {doing}",
            hint="free disk space there (`imgci prune` too needs a little room to update its index)",
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction (serialised against other processes)."""
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._full_error(e, "updating the state index") or StoreError(
                f"state index is busy or unwritable: {e}"
            ) from None
        try:
            yield conn
        except sqlite3.OperationalError as e:
            # A statement of the body can hit the full disk too (a transaction spilling into the WAL).
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            full = self._full_error(e, "updating the state index")
            if full is not None:
                raise full from None
            raise
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                with contextlib.suppress(sqlite3.Error):  # else the next BEGIN fails "within a transaction"
                    conn.execute("ROLLBACK")
                raise self._full_error(e, "updating the state index") or StoreError(
                    f"cannot update the state index: {e}"
                ) from None

    # -- leases (protect blobs this process wrote from a concurrent gc) -----------------------------------------
    def _lease(self) -> str:
        with self._lease_lock:
            if self._lease_id is None:
                lease_id = f"{os.getpid()}-{secrets.token_hex(6)}"
                with self.transaction() as db:
                    db.execute("INSERT INTO leases VALUES (?, ?, ?)", (lease_id, os.getpid(), time.time()))
                self._lease_id = lease_id
            return self._lease_id

    def _record_blob(self, digest: Digest, size: int) -> None:
        self._record_blobs([(digest, size)])

    def _record_blobs(self, blobs: list[tuple[Digest, int]]) -> None:
        """Record blobs (digest, size) as present and leased by this process, in one transaction."""
        lease = self._lease()
        now = time.time()
        with self.transaction() as db:
            for digest, size in blobs:
                db.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?)", (digest.value, size, now))
                db.execute("INSERT OR IGNORE INTO lease_blobs VALUES (?, ?)", (lease, digest.value))

    def release(self) -> None:
        """Drop this process's lease (its blobs become collectable unless referenced)."""
        with self._lease_lock:
            if self._lease_id is not None:
                with self.transaction() as db:
                    db.execute("DELETE FROM lease_blobs WHERE lease_id = ?", (self._lease_id,))
                    db.execute("DELETE FROM leases WHERE id = ?", (self._lease_id,))
                self._lease_id = None

    def close(self) -> None:
        self.release()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with contextlib.suppress(ValueError):
                self._conns.remove(conn)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- blobs ----------------------------------------------------------------------------------------------
    def blob_path(self, digest: Digest) -> Path:
        return self.blobs_dir / digest.algorithm / digest.hex

    def has_blob(self, digest: Digest) -> bool:
        return self.blob_path(digest).is_file()

    def claim(self, digest: Digest) -> bool:
        """If the blob is present, protect it from gc for the life of this process and return True.

        Use this instead of ``has_blob`` when deciding to skip writing a blob a new ref will need.
        """
        return self.claim_all([digest])

    def claim_all(self, digests: list[Digest]) -> bool:
        """:meth:`claim` for every blob of ``digests`` in one lock and one transaction (a cache lookup claims the
        layers of each cached step): True if all are present, and then all are protected."""
        with self.writer_lock():
            present = []
            for digest in digests:
                try:
                    st = self.blob_path(digest).stat()
                except (FileNotFoundError, NotADirectoryError):
                    return False
                if not stat.S_ISREG(st.st_mode):
                    return False
                present.append((digest, st.st_size))
            if present:
                self._record_blobs(present)
            return True

    def blob_size(self, digest: Digest) -> int:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {digest} is not in the store at {self.root}") from None

    def open_blob(self, digest: Digest) -> IO[bytes]:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {digest} is not in the store at {self.root}") from None

    def read_blob(self, digest: Digest) -> bytes:
        with self.open_blob(digest) as f:
            return f.read()

    def blob_writer(self, expected: Digest | None = None, expected_size: int | None = None) -> BlobWriter:
        """A writer for one blob; pass the digest/size you expect and ``commit`` refuses anything else."""
        self._lease()
        return BlobWriter(self, expected, expected_size)

    def write_blob(self, data: bytes, expected: Digest | None = None) -> Descriptor:
        """Store ``data`` (verified against ``expected`` if given) and return an untyped descriptor of it."""
        digest = Digest.of(data) if expected is None else expected
        if expected is not None:
            expected.verify(data)
        if self.claim(digest):
            return Descriptor("", digest, len(data))
        with self.blob_writer(expected, len(data)) as w:
            w.write(data)
            w.commit()
        return Descriptor("", digest, len(data))

    def iter_blobs(self) -> Iterator[Digest]:
        for algo_dir in sorted(self.blobs_dir.iterdir()):
            if not algo_dir.is_dir():
                continue
            for p in sorted(algo_dir.iterdir()):
                with contextlib.suppress(Exception):
                    yield Digest(f"{algo_dir.name}:{p.name}")

    # -- refs -----------------------------------------------------------------------------------------------
    def set_ref(self, name: str, desc: Descriptor) -> None:
        """Point ``name`` at a manifest or index that is already in the store."""
        if not self.has_blob(desc.digest):
            raise BlobNotFoundError(f"cannot tag {name}: manifest {desc.digest} is not in the store")
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT created FROM refs WHERE name = ?", (name,)).fetchone()
            created = row[0] if row else now
            db.execute(
                "INSERT OR REPLACE INTO refs VALUES (?, ?, ?, ?, ?, ?)",
                (name, desc.digest.value, desc.media_type, desc.size, created, now),
            )

    def get_ref(self, name: str) -> RefRecord:
        row = self._db().execute("SELECT * FROM refs WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ImageNotFoundError(f"image {name} is not in the local store", hint="see `imgci ls`")
        return RefRecord(row[0], Digest(row[1]), row[2], row[3], row[4], row[5])

    def find_ref(self, name: str) -> RefRecord | None:
        try:
            return self.get_ref(name)
        except ImageNotFoundError:
            return None

    def list_refs(self) -> list[RefRecord]:
        rows = self._db().execute("SELECT * FROM refs ORDER BY name").fetchall()
        return [RefRecord(r[0], Digest(r[1]), r[2], r[3], r[4], r[5]) for r in rows]

    def refs_for_digest(self, digest: Digest) -> list[str]:
        rows = self._db().execute("SELECT name FROM refs WHERE digest = ? ORDER BY name", (digest.value,))
        return [r[0] for r in rows.fetchall()]

    def delete_ref(self, name: str) -> RefRecord:
        rec = self.get_ref(name)
        with self.transaction() as db:
            db.execute("DELETE FROM refs WHERE name = ?", (name,))
        return rec

    # -- documents ------------------------------------------------------------------------------------------
    def read_manifest(self, digest: Digest, media_type: str = "") -> Manifest | Index:
        from imgci.oci import parse_manifest_or_index

        return parse_manifest_or_index(self.read_blob(digest), media_type)

    def read_config(self, digest: Digest) -> ImageConfig:
        return ImageConfig.parse(self.read_blob(digest))

    def children(self, digest: Digest) -> list[Digest]:
        """Blobs a manifest/index blob references (empty for anything else or when unreadable). Only a blob that
        starts like a JSON object and is no bigger than a manifest may be is read whole: a layer is not (gc and
        push walk every image's blobs; reading its layers too was most of their time)."""
        try:
            with self.open_blob(digest) as f:
                if os.fstat(f.fileno()).st_size > _MAX_DOCUMENT or f.read(64).lstrip()[:1] != b"{":
                    return []
                f.seek(0)
                raw = f.read()
        except (BlobNotFoundError, OSError):
            return []
        try:
            doc: Any = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return []
        if not isinstance(doc, dict):
            return []
        out: list[Digest] = []
        mt = doc.get("mediaType", "")
        descs: list[Any] = []
        if "manifests" in doc and (mt in INDEX_TYPES or not mt):
            descs = list(doc.get("manifests") or [])
        elif "layers" in doc and "config" in doc and (mt in MANIFEST_TYPES or not mt):
            descs = [doc["config"], *(doc.get("layers") or [])]
        for d in descs:
            with contextlib.suppress(Exception):
                out.append(Digest(d["digest"]))
        return out

    # -- garbage collection ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def gc_lock(self, shared: bool = False) -> Iterator[None]:
        """Exclusive for gc; shared for writers between making a blob visible and leasing it."""
        fd = os.open(self.root / "gc.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def writer_lock(self) -> contextlib.AbstractContextManager[None]:
        return self.gc_lock(shared=True)

    def _live_leases(self, db: sqlite3.Connection) -> set[str]:
        live: set[str] = set()
        for lease_id, pid in db.execute("SELECT id, pid FROM leases").fetchall():
            alive = True
            if pid != os.getpid():
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    alive = False
                except PermissionError:
                    alive = True
            if alive:
                live.add(lease_id)
            else:
                db.execute("DELETE FROM lease_blobs WHERE lease_id = ?", (lease_id,))
                db.execute("DELETE FROM leases WHERE id = ?", (lease_id,))
        return live

    def roots(self, extra: list[Digest] | None = None) -> set[Digest]:
        """Digests gc must keep as roots: refs, build cache entries' layers, live leases' blobs and ``extra``."""
        out: set[Digest] = set(extra or [])
        with self.transaction() as db:
            live = self._live_leases(db)
            for (d,) in db.execute("SELECT digest FROM refs").fetchall():
                out.add(Digest(d))
            for (d,) in db.execute("SELECT DISTINCT digest FROM cache_blobs").fetchall():
                out.add(Digest(d))  # build cache entries keep their layers (prune drops entries first)
            for lease_id in live:
                for (d,) in db.execute("SELECT digest FROM lease_blobs WHERE lease_id = ?", (lease_id,)):
                    out.add(Digest(d))
        return out

    def reachable(self, roots: set[Digest]) -> set[Digest]:
        seen: set[Digest] = set()
        stack = list(roots)
        while stack:
            d = stack.pop()
            if d in seen:
                continue
            seen.add(d)
            stack.extend(c for c in self.children(d) if c not in seen)
        return seen

    def gc(self, *, dry_run: bool = False, extra_roots: list[Digest] | None = None) -> tuple[int, int]:
        """Delete blobs nothing references; returns (blobs removed, bytes freed). Also sweeps stale temp files."""
        removed = freed = 0
        with self.gc_lock():
            keep = self.reachable(self.roots(extra_roots))
            for digest in list(self.iter_blobs()):
                if digest in keep:
                    continue
                path = self.blob_path(digest)
                try:
                    size = path.stat().st_size
                    if not dry_run:
                        path.unlink()
                except FileNotFoundError:
                    continue
                removed += 1
                freed += size
            if not dry_run:
                with self.transaction() as db:
                    live = {d.value for d in keep}
                    for (d,) in db.execute("SELECT digest FROM blobs").fetchall():
                        if d not in live:
                            db.execute("DELETE FROM blobs WHERE digest = ?", (d,))
                freed += self._sweep_ingest()
        return removed, freed

    def _sweep_ingest(self) -> int:
        freed = 0
        now = time.time()
        for p in self.ingest_dir.iterdir():
            pid_text = p.name.split("-", 1)[0]
            dead = False
            if pid_text.isdigit() and int(pid_text) != os.getpid():
                try:
                    os.kill(int(pid_text), 0)
                except ProcessLookupError:
                    dead = True
                except PermissionError:
                    pass
            try:
                st = p.stat()
                if dead or now - st.st_mtime > _STALE_INGEST_SECONDS:
                    p.unlink()
                    freed += st.st_size
            except FileNotFoundError:
                continue
        return freed

    # -- verification ---------------------------------------------------------------------------------------
    def fsck(self) -> list[str]:
        """Verify the store; returns a list of problems (empty = healthy).

        Checked: every blob re-hashed against its name; no other file under ``blobs/`` (a temp file there would
        be a half blob made visible); every ref's closure (manifest → config and layers, index → manifests)
        present; every blob the build cache tables reference present. Blobs a concurrent gc removes while fsck
        runs are skipped, not reported.
        """
        problems: list[str] = []
        for algo_dir in sorted(self.blobs_dir.iterdir()):
            # iter_blobs skips names that are not digests; fsck must see them (a temp file would hide there).
            names = sorted(algo_dir.iterdir()) if algo_dir.is_dir() else [algo_dir]
            for p in names:
                try:
                    digest: Digest | None = Digest(f"{algo_dir.name}:{p.name}")
                except ImgciError:
                    digest = None
                if digest is None or not p.is_file():
                    problems.append(f"unexpected {'file' if p.is_file() else 'entry'} {p} in the blob store")
                    continue
                h = digest.hasher()
                try:
                    with open(p, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 20), b""):
                            h.update(chunk)
                except FileNotFoundError:
                    continue  # collected by a concurrent gc
                if h.hexdigest() != digest.hex:
                    problems.append(f"blob {digest} is corrupt (content hashes to {digest.algorithm}:{h.hexdigest()})")
        for rec in self.list_refs():
            # Documents that do not parse as a manifest or index count as leaves (their bytes were hashed above).
            for d in sorted(self.reachable({rec.digest}), key=str):
                if not self.has_blob(d):
                    problems.append(f"ref {rec.name}: blob {d} is missing")
        problems += self._fsck_cache()
        return problems

    def _fsck_cache(self) -> list[str]:
        """Build cache records whose layer blobs are gone (gc keeps them as roots, so that is damage)."""
        db = self._db()
        problems: list[str] = []
        referenced = {(k, d) for k, d in db.execute("SELECT key, digest FROM cache_blobs").fetchall()}
        for key, record in db.execute("SELECT key, record FROM cache_entries").fetchall():
            try:
                layers = [Digest(layer["descriptor"]["digest"]).value for layer in json.loads(record)["layers"]]
            except (ValueError, KeyError, TypeError, ImgciError):
                problems.append(f"build cache entry {key[:19]}: unreadable record")
                continue
            for d in layers:
                if (key, d) not in referenced:
                    problems.append(f"build cache entry {key[:19]}: blob {d} is not recorded as kept by gc")
        for key, d in sorted(referenced):
            with contextlib.suppress(ImgciError):
                if not self.has_blob(Digest(d)):
                    problems.append(f"build cache entry {key[:19]}: blob {d} is missing")
        return problems
