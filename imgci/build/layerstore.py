"""Unpacked layers: each layer's files kept once per diff_id, with a metadata index that is the truth about them.

Layout under the state directory::

    layers/<hex>/root/          the layer alone, extracted by imgci.layerfs.extract_layer_dir (whiteout and opaque
                                markers kept as empty files, never applied; no device nodes)
    layers/<hex>/index.json     its metadata index (imgci.build.layerindex): path -> type, mode, uid, gid, size,
                                mtime, link target, device numbers, xattrs as stored in the tar; whiteouts; opaque
    layers/.tmp-<pid>-<random>/ an unpack in progress (renamed to <hex> when complete; swept once <pid> is dead)
    layers/.locks/<hex>         flock: exclusive while unpacking or removing the layer, shared while it is in use
    index.db: unpacked_layers   diff_id, size, entries, unpacked, last_used

Contract:
- A ``layers/<hex>`` directory is only ever complete: it appears by ``rename`` after the stream was extracted and
  both the blob digest and the diff_id were verified (a killed process leaves at most a ``.tmp-*`` directory).
- Ownership, modes of devices and hardlinks to lower layers live in the index, not on disk: unprivileged, every file
  on disk belongs to the invoking user (files get owner read, directories owner rwx); readers use the index.
- Concurrent callers (threads or processes) for the same layer unpack it once: the others wait on its lock and
  then find it. A LayerStore holds a shared lock on each layer it handed out until ``close``; ``gc_unpacked``
  removes only layers nobody holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import secrets
import shutil
import stat
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgci import child_pythonpath
from imgci.build.fs import LayerEntry
from imgci.build.layer import HashSink, LayerResult, Tee, plan_entries, write_layer, write_layer_tar, write_tar
from imgci.build.layerindex import LayerIndex, LayerIndexBuilder
from imgci.build.tarwriter import TarPipe
from imgci.build.union import MergedTree, UnionView, lookup_group, lookup_user
from imgci.compression import Readable
from imgci.errors import ImgciError, StoreError, from_report
from imgci.layerfs import consume_verified_layer, extract_layer_dir
from imgci.oci import Descriptor, Digest
from imgci.store import Store, fsync_dir

__all__ = ["LayerIndex", "LayerStore", "UnionView", "UnpackedLayer", "lookup_group", "lookup_user"]

_CACHED_INDEXES = 64
_CACHED_TREES = 16


# A layer the build writes from this many entries on is unpacked by a process of its own (_unpack_in_process).
PROCESS_UNPACK_ENTRIES = 1000
# A layer of at most this many entries and bytes of file data is written and then unpacked in the calling thread
# (_unpack_after): for a file or two, handing the stream between threads cost more than the work (~8 ms of a
# one-file COPY's ~25 ms here).
INLINE_ENTRIES, INLINE_BYTES = 64, 1 << 20
_UNPACK_COMMAND = [sys.executable, "-m", "imgci._unpack"]


def _process_unpack_enabled() -> bool:
    return os.environ.get("IMGCI_UNPACK_PROCESS", "1") != "0"


def _unpack_env() -> dict[str, str]:
    """The environment of ``python -m imgci._unpack``: ours, with a PYTHONPATH that finds this very imgci."""
    return {**os.environ, "PYTHONPATH": child_pythonpath()}


def _is_small(entries: list[LayerEntry]) -> bool:
    return len(entries) <= INLINE_ENTRIES and sum(e.info.size for e in entries) <= INLINE_BYTES


class _MemoryTar:
    """A tee target keeping a small layer's tar in memory (see :meth:`LayerStore._unpack_after`)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: memoryview | bytes, /) -> int:
        self.data += data
        return len(data)


