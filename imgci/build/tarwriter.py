"""A minimal, fast, deterministic tar writer for layers (headers by hand, contents streamed in large chunks).

Contract:
- :class:`TarWriter` writes :class:`TarRecord` headers and their data into a sink in full ``BUFFER_SIZE`` writes
  (only the last write is shorter), so a :class:`imgci.compression.CompressingWriter` behind it compresses whole
  blocks without re-buffering. Regular file data is read straight into the output buffer (``readv``/``readinto``),
  never copied through an intermediate ``bytes``.
- Header format is that of Go's ``archive/tar`` with ``Format = FormatPAX`` as containerd's ChangeWriter
  (BuildKit) uses it: a ustar header (magic ``ustar\\0``, version ``00``), zero-padded octal numbers with a NUL
  terminator, checksum as 6 octal digits + NUL + space, uname/gname always empty, device numbers always written.
  A PAX extended header (``x``, named ``<dir>/PaxHeaders.0/<base>``, records sorted by key) precedes an entry only
  when a value cannot be stored in the ustar header: a name or link target longer than 100 bytes or not ASCII,
  a uid/gid >= 8^7, a size >= 8^11, an mtime < 0 or >= 8^11, or xattrs (``SCHILY.xattr.*``). The ustar header then
  carries the ASCII-only, truncated name and 0 for numbers that do not fit, as Go writes them.
- The archive ends with two zero blocks and no further padding (Go's ``Writer.Close``).
- A regular file whose content is shorter or (as far as a cheap probe sees) longer than its header's size raises
  :class:`BuildError`: a file that changed while its layer was written must not produce a corrupt layer.
- Optionally (``threaded=True``) the sink is driven from a worker thread; buffers are handed over, never copied.
  Errors from the sink surface on the next write or on ``close``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from dataclasses import dataclass
from typing import IO, Any, Protocol

from imgci.errors import BuildError

BLOCK = 512
BUFFER_SIZE = 1 << 20  # == imgci.compression's compress block: whole blocks go straight to the compressor
REG, LNK, SYM, CHR, BLK, DIR, FIFO, PAX = b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"x"
_MAX_OCTAL_7 = 8**7  # uid, gid, mode, devmajor, devminor (8-byte fields)
_MAX_OCTAL_11 = 8**11  # size, mtime (12-byte fields)
_ZERO_BLOCK = bytes(BLOCK)
_MAGIC = b"ustar\x0000"
_PAX_MAX = 1 << 20


class BufferSink(Protocol):
    """Where the archive goes: ``write`` takes a memoryview of a buffer that is reused once ``write`` returns."""

    def write(self, data: memoryview, /) -> Any: ...


@dataclass(slots=True)
class TarRecord:
    """One archive entry as written. ``name`` is final (directories end in ``/``); ``mtime`` is whole seconds."""

    name: str
    type: bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _to_ascii(raw: bytes) -> bytes:
    """Go's ``toASCII``: drop every non-ASCII (and NUL) byte."""
    return raw if raw.isascii() else bytes(b for b in raw if 0 < b < 0x80)


def _name_field(raw: bytes) -> bytes:
    """Go's ``formatString`` for a name that went to PAX: ASCII only, truncated, a trailing ``/`` cut to NUL."""
    short = _to_ascii(raw)
    if len(short) > 100:
        cut = short[:100]
        if cut.endswith(b"/"):
            cut = cut[:99].rstrip(b"/")
        return cut
    return short


def pax_record(key: str, value: bytes) -> bytes:
    """One ``"%d %s=%s\\n"`` record whose length field counts itself."""
    body = b" " + _encode(key) + b"=" + value + b"\n"
    size = len(body) + len(str(len(body)))
    if len(str(size)) + len(body) != size:
        size += 1
    return str(size).encode() + body


def _header(
    name: bytes,
    type_: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes,
    dev: bytes,
) -> bytes:
    """A ustar header block; every number must already fit its field."""
    head = b"".join(
        (
            name.ljust(100, b"\0"),
            b"%07o\0%07o\0%07o\0%011o\0%011o\0        " % (mode, uid, gid, size, mtime),
            type_,
            linkname.ljust(100, b"\0"),
            _MAGIC,
            bytes(64),  # uname, gname: always empty (numeric ids only, as BuildKit writes)
            dev,
            bytes(167),  # prefix (never used: long names go to PAX) + padding
        )
    )
    return head[:148] + b"%06o\0 " % sum(head) + head[156:]


def encode_header(rec: TarRecord) -> bytes:
    """The header block(s) of ``rec``: an optional PAX extended header plus its ustar header."""
    pax: dict[str, bytes] = {}
    name = _encode(rec.name)
    link = _encode(rec.linkname)
    if "\x00" in rec.name or "\x00" in rec.linkname:
        raise ValueError(f"tar entry {rec.name!r}: NUL in a name or link target")
    if len(name) > 100 or not name.isascii():
        pax["path"] = name
        name = _name_field(name)
    if len(link) > 100 or not link.isascii():
        pax["linkpath"] = link
        link = _name_field(link)
    uid, gid, size, mtime = rec.uid, rec.gid, rec.size, rec.mtime
    if not 0 <= uid < _MAX_OCTAL_7:
        pax["uid"], uid = str(uid).encode(), 0
    if not 0 <= gid < _MAX_OCTAL_7:
        pax["gid"], gid = str(gid).encode(), 0
    if not 0 <= size < _MAX_OCTAL_11:
        pax["size"], size = str(size).encode(), 0
    if not 0 <= mtime < _MAX_OCTAL_11:
        pax["mtime"], mtime = str(mtime).encode(), 0
    for key, value in rec.xattrs:
        pax["SCHILY.xattr." + key] = value
    if not (0 <= rec.devmajor < _MAX_OCTAL_7 and 0 <= rec.devminor < _MAX_OCTAL_7):
        raise ValueError(f"tar entry {rec.name!r}: device numbers {rec.devmajor},{rec.devminor} do not fit a header")
    if not 0 <= rec.mode < 0o10000:
        raise ValueError(f"tar entry {rec.name!r}: mode {rec.mode:o} has more than permission bits")
    dev = b"%07o\0%07o\0" % (rec.devmajor, rec.devminor)
    main = _header(name, rec.type, rec.mode, uid, gid, size, mtime, link, dev)
    if not pax:
        return main
    data = b"".join(pax_record(k, pax[k]) for k in sorted(pax))
    if len(data) > _PAX_MAX:
        raise ValueError(f"tar entry {rec.name!r}: {len(data)} bytes of PAX records (max {_PAX_MAX})")
    # Go names the extension header path.Join(dir, "PaxHeaders.0", file); its raw-file header has no device fields.
    head, _, base = rec.name.rpartition("/")
    ext_name = _to_ascii(_encode("/".join(p for p in (head, "PaxHeaders.0", base) if p)))[:100].rstrip(b"/")
    ext = _header(ext_name, PAX, 0, 0, 0, len(data), 0, b"", bytes(16))
    return ext + data + bytes(-len(data) % BLOCK) + main


class _Output:
    """Hands full buffers to the sink, in this thread or (``threaded``) in a worker thread."""

    def __init__(self, sink: BufferSink, threaded: bool, buffers: int = 4) -> None:
        self._sink = sink
        self.buf = bytearray(BUFFER_SIZE)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if threaded:
            self._free: queue.Queue[bytearray] = queue.Queue()
            for _ in range(buffers - 1):
                self._free.put(bytearray(BUFFER_SIZE))
            self._full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
            self._thread = threading.Thread(target=self._run, name="imgci-tar-sink", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            buf, n = item
            if self._error is None:
                try:
                    self._sink.write(memoryview(buf)[:n])
                except BaseException as e:  # handed to the producer, which raises it
                    self._error = e
            self._free.put(buf)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, n: int) -> None:
        """Write the first ``n`` bytes of ``buf``; ``buf`` is then a fresh buffer."""
        if not n:
            return
        if self._thread is None:
            self._sink.write(memoryview(self.buf)[:n])
            return
        self._check()
        self._full.put((self.buf, n))
        self.buf = self._free.get()

    def close(self, abort: bool = False) -> None:
        if self._thread is not None:
            self._full.put(None)
            self._thread.join()
            self._thread = None
        if not abort:
            self._check()