class _ProcessPipe:
    """:class:`TarPipe`'s writing side over a child's stdin. Once the child is gone (it failed; its report says
    why) what comes is dropped, so the writer finishes its blob and never blocks on a dead reader."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.dead = False
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)  # fewer wake-ups of the child (capped by fs.pipe-max-size)

    def write(self, data: memoryview | bytes, /) -> int:
        if not self.dead:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError:  # EPIPE: the child exited
                self.dead = True
        return len(data)

    def close(self) -> None:
        pass  # the caller closes the child's stdin


_F_SETPIPE_SZ = 1031


def _child_error(status: int, report: bytes, stderr: bytes) -> ImgciError:
    """The error ``python -m imgci._unpack`` reported (exit status 3: the same imgci error class), or a crash."""
    from imgci import _unpack

    if status == _unpack.ERROR_STATUS:
        try:
            error = from_report(json.loads(report))
        except ValueError:
            error = None
        if error is not None:
            return error
    tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
    said = f": {' / '.join(tail)}" if tail else ""
    return StoreError(f"unpacking a layer into the state directory failed (exit status {status}){said}")


@dataclass(frozen=True)
class UnpackedLayer:
    """Bookkeeping of one unpacked layer."""

    diff_id: Digest
    size: int
    entries: int
    unpacked: float
    last_used: float


class LayerStore:
    """Unpacked layers under ``STATE/layers``; see the module contract. Thread-safe."""

    def __init__(self, store: Store, *, unprivileged: bool | None = None) -> None:
        self.store = store
        self.unprivileged = unprivileged  # None: unprivileged unless euid 0 (as imgci.layerfs decides)
        self.root = store.root / "layers"
        self.locks_dir = self.root / ".locks"
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        self.unpack_count = 0  # layers this instance extracted (from a blob or while writing)
        self._held: dict[Digest, int] = {}  # diff_id -> fd holding a shared lock
        self._lock = threading.Lock()
        self._indexes: OrderedDict[Digest, LayerIndex] = OrderedDict()
        self._trees: OrderedDict[tuple[Digest, ...], MergedTree] = OrderedDict()

    # -- paths and locks ----------------------------------------------------------------------------------------
    def layer_dir(self, diff_id: Digest) -> Path:
        return self.root / diff_id.hex

    def layer_root(self, diff_id: Digest) -> Path:
        return self.layer_dir(diff_id) / "root"

    def is_unpacked(self, diff_id: Digest) -> bool:
        return (self.layer_dir(diff_id) / "index.json").is_file()

    def _flock(self, diff_id: Digest, exclusive: bool, blocking: bool = True) -> int | None:
        path = self.locks_dir / diff_id.hex
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB))
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except BlockingIOError:
                os.close(fd)
                return None
            except FileNotFoundError:
                pass  # gc removed the lock file between open and flock: take a fresh one
            os.close(fd)

    def lock_exclusive_nowait(self, diff_id: Digest) -> int | None:
        """An fd holding the exclusive lock of ``diff_id`` (nobody uses the layer), or None if it is in use."""
        with self._lock:
            if diff_id in self._held:
                return None
        return self._flock(diff_id, exclusive=True, blocking=False)

    def _hold(self, diff_id: Digest) -> Path | None:
        """Take a shared lock on an existing layer (kept until close); None if it is not unpacked."""
        with self._lock:
            if diff_id in self._held and self.is_unpacked(diff_id):
                return self.layer_dir(diff_id)
        fd = self._flock(diff_id, exclusive=False)
        assert fd is not None
        if not self.is_unpacked(diff_id):
            os.close(fd)
            return None
        with self._lock:
            if diff_id in self._held:
                os.close(fd)
            else:
                self._held[diff_id] = fd
        self._touch(diff_id)
        return self.layer_dir(diff_id)

    def _touch(self, diff_id: Digest, index: LayerIndex | None = None) -> None:
        now = time.time()
        with self.store.transaction() as db:
            cur = db.execute("UPDATE unpacked_layers SET last_used = ? WHERE diff_id = ?", (now, diff_id.value))
            if cur.rowcount == 0:
                index = index or self.index(diff_id)
                db.execute(
                    "INSERT OR REPLACE INTO unpacked_layers VALUES (?, ?, ?, ?, ?)",
                    (diff_id.value, index.size, len(index.entries), now, now),
                )

    # -- unpacking ---------------------------------------------------------------------------------------------
    def ensure_unpacked(self, descriptor: Descriptor, diff_id: Digest) -> Path:
        """The layer directory of ``diff_id``, extracting the blob ``descriptor`` first if needed.

        Raises DigestMismatchError if the blob or its uncompressed stream do not match (nothing is kept then).
        """
        while True:
            path = self._hold(diff_id)
            if path is not None:
                return path
            # Never wait for the exclusive lock: another thread of this process may meanwhile have taken the
            # layer's shared lock for good (_held, once another process unpacked it), and flock locks of one
            # process on two descriptors conflict — waiting would be waiting for ourselves. Poll instead.
            fd = self._flock(diff_id, exclusive=True, blocking=False)
            if fd is None:
                time.sleep(0.02)
                continue
            try:
                if not self.is_unpacked(diff_id):
                    self._unpack_blob(descriptor, diff_id)
            finally:
                os.close(fd)
            # loop: take the shared lock (gc may have been quicker in between; then we unpack again)

    def _unpack_blob(self, descriptor: Descriptor, diff_id: Digest) -> None:
        def extract(tmp: Path, builder: LayerIndexBuilder) -> None:
            def consume(stream: Readable) -> None:
                extract_layer_dir(stream, tmp / "root", builder.record, unprivileged=self.unprivileged)

            with self.store.open_blob(descriptor.digest) as raw:
                consume_verified_layer(raw, descriptor.digest, diff_id, consume, expected_by="its diff_id is")

        self._install(diff_id, self._extract_to_tmp(extract))

    def _new_tmp(self) -> Path:
        """A new ``layers/.tmp-<pid>-<random>`` with an empty ``root`` in it (swept once ``<pid>`` is dead)."""
        tmp = self.root / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
        (tmp / "root").mkdir(parents=True)
        return tmp

    def _extract_to_tmp(self, extract: Callable[[Path, LayerIndexBuilder], None]) -> tuple[Path, LayerIndex]:
        tmp = self._new_tmp()
        try:
            builder = LayerIndexBuilder()
            extract(tmp, builder)
            index = builder.finish()
            index.save(tmp / "index.json")
        except BaseException:
            _remove_tree(tmp)
            raise
        return tmp, index

    def _install(self, diff_id: Digest, extracted: tuple[Path, LayerIndex]) -> None:
        """Rename a complete temp dir into place (the caller holds the exclusive lock) and record it."""
        tmp, index = extracted
        final = self.layer_dir(diff_id)
        if self.is_unpacked(diff_id):
            _remove_tree(tmp)
            return
        if final.exists():
            _remove_tree(final)  # a layer dir without its index: left by an older, interrupted removal
        os.rename(tmp, final)
        fsync_dir(self.root)
        with self._lock:
            self.unpack_count += 1
            self._indexes[diff_id] = index
        now = time.time()
        with self.store.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO unpacked_layers VALUES (?, ?, ?, ?, ?)",
                (diff_id.value, index.size, len(index.entries), now, now),
            )

    def _unpack_while(self, produce: Callable[[TarPipe], Digest | None]) -> tuple[Digest, tuple[Path, LayerIndex]]:
        """Extract, in a thread, the tar stream ``produce`` writes into a pipe; ``produce`` returns its diff_id
        (None: the stream is not the layer wanted, and nothing is kept)."""
        pipe = TarPipe()
        failure: list[BaseException] = []
        digest: list[Digest | None] = []

        def extract(tmp: Path, builder: LayerIndexBuilder) -> None:
            def run() -> None:
                try:
                    extract_layer_dir(pipe, tmp / "root", builder.record, unprivileged=self.unprivileged)
                except BaseException as e:
                    failure.append(e)
                finally:
                    pipe.fail()  # drains until the producer closes, so it never blocks on us

            thread = threading.Thread(target=run, name="imgci-layer-unpack", daemon=True)
            thread.start()
            try:
                digest.append(produce(pipe))
            finally:
                pipe.close()
                thread.join()
            if failure:
                raise failure[0]
            if digest[0] is None:
                raise _NotSame()

        extracted = self._extract_to_tmp(extract)
        assert digest[0] is not None
        return digest[0], extracted

    def write_layer(
        self,
        entries: Iterable[LayerEntry],
        *,
        compression: str = "gzip",
        source_date_epoch: int | None = None,
        level: int | None = None,
    ) -> tuple[LayerResult, Path]:
        """:func:`imgci.build.layer.write_layer`, unpacking the layer in the same pass; returns its layer dir too.
        Thousands of entries are unpacked by a process of their own (see :meth:`_unpack_in_process`)."""
        epoch = source_date_epoch
        many = isinstance(entries, Sized) and len(entries) >= PROCESS_UNPACK_ENTRIES and _process_unpack_enabled()
        small = isinstance(entries, list) and _is_small(entries)
        return self._write_unpacking(
            lambda pipe: write_layer(
                self.store,
                entries,
                compression=compression,
                source_date_epoch=epoch,
                level=level,
                tee=pipe,
                threaded=not small,
            ),
            separate_process=many,
            inline=small,
        )

    def _unpack_after(self, produce: Callable[[Any], Digest | None]) -> tuple[Digest, tuple[Path, LayerIndex]]:
        """:meth:`_unpack_while` for a small layer: ``produce`` writes the tar into memory, then it is unpacked, all
        in the calling thread."""
        tar = _MemoryTar()
        digest = produce(tar)
        if digest is None:
            raise _NotSame()

        def extract(tmp: Path, builder: LayerIndexBuilder) -> None:
            extract_layer_dir(io.BytesIO(tar.data), tmp / "root", builder.record, unprivileged=self.unprivileged)

        return digest, self._extract_to_tmp(extract)

    def _unpack_in_process(self, produce: Callable[[TarPipe], Digest | None]) -> tuple[Digest, tuple[Path, LayerIndex]]:
        """:meth:`_unpack_while` with the unpacking in a ``python -m imgci._unpack`` child instead of a thread: the
        writer (sources, tar headers, compression, digests) and the unpacker (a file created per entry) are both
        per-entry Python work, which one interpreter runs a thread at a time; in two processes they use two CPUs
        (a 4,000-file COPY: ~1.0 s → ~0.6 s here). The child starts in ~40 ms, so only large layers come here.
        The child writes the index next to ``root``; an error it reports is raised as the same imgci error."""
        import subprocess  # (here: a cached rebuild writes no layer and needs neither)
        import tempfile

        tmp = self._new_tmp()
        proc: subprocess.Popen[bytes] | None = None
        try:
            with tempfile.TemporaryFile() as err:
                mode = {None: "auto", True: "yes", False: "no"}[self.unprivileged]
                proc = subprocess.Popen(
                    [*_UNPACK_COMMAND, str(tmp), mode],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    env=_unpack_env(),
                )
                assert proc.stdin is not None and proc.stdout is not None
                pipe = _ProcessPipe(proc.stdin.fileno())
                try:
                    digest = produce(pipe)  # type: ignore[arg-type]
                finally:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()
                report = proc.stdout.read()
                status = proc.wait()
                if status != 0:
                    err.seek(0)
                    raise _child_error(status, report, err.read())
            if digest is None:
                raise _NotSame()
            index = LayerIndex.load(tmp / "index.json")
        except BaseException:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            _remove_tree(tmp)
            raise
        return digest, (tmp, index)

    def write_layer_stream(
        self, stream: Any, *, entry_count: int = 0, compression: str = "gzip", level: int | None = None
    ) -> tuple[LayerResult, Path]:
        """:func:`imgci.build.layer.write_layer_tar` (a finished tar read from ``stream``), unpacking it in the same
        pass; returns its layer dir too."""
        return self._write_unpacking(
            lambda pipe: write_layer_tar(
                self.store, stream, entry_count=entry_count, compression=compression, level=level, tee=pipe
            )
        )

    def _write_unpacking(
        self, write: Callable[[TarPipe], LayerResult], *, separate_process: bool = False, inline: bool = False
    ) -> tuple[LayerResult, Path]:
        """Run ``write`` (which stores a layer blob and tees its tar into the pipe) while unpacking the pipe."""
        results: list[LayerResult] = []

        def produce(pipe: TarPipe) -> Digest:
            results.append(write(pipe))
            return results[0].diff_id

        try:
            if separate_process:
                diff_id, extracted = self._unpack_in_process(produce)
            elif inline:
                diff_id, extracted = self._unpack_after(produce)
            else:
                diff_id, extracted = self._unpack_while(produce)
        except ImgciError:
            if not results:
                raise
            # The layer was written; only unpacking it on the fly failed (say, the disk under STATE/layers):
            # unpacking the blob reports the real problem or succeeds.
            return results[0], self.ensure_unpacked(results[0].descriptor, results[0].diff_id)
        self._install_locked(diff_id, extracted)
        return results[0], self._held_path(diff_id, results[0].descriptor)

    def add_layer(self, entries: Iterable[LayerEntry], result: LayerResult) -> Path:
        """Register a layer the build just wrote with :func:`write_layer`; returns its layer dir.

        Without reading the blob: the entries are written again as an uncompressed tar (no compression) into the
        unpacker, and kept only if that stream hashes to ``result.diff_id``; otherwise (sources changed, or the
        entries are not the ones written) the blob is unpacked.
        """
        path = self._hold(result.diff_id)
        if path is not None:
            return path
        planned = plan_entries(entries, result.source_date_epoch)

        def produce(pipe: TarPipe) -> Digest | None:
            sink = HashSink()
            write_tar(planned, Tee(sink, pipe))
            digest = sink.digest
            return digest if digest == result.diff_id else None

        try:
            diff_id, extracted = self._unpack_while(produce)
        except (ImgciError, _NotSame):
            return self.ensure_unpacked(result.descriptor, result.diff_id)
        self._install_locked(diff_id, extracted)
        return self._held_path(diff_id, result.descriptor)

    def _install_locked(self, diff_id: Digest, extracted: tuple[Path, LayerIndex]) -> None:
        # Never block on the exclusive lock: a shared holder means the layer is installed (shared locks are only
        # kept on unpacked layers), and it may be another thread of this very process, which holds it until close()
        # — two steps writing the same layer at once would wait for each other for ever. Poll instead.
        while True:
            if self.is_unpacked(diff_id):
                _remove_tree(extracted[0])
                return
            fd = self._flock(diff_id, exclusive=True, blocking=False)
            if fd is not None:
                break
            time.sleep(0.02)
        try:
            self._install(diff_id, extracted)
        finally:
            os.close(fd)

    def _held_path(self, diff_id: Digest, descriptor: Descriptor) -> Path:
        return self._hold(diff_id) or self.ensure_unpacked(descriptor, diff_id)

    # -- reading -----------------------------------------------------------------------------------------------
    def index(self, diff_id: Digest) -> LayerIndex:
        """The metadata index of an unpacked layer (cached)."""
        with self._lock:
            cached = self._indexes.get(diff_id)
            if cached is not None:
                self._indexes.move_to_end(diff_id)
                return cached
        if not self.is_unpacked(diff_id):
            raise StoreError(f"layer {diff_id} is not unpacked", hint="call ensure_unpacked first")
        index = LayerIndex.load(self.layer_dir(diff_id) / "index.json")
        with self._lock:
            self._indexes[diff_id] = index
            while len(self._indexes) > _CACHED_INDEXES:
                self._indexes.popitem(last=False)
        return index

    def tree(self, diff_ids: list[Digest]) -> MergedTree:
        """The merged view of a layer stack (bottom first), built from the longest cached prefix; cached."""
        chain = tuple(diff_ids)
        with self._lock:
            for n in range(len(chain), -1, -1):
                base = self._trees.get(chain[:n])
                if base is not None:
                    self._trees.move_to_end(chain[:n])
                    break
            else:
                base, n = MergedTree.empty(), 0
        if n == len(chain):
            return base
        tree = base.copy()
        for pos in range(n, len(chain)):
            if self._hold(chain[pos]) is None:
                raise StoreError(f"layer {chain[pos]} is not unpacked", hint="call LayerStore.ensure_unpacked first")
            tree.add_layer(self.index(chain[pos]), pos)
        with self._lock:
            self._trees[chain] = tree
            while len(self._trees) > _CACHED_TREES:
                self._trees.popitem(last=False)
        return tree

    def view(self, diff_ids: list[Digest], description: str) -> UnionView:
        return UnionView(self, diff_ids, description)

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def list_unpacked(self) -> list[UnpackedLayer]:
        rows = self.store._db().execute("SELECT * FROM unpacked_layers ORDER BY diff_id").fetchall()
        return [UnpackedLayer(Digest(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    def gc_unpacked(self, keep: set[Digest]) -> tuple[int, int]:
        """Remove unpacked layers not in ``keep`` and not in use by any LayerStore; returns (removed, bytes).

        Also sweeps temp dirs of dead processes and index rows whose directory is gone.
        """
        removed = freed = 0
        for p in list(self.root.iterdir()):
            if p.name.startswith(".tmp-") and not pid_alive(p.name.split("-")[1]):
                _remove_tree(p)
        sizes = {r.diff_id: r.size for r in self.list_unpacked()}
        for p in list(self.root.iterdir()):
            if p.name.startswith("."):
                continue
            try:
                diff_id = Digest("sha256:" + p.name)
            except ImgciError:
                continue
            with self._lock:
                held = diff_id in self._held
            if diff_id in keep or held:
                continue
            fd = self._flock(diff_id, exclusive=True, blocking=False)
            if fd is None:
                continue  # in use by another process
            try:
                trash = self.root / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
                os.rename(p, trash)  # gone at once for everyone; deleted at leisure
                _remove_tree(trash)
                with self.store.transaction() as db:
                    db.execute("DELETE FROM unpacked_layers WHERE diff_id = ?", (diff_id.value,))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.locks_dir / diff_id.hex)
                with self._lock:
                    self._indexes.pop(diff_id, None)
                    self._trees = OrderedDict((k, v) for k, v in self._trees.items() if diff_id not in k)
                removed += 1
                freed += sizes.get(diff_id, 0)
            finally:
                os.close(fd)
        with self.store.transaction() as db:
            for (value,) in db.execute("SELECT diff_id FROM unpacked_layers").fetchall():
                if not self.is_unpacked(Digest(value)):
                    db.execute("DELETE FROM unpacked_layers WHERE diff_id = ?", (value,))
        return removed, freed

    def close(self) -> None:
        """Release the shared locks on the layers this instance handed out."""
        with self._lock:
            held, self._held = self._held, {}
        for fd in held.values():
            os.close(fd)

    def __enter__(self) -> LayerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NotSame(Exception):
    """The regenerated stream is not the layer that was written."""


def pid_alive(text: str) -> bool:
    """Whether the process whose id is ``text`` (digits) runs (or may: another user's)."""
    if not text.isdigit():
        return False
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_tree(path: Path) -> None:
    """``rm -rf`` that also gets through directories whose mode lacks owner write/exec."""

    def fix(func: Any, p: str, exc: Any) -> None:
        parent = os.path.dirname(p)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | 0o700)
        func(p)

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=fix)