class AsyncSink:
    """Writes immutable ``bytes`` into ``sink`` from a worker thread (e.g. compressed output into a blob file).

    ``write`` queues (at most ``depth`` chunks in flight); ``close`` waits and raises the sink's first error, which
    also surfaces on a later ``write``. Never pass a buffer that will be reused: the chunk is not copied.
    """

    def __init__(self, sink: Any, depth: int = 8) -> None:
        self._sink = sink
        self._queue: queue.Queue[bytes | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="imgci-blob-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._sink.write(data)
                except BaseException as e:  # handed to the producer, which raises it
                    self._error = e

    def write(self, data: bytes, /) -> int:
        if self._error is not None:
            raise self._error
        self._queue.put(data)
        return len(data)

    def close(self, abort: bool = False) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None and not abort:
            raise self._error


class TarWriter:
    """Writes records and their data into ``sink``; see the module contract. Call ``close`` to finish."""

    def __init__(self, sink: BufferSink, *, threaded: bool = False) -> None:
        self._out = _Output(sink, threaded)
        self._pos = 0
        self.size = 0  # bytes of archive produced so far
        self.entries = 0

    # -- raw output ----------------------------------------------------------------------------------------------
    def _put(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = BUFFER_SIZE - self._pos
            n = min(room, len(view))
            self._out.buf[self._pos : self._pos + n] = view[:n]
            self._pos += n
            view = view[n:]
            if self._pos == BUFFER_SIZE:
                self._flush()

    def _flush(self) -> None:
        self._out.submit(self._pos)
        self.size += self._pos
        self._pos = 0

    def _pad(self, size: int) -> None:
        pad = -size % BLOCK
        if pad:
            self._put(_ZERO_BLOCK[:pad])

    # -- entries -------------------------------------------------------------------------------------------------
    def add(self, rec: TarRecord) -> None:
        """A record without data (directory, link, device, fifo, empty file, whiteout)."""
        if rec.type == REG and rec.size:
            raise ValueError(f"tar entry {rec.name!r}: a regular file of {rec.size} bytes needs its data")
        self._put(encode_header(rec))
        self.entries += 1

    def add_bytes(self, rec: TarRecord, data: bytes) -> None:
        if len(data) != rec.size:
            raise ValueError(f"tar entry {rec.name!r}: {len(data)} bytes of data for a size of {rec.size}")
        self._put(encode_header(rec))
        self._put(data)
        self._pad(rec.size)
        self.entries += 1

    def add_fd(self, rec: TarRecord, fd: int) -> None:
        """A regular file read from ``fd`` (from its current offset) straight into the output buffer."""
        self._put(encode_header(rec))
        self._copy(rec, lambda view: os.readv(fd, [view]))
        self.entries += 1

    def add_file(self, rec: TarRecord, f: IO[bytes]) -> None:
        """A regular file read from a file object (``readinto`` when it has one)."""
        self._put(encode_header(rec))
        readinto = getattr(f, "readinto", None)
        if readinto is not None:
            self._copy(rec, readinto)
        else:

            def read(view: memoryview) -> int:
                data = f.read(len(view))
                view[: len(data)] = data
                return len(data)

            self._copy(rec, read)
        self.entries += 1

    def _copy(self, rec: TarRecord, readinto: Any) -> None:
        remaining = rec.size
        while True:
            # Ask for one byte more than expected: the short read that ends a regular file then also shows that it
            # did not grow, without an extra read() per file.
            want = min(BUFFER_SIZE - self._pos, remaining + 1)
            n = readinto(memoryview(self._out.buf)[self._pos : self._pos + want]) or 0
            if n > remaining:
                raise BuildError(f"{rec.name}: file grew while the layer was being written (expected {rec.size} bytes)")
            self._pos += n
            remaining -= n
            if self._pos == BUFFER_SIZE:
                self._flush()
            if n < want:
                if remaining == 0:
                    break
                if n == 0:
                    raise BuildError(
                        f"{rec.name}: file shrank while the layer was being written "
                        f"(expected {rec.size} bytes, got {rec.size - remaining})"
                    )
        self._pad(rec.size)

    def close(self) -> None:
        """Write the end-of-archive blocks and flush everything to the sink."""
        self._put(_ZERO_BLOCK * 2)
        self._flush()
        self._out.close()

    def abort(self) -> None:
        """Stop the worker thread (if any) without raising its error; the output is incomplete."""
        with contextlib.suppress(BaseException):
            self._out.close(abort=True)


class TarPipe:
    """Carries tar bytes from a writer (any thread) to a reader thread; the writer never blocks on a dead reader."""

    def __init__(self) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue(16)
        self._chunk = memoryview(b"")
        self.dead = False

    def write(self, data: memoryview, /) -> int:
        if not self.dead:
            self._queue.put(bytes(data))
        return len(data)

    def close(self) -> None:
        self._queue.put(None)

    def read(self, n: int = -1, /) -> bytes:
        while not self._chunk:
            data = self._queue.get()
            if data is None:
                self._queue.put(None)  # stay at EOF
                return b""
            self._chunk = memoryview(data)
        n = len(self._chunk) if n < 0 else n
        out, self._chunk = bytes(self._chunk[:n]), self._chunk[n:]
        return out

    def fail(self) -> None:
        """The reader gave up: drop what comes, until the writer closes."""
        self.dead = True
        while self._queue.get() is not None:
            pass
